"""Checks of one value of a request against its limit: every error names the field and the limit,
and shows at most a short prefix of the refused value (a hostile payload is never echoed whole)."""

from __future__ import annotations

from typing import Any

from .errors import ValidationError

SHOWN_CHARS = 40  # of a refused value in an error message: enough to recognise it, never the whole payload


def shown(value: Any) -> str:
    """A short repr of a client's value for an error message (any size, any nesting depth)."""
    if isinstance(value, (dict, list)):
        return f"of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**SHOWN_CHARS:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def int_field(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValidationError(name, f"must be an integer, got {type(value).__name__} {shown(value)}")
    if not lo <= value <= hi:
        raise ValidationError(name, f"must be between {lo} and {hi}, got {shown(value)}")
    return value


def float_field(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number, got {type(value).__name__} {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range: outside every limit
        raise ValidationError(name, f"must be between {lo:g} and {hi:g}, got {shown(value)}") from None
    if not lo <= number <= hi:  # also rejects NaN
        raise ValidationError(name, f"must be between {lo:g} and {hi:g}, got {number:g}")
    return number


def unencodable(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def text_field(name: str, value: Any, max_chars: int, required: bool) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValidationError(name, "must not be empty")
    if len(value) > max_chars:
        raise ValidationError(name, f"is {len(value)} characters, the limit is {max_chars}")
    if "\x00" in value:
        raise ValidationError(name, "must not contain NUL characters")
    bad = unencodable(value)
    if bad is not None:  # JSON's "\ud800" escape: text no file, topic or PNG chunk can hold
        raise ValidationError(name, f"has a lone surrogate (U+{ord(value[bad]):04X}) at character {bad}; "
                                    f"it is not Unicode text")
    return value
