"""JSON from outside the program (input files, exports, request bodies, GGUF metadata), parsed
within bounds, so that what Python's json module would turn into a traceback later is one error now.

    data = loads(text)          # raises JSONError (a ValueError) with a message that needs no traceback

Bounds, each far beyond any real record:
- integers of at most MAX_INT_DIGITS digits (a 4,301-digit one makes int() raise in Python 3.11
  and later; a 400-digit one overflows float() and math.isnan);
- numbers finite: NaN, Infinity and 1e999 are refused (no JSON parser but Python's reads them back);
- nesting at most MAX_DEPTH deep (200,000 nested arrays exhaust the interpreter's recursion).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 100
MAX_DEPTH = 64


class JSONError(ValueError):
    """Text that is not JSON, or JSON past the bounds; str() is the reason, for one line."""


def _int(s: str) -> int:
    if len(s) - s.startswith("-") > MAX_INT_DIGITS:
        raise JSONError(f"an integer of {len(s) - s.startswith('-'):,} digits (at most {MAX_INT_DIGITS} are read)")
    return int(s)


def _float(s: str) -> float:
    x = float(s)
    if not math.isfinite(x):
        raise JSONError(f"the number {s[:40]} is out of range")
    return x


def _constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


def loads(text: str | bytes) -> Any:
    """json.loads within the bounds above; JSONError says what is wrong (and where, for syntax)."""
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except JSONError:
        raise
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise JSONError(f"malformed JSON: {e.msg} at {at}") from None
    except RecursionError:
        raise JSONError(f"nested more than {MAX_DEPTH} deep") from None
    except UnicodeDecodeError as e:
        raise JSONError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # what else the parser raises on text it cannot decode
        raise JSONError(f"malformed JSON: {e}") from None
    if isinstance(text, str):
        n = text.count("[") + text.count("{")
    else:
        n = text.count(b"[") + text.count(b"{")
    if n > MAX_DEPTH and not _depth_ok(value):
        raise JSONError(f"nested more than {MAX_DEPTH} deep")
    return value
