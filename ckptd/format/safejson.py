"""Parsing JSON read from a checkpoint in bounded memory, and quoting hostile values in messages.

A byte limit on a file does not bound what ``json.loads`` builds from it: 64 MiB of ``{},`` become ~1.7 GiB
of dicts, 100 MB of ``1.5,`` ~1 GiB of floats. What grows without bound is the number of JSON *values*
(each one a Python object of 24-200 bytes); strings cost about their own length. So before parsing,
:func:`load_json` counts the values the text can hold (every ``,``, ``[`` and ``{`` outside strings, plus
one) and refuses more than ``max_values`` without parsing anything. Each value is the top-level one, the
first in its container, or follows a comma, so the count is never below the real one (and exact when no
container is empty, each empty one counting twice); it is also cheap: a plain
byte count first, and only when that count is over the limit a second pass that skips the strings.

Everything else a hostile document can make ``json.loads`` raise becomes a FormatError naming the file:
a number of more than 4300 digits (ValueError), nesting deeper than the interpreter's recursion limit
(RecursionError), invalid UTF-8, and MemoryError.

:func:`brief` quotes a value from such a document in an error message without ever failing or growing
(a 5000-level nesting, a 100 MB string, a 4000-digit integer).
"""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any

from ckptd.format.errors import FormatError

# ~150 bytes per value in the worst case (a one-entry dict with its key): 2 million values stay within
# ~300 MB, and hold ~200,000 manifest file records or ~250,000 tensors in one safetensors header, far
# beyond any real checkpoint.
MAX_JSON_VALUES = 2_000_000

# A JSON string: the unrolled form of "(?:[^"\\]|\\.)*", linear and fast on long strings.
_STRING_BYTES = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRING_TEXT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _structural_count(text: bytes | str) -> int:
    if isinstance(text, str):
        return text.count(",") + text.count("[") + text.count("{") + 1
    return text.count(b",") + text.count(b"[") + text.count(b"{") + 1


def json_value_count(text: bytes | str, limit: int = MAX_JSON_VALUES) -> int:
    """How many values (objects, arrays, strings, numbers, literals) a JSON document holds, without parsing it.

    Never less than the real count. A plain count of ``,[{`` (which includes those inside strings) is
    returned when it is within ``limit``, so a normal document costs three ``bytes.count`` calls; above it,
    the count is redone with the strings skipped (for valid JSON: the real count, plus one per empty
    container).

    Args:
        text: the document.
        limit: the count a caller cares about.

    Example:
        >>> json_value_count(b'{"a": [1, 2, "x,y"], "b": {}}'), json_value_count(b'{"a": [1, 2, "x,y"], "b": {}}', 0)
        (8, 7)
    """
    n = _structural_count(text)
    if n <= limit:
        return n
    pattern = _STRING_TEXT if isinstance(text, str) else _STRING_BYTES
    empty = '""' if isinstance(text, str) else b'""'
    return _structural_count(pattern.sub(empty, text))


def load_json(text: bytes | str, where: str, what: str, max_values: int = MAX_JSON_VALUES) -> Any:
    """Parse JSON from a checkpoint in bounded memory; every failure is a FormatError naming ``where``.

    Args:
        text: the document (bytes are decoded as UTF-8).
        where: the file (or the file and the field) it came from, for messages.
        what: what the document is ("manifest", "safetensors header"), for messages.
        max_values: refuse a document holding more values than this (see :func:`json_value_count`).

    Raises:
        FormatError: too many values, not valid JSON (including a number of more than 4300 digits and
            nesting deeper than the recursion limit), or not enough memory to parse it.

    Example:
        >>> load_json(b'{"step": 5}', "ckpt/checkpoint_manifest.json", "manifest")
        {'step': 5}
    """
    n = json_value_count(text, max_values)
    if n > max_values:
        raise FormatError(
            f"{where}: {what} holds {n} JSON values, more than the {max_values} any {what} written by ckptd "
            "can hold; it was not parsed (that would take unbounded memory): the file is damaged or was not "
            "written by ckptd, resume from an older checkpoint"
        )
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and a number longer than sys.get_int_max_str_digits().
        reason = "nested too deeply" if isinstance(e, RecursionError) else brief_text(str(e), 200)
        raise FormatError(
            f"{where}: not a valid {what}: not valid JSON ({type(e).__name__}: {reason}); the file is damaged, "
            "resume from an older checkpoint"
        ) from None
    except MemoryError:
        raise FormatError(
            f"{where}: parsing this {what} of {len(text)} bytes ran out of memory; expected a {what} ckptd writes "
            "(a few MiB at most): the file is damaged or hostile, resume from an older checkpoint"
        ) from None


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 3
_BRIEF.maxstring = 60
_BRIEF.maxlong = 40
_BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value: object) -> str:
    """A short repr of a value parsed from a hostile document: never deep, never long, never raises.

    Example:
        >>> brief([[[[[[1]]]]]])
        '[[[[...]]]]'
    """
    try:
        return _BRIEF.repr(value)
    except Exception:  # noqa: BLE001 - a message must never fail because of the value it quotes
        return f"<{type(value).__name__}>"


def brief_text(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (an error message quoting a hostile document)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
