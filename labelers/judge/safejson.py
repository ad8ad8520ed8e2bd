"""Reading JSON that nobody vouches for: a judge's answer, decoded under bounds, every failure a parse error.

Whatever one answer holds (absurdly long numbers, absurd nesting, NaN, a backend's :class:`BadAnswer`) it is that
item's :class:`JudgementParseError`, never an exception for the batch (:func:`guarded_json_loads`,
:func:`safe_parse`). Pure; no heavy imports.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Bounds on one answer, checked before / while decoding it (a judgement is a few hundred characters, two levels
# deep, with one-digit integers): anything beyond is that item's parse_error, never an exception for the batch.
MAX_ANSWER_CHARS = 65_536
MAX_JSON_DEPTH = 16
MAX_NUMBER_CHARS = 32

_FENCE_RE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
_JSON_SYNTAX_RE = re.compile(r'[\[\]{}"\\]')


class JudgementParseError(ValueError):
    """A judge output is not a valid judgement; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadAnswer(Exception):
    """What a backend hands over in place of an answer it could not read (an HTTP answer that is not a chat
    completion, say): the parsers report ``reason`` as that item's parse error and keep ``raw`` (text, possibly
    empty) as its raw output, so the item is retried and then ``parse_error`` like any other bad answer."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def answer_text(raw: Any, limit: int = MAX_ANSWER_CHARS) -> str:
    """The text kept as an answer's raw output: ``raw`` when it is text (cut to ``limit`` characters, with a note
    of how many were dropped), a :class:`BadAnswer`'s ``raw``, ``""`` for ``None``, else its ``repr`` (cut)."""
    if isinstance(raw, BadAnswer):
        raw = raw.raw
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raw = repr(raw)
    if len(raw) > limit:
        return f"{raw[:limit]}...[{len(raw) - limit} more characters]"
    return raw


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether the arrays/objects of the JSON ``text`` nest deeper than ``limit`` (brackets inside strings do not
    count). One linear scan, no recursion: run before ``json.loads``, whose decoder recurses once per level."""
    depth, in_string, escaped_at = 0, False, -1
    for m in _JSON_SYNTAX_RE.finditer(text):
        pos, c = m.start(), m.group()
        if pos == escaped_at:
            continue
        if in_string:
            if c == "\\":
                escaped_at = pos + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth = max(0, depth - 1)
    return False


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise JudgementParseError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise JudgementParseError(f"non-finite number {name} (not JSON)")


def _parse_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_NUMBER_CHARS:
        raise JudgementParseError(f"number with {digits} digits (more than {MAX_NUMBER_CHARS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise JudgementParseError(f"number with {len(text)} characters (more than {MAX_NUMBER_CHARS})")
    value = float(text)
    if not math.isfinite(value):
        raise JudgementParseError(f"number {text} overflows to {value}")
    return value


def guarded_json_loads(text: str, max_chars: int = MAX_ANSWER_CHARS, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` for text nobody vouches for; every failure is a :class:`JudgementParseError`.

    Before decoding: at most ``max_chars`` characters and ``max_depth`` levels of nesting. While decoding:
    ``NaN`` / ``Infinity`` / ``-Infinity`` are refused, numbers are at most :data:`MAX_NUMBER_CHARS` characters
    (Python refuses to convert integers of over 4300 digits, and a long float overflows to ``inf``), object keys
    are unique, raw control characters inside strings are tolerated (``strict=False``; callers clean the text
    fields). Whatever still goes wrong inside the decoder (``RecursionError``, ``ValueError``,
    ``OverflowError``) becomes a parse error too."""
    if len(text) > max_chars:
        raise JudgementParseError(f"output too long ({len(text)} characters, at most {max_chars})")
    if json_depth_exceeds(text, max_depth):
        raise JudgementParseError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text, strict=False, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int,
                          parse_float=_parse_float, parse_constant=_refuse_constant)
    except JudgementParseError:
        raise
    except json.JSONDecodeError as e:
        if e.pos >= len(text) or e.msg.startswith("Unterminated string"):
            raise JudgementParseError(f"truncated JSON ({e.msg} at char {e.pos} of {len(text)})") from None
        raise JudgementParseError(f"not JSON ({e.msg} at char {e.pos}): {text[:60]!r}") from None
    except (RecursionError, ValueError, OverflowError, TypeError) as e:
        raise JudgementParseError(f"undecodable JSON ({type(e).__name__}: {str(e)[:120]})") from None


def decode_json_object(raw: Any) -> dict:
    """A model's output as a JSON object, or :class:`JudgementParseError` naming what is wrong: not text (or a
    backend's :class:`BadAnswer`), empty, too long, nested too deep, not JSON, truncated JSON, a non-finite or
    absurdly long number, duplicate keys, not an object (see :func:`guarded_json_loads`). A single surrounding
    Markdown code fence is tolerated, and so are raw control characters inside strings."""
    if isinstance(raw, BadAnswer):
        raise JudgementParseError(raw.reason)
    if not isinstance(raw, str):
        raise JudgementParseError(f"output is {type(raw).__name__}, not text")
    text = raw.strip()
    if not text:
        raise JudgementParseError("empty output")
    if len(text) > MAX_ANSWER_CHARS:  # before the fence regex, too
        raise JudgementParseError(f"output too long ({len(text)} characters, at most {MAX_ANSWER_CHARS})")
    fence = _FENCE_RE.match(text)
    if fence:
        text = fence.group(1).strip()
    data = guarded_json_loads(text)
    if not isinstance(data, dict):
        raise JudgementParseError(f"expected a JSON object, got {type(data).__name__}")
    return data


def safe_parse(parse: Any, raw: Any, *args: Any) -> Any:
    """``parse(raw, *args)`` with any failure turned into a :class:`JudgementParseError`: the parsers raise only
    that by design, and should a hostile answer still break one (``RecursionError``, ``ValueError``, ...), the
    answer is that item's parse error, retried and reported, never an exception for the whole batch."""
    try:
        return parse(raw, *args)
    except JudgementParseError:
        raise
    except Exception as e:  # noqa: BLE001 - one answer must not fail the batch (reported, never a score)
        raise JudgementParseError(f"unreadable answer ({type(e).__name__}: {str(e)[:120]})") from None
