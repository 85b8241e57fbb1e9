"""URL query values: parsers that return a checked value or raise ValueError with a short reason
(the pages and the trace page's URL state in ``runcard`` use the same ones)."""

from __future__ import annotations

import math
from typing import Any, Callable

MAX_TEXT = 20_000
Parser = Callable[[Any], Any]


def items(value: Any) -> list:
    """A list from "a,b;c" text or a list."""
    if isinstance(value, str):
        return [v for v in value.replace(";", ",").split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError("not a list")


def text(value: Any) -> str:
    """A text value (a repeated parameter: the last one), at most ``MAX_TEXT`` characters."""
    if isinstance(value, (list, tuple)):  # a repeated query parameter: the last one wins
        value = value[-1] if value else ""
    if not isinstance(value, str):
        raise ValueError("not text")
    if len(value) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT} characters")
    return value


def choice(options: Callable[[], Any] | tuple) -> Parser:
    """One of ``options`` (or of what ``options()`` returns when the value is parsed)."""
    def parse(value: Any) -> str:
        known = tuple(options() if callable(options) else options)
        word = text(value).strip()
        if word not in known:
            raise ValueError(f"not one of {', '.join(map(str, known))}")
        return word
    return parse


def integer(low: int, high: int) -> Parser:
    """An integer from ``low`` to ``high`` (a float that is a whole number counts)."""
    def parse(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        given = text(value).strip() if not isinstance(value, int) or isinstance(value, bool) else value
        try:
            number = int(given)
        except (TypeError, ValueError):
            raise ValueError(f"not an integer from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"not an integer from {low} to {high}")
        return number
    return parse


def number(low: float, high: float) -> Parser:
    """A finite number from ``low`` to ``high``."""
    def parse(value: Any) -> float:
        given = text(value).strip() if not isinstance(value, (int, float)) or isinstance(value, bool) else value
        try:
            result = float(given)
        except (TypeError, ValueError):
            raise ValueError(f"not a number from {low:g} to {high:g}") from None
        if not math.isfinite(result) or not low <= result <= high:
            raise ValueError(f"not a number from {low:g} to {high:g}")
        return result
    return parse


def flag(value: Any) -> bool:
    """True/false as 1/0, true/false, yes/no or on/off (empty: false)."""
    if isinstance(value, bool):
        return value
    word = text(value).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not true/false (1/0)")


def pair(low: int, high: int) -> Parser:
    """Two integers "a-b" (or "a,b") with low <= a < b <= high."""
    def parse(value: Any) -> tuple[int, int]:
        if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value[0], str):
            parts = list(value)
        else:
            parts = text(value).replace(",", "-").split("-")
        if len(parts) != 2:
            raise ValueError("not two layers a-b")
        a, b = (integer(low, high)(p) for p in parts)
        if a >= b:
            raise ValueError("the first layer must be below the second")
        return a, b
    return parse


def subset(options: tuple) -> Parser:
    """Some of ``options`` (comma-separated), in the options' order."""
    def parse(value: Any) -> tuple[str, ...]:
        given = value if isinstance(value, (list, tuple)) else text(value).split(",")
        picked = [str(v).strip() for v in given if str(v).strip()]
        bad = [v for v in picked if v not in options]
        if bad:
            raise ValueError(f"'{bad[0]}' is not one of {', '.join(options)}")
        return tuple(o for o in options if o in picked)
    return parse
