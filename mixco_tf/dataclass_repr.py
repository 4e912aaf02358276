"""A `__repr__` for config dataclasses that stays readable with many fields."""

import dataclasses

# Reprs up to this many characters stay on one line.
MAX_LINE_LENGTH = 88


def multiline_repr(instance) -> str:
    """Returns `Name(field=value, ...)`, with one field per line when that is too long.

    The text is the dataclass's own repr with line breaks, so `eval` of it rebuilds an
    equal instance, as with the default dataclass repr.
    """
    name = type(instance).__name__
    fields = [
        f"{field.name}={getattr(instance, field.name)!r}"
        for field in dataclasses.fields(instance)
        if field.repr
    ]
    one_line = f"{name}({', '.join(fields)})"
    if len(one_line) <= MAX_LINE_LENGTH:
        return one_line
    body = "".join(f"    {field},\n" for field in fields)
    return f"{name}(\n{body})"
