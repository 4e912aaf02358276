"""Argument types shared by the benchmark command lines."""

import argparse


def list_of(kind):
    """Returns an argparse type that reads a comma-separated list of `kind` values."""

    def parse(text):
        return [kind(item) for item in text.split(",") if item]

    return parse


def parse_bool(text):
    """Reads true/false, yes/no, on/off or 1/0 as a bool."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")
