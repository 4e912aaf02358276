"""Argument types shared by the benchmark command lines."""

import argparse
import os


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


def parse_switch(text):
    """Reads "default" as None, otherwise a bool as `parse_bool` does."""
    if text.strip().lower() == "default":
        return None
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use true, false or default") from None


def switch_environment(variable, value):
    """Returns a copy of os.environ with `variable` set to "1"/"0", or unset for None."""
    env = {key: item for key, item in os.environ.items() if key != variable}
    if value is not None:
        env[variable] = "1" if value else "0"
    return env
