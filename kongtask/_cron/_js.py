"""JSON exactly as JavaScript's ``JSON.stringify`` writes it, and timestamps as ``toISOString``.

The payload column is ``json``, which keeps the text verbatim, so this makes a
kongtask-scheduled job byte-identical to the one Node would add for the same crontab line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from .._job import JSONValue

_SURROGATE = re.compile("[\ud800-\udfff]")
_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")


def _js_number(x: float) -> str:
    """ECMAScript ``Number::toString`` (what JSON.stringify prints for a number)."""
    if not math.isfinite(x):
        return "null"  # JSON.stringify(Infinity) and NaN give null
    if x == 0:
        return "0"  # -0 too
    if x < 0:
        return "-" + _js_number(-x)
    # repr gives the shortest round-tripping digits, as ECMAScript requires.
    mantissa, _, exp = repr(x).partition("e")
    int_part, _, frac = mantissa.partition(".")
    all_digits = int_part + frac
    point = len(int_part) + (int(exp) if exp else 0)
    stripped = all_digits.lstrip("0")
    n = point - (len(all_digits) - len(stripped))
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        return digits + "0" * (n - k)
    if 0 < n <= 21:
        return digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + digits
    e = n - 1
    sign = "+" if e > 0 else "-"
    head = digits if k == 1 else digits[0] + "." + digits[1:]
    return f"{head}e{sign}{abs(e)}"


def _js_key_order(keys: Iterable[str]) -> list[str]:
    # JavaScript objects list integer-like keys first, ascending, then the rest in
    # insertion order; JSON5.parse builds such an object, so Node's text follows it.
    keys = list(keys)
    index = sorted((k for k in keys if _ARRAY_INDEX.fullmatch(k) and int(k) < 2**32 - 1), key=int)
    chosen = set(index)
    return index + [k for k in keys if k not in chosen]


def _js_string(s: str) -> str:
    out = json.dumps(s, ensure_ascii=False)
    # Well-formed JSON.stringify escapes lone surrogates; json.dumps would leave them raw.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)


def js_json(value: JSONValue) -> str:
    """``value`` as JSON text, exactly as ``JSON.stringify`` would write it.

    Raises:
      TypeError: ``value`` holds something JSON cannot (a set, bytes, a non-str key...).
    """
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        # A JS number is a double: larger integers lose precision the same way there.
        return str(value) if abs(value) <= 2**53 else _js_number(float(value))
    if isinstance(value, float):
        return _js_number(value)
    if isinstance(value, str):
        return _js_string(value)
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, not {type(k).__name__}")
        return (
            "{"
            + ",".join(f"{_js_string(k)}:{js_json(value[k])}" for k in _js_key_order(value))
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(js_json(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def format_ts(ts: datetime) -> str:
    """``ts`` like JavaScript's ``toISOString()``: ``2026-01-31T04:00:00.000Z``."""
    t = ts.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
