"""Prompt batch ingestion: parse a JSONL batch file, validate every row, keep the good ones, count the rest.

A row that cannot be used is dropped with a reason and its line number; the batch fails only when nothing in it
can be read at all (missing file, not UTF-8 text, larger than ``MAX_BATCH_BYTES``), so one bad line never loses
the good ones. Whatever goes wrong inside one line — an exception nobody foresaw included (``row_error``) — drops
that line only.

Each check is a small step that returns the row or raises ``RowRefused(reason, detail)``; the reasons:

- the line: ``line_too_long``, ``json_too_deep``, ``malformed_json``, ``non_finite_number`` (``NaN``,
  ``Infinity``, a float that overflows), ``duplicate_key``, ``not_an_object``;
- the fields: ``unknown_task``, ``missing_text``, ``text_too_long``, ``control_character``, ``invalid_unicode``,
  ``bad_split``, ``bad_tags``, ``bad_references``, ``missing_source_image``;
- the images: ``path_outside_inbox``, ``missing_image``, ``bad_image``, ``image_too_large``, ``image_too_small``;
- the batch: ``duplicate_prompt``, ``split_conflict``; and ``row_error`` for anything else.

Text (the prompt and every tag) is normalised to NFC with its whitespace runs (any Unicode whitespace, U+2028
included) collapsed to one space; the zero-width space, word joiner and BOM (U+200B, U+2060, U+FEFF) are removed
(invisible, they only make one prompt look like two); a control character (C0 but tab/newline/CR, DEL, C1) or a
bidi embedding/override/isolate (U+202A–U+202E, U+2066–U+2069) refuses the row (``control_character``) — they are
never silently stripped, since they change what a prompt says or how it displays. ``prompt_id`` is the content hash
of the normalised text (and the images' bytes), so prompts differing only by whitespace or Unicode composition are
one prompt.

Lines are split on ``\\n`` only (a U+2028 inside a string is text, not a line break); a UTF-8 BOM at the start of
the file is accepted.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import os
import re
import stat
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.hashing import bytes_sha256, content_id
from pipelines.profiles import InputLimits

TASKS = ("t2i", "edit", "multi_ref")
SPLITS = ("train", "heldout")
REFERENCE_TYPES = ("subject", "style", "background", "pose", "object", "texture")
MAX_REFERENCES = 6
MAX_TEXT_CHARS = InputLimits.max_text_chars
MAX_IMAGE_BYTES = InputLimits.max_image_bytes
MAX_BATCH_BYTES = 64 << 20  # a batch file larger than this is refused rather than read into memory

PROMPT_COLUMNS = (
    "prompt_id", "task", "text", "source_image", "reference_images", "reference_types", "tags", "split",
)

# refused: C0 controls but tab/newline/CR, DEL, C1 controls, bidi embeddings/overrides/isolates
_REFUSED_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_REMOVED_CHARS = {0x200B: None, 0x2060: None, 0xFEFF: None}  # zero-width space, word joiner, BOM / ZWNBSP
# a JSON string (closed or not) or one bracket: one left-to-right pass, so the depth check is linear in the line
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class PromptFileError(ValueError):
    """The batch file as a whole cannot be read."""


class RowRefused(ValueError):
    """One row cannot be used: ``reason`` is the counted key, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class IngestResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "line N: reason: detail", for the run log / metadata
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {"line", "reason", "detail"} per dropped row
    sha256: str = ""  # of the batch file's bytes as read
    lines: int = 0  # non-blank lines seen

    def drop(self, line: int, reason: str, detail: str) -> None:
        self.drops[reason] += 1
        self.problems.append(f"line {line}: {reason}: {detail}")
        self.rejected.append({"line": line, "reason": reason, "detail": detail})


def _show(value: Any, limit: int = 60) -> str:
    """A user value inside a message: repr (so control characters and surrogates are escaped), bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- the file and lines

def decode_batch(data: bytes) -> str:
    """The batch file's text: UTF-8, a leading UTF-8 BOM accepted; anything else raises ``PromptFileError``."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            raise PromptFileError(f"not UTF-8 text: {name} (byte-order mark {bom.hex()}); save it as UTF-8")
    try:
        return data.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def split_lines(text: str) -> list[str]:
    """Lines on ``\\n`` only (``str.splitlines`` also breaks on U+2028, U+0085, \\v, \\f… inside JSON strings,
    which shifts every later line number); a trailing ``\\r`` (CRLF files) is dropped."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def json_depth(line: str, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays/objects in a JSON text, without parsing it (strings skipped)."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(line):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        elif token in "]}":
            depth -= 1
    return deepest


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise RowRefused("duplicate_key", f"key {_show(key)} appears more than once in one object")
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> Any:
    raise RowRefused("non_finite_number", f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RowRefused("non_finite_number", f"{_show(text, 30)} overflows a float")
    return value


def parse_line(line: str, limits: InputLimits | None = None) -> dict[str, Any]:
    """One JSONL line to a dict, or ``RowRefused``: bounded size and depth, strict JSON (no NaN/Infinity, no
    duplicate keys)."""
    limits = limits or InputLimits()
    if len(line) * 4 > limits.max_line_bytes and len(line.encode("utf-8", "surrogatepass")) > limits.max_line_bytes:
        raise RowRefused("line_too_long", f"{len(line.encode('utf-8', 'surrogatepass'))} bytes > "
                                          f"{limits.max_line_bytes} (inputs.max_line_bytes)")
    depth = json_depth(line, stop_above=limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise RowRefused("json_too_deep", f"nesting deeper than {limits.max_json_depth} (inputs.max_json_depth)")
    try:
        raw = json.loads(line, object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant,
                         parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise RowRefused("malformed_json", f"{exc.msg} at column {exc.colno}") from exc
    except RecursionError as exc:  # the depth check should have caught it; never let it escape
        raise RowRefused("json_too_deep", "nesting too deep to parse") from exc
    except RowRefused:
        raise
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise RowRefused("malformed_json", str(exc)[:200]) from exc
    if not isinstance(raw, dict):
        raise RowRefused("not_an_object", f"not a JSON object (a {type(raw).__name__})")
    return raw


# ---------------------------------------------------------------------------------------------------- the fields

def normalise_text(value: str, what: str = "text") -> str:
    """NFC, zero-width characters removed, whitespace runs collapsed; control/bidi characters and unpaired
    surrogates refuse the row."""
    bad = _SURROGATES.search(value)
    if bad:
        raise RowRefused("invalid_unicode", f"{what} holds an unpaired surrogate U+{ord(bad.group()):04X} "
                                            f"at character {bad.start()}")
    bad = _REFUSED_CHARS.search(value)
    if bad:
        raise RowRefused("control_character", f"{what} holds U+{ord(bad.group()):04X} "
                                              f"({unicodedata.name(bad.group(), 'control')}) at character {bad.start()}")
    return " ".join(unicodedata.normalize("NFC", value.translate(_REMOVED_CHARS)).split())


def _string_list(value: Any, reason: str, what: str) -> list:
    """``None``/absent is an empty list; anything but a list is refused."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowRefused(reason, f"{what} must be a list, got {type(value).__name__}")
    return value


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _resolve_image(ref: Any, base: Path, images_out: Path, root: Path | None = None,
                   limits: InputLimits | None = None) -> tuple[str, str]:
    """Check an image reference and copy it into the partition under its content hash. Returns (path, sha256).

    The reference is a path relative to the batch file's folder (``base``); after following every symlink it must
    lie inside ``root`` (the inbox; default ``base``): an absolute path, ``..`` out of the inbox or a symlink to
    elsewhere is ``path_outside_inbox``. The header's size is checked before anything is decoded."""
    from PIL import Image

    from pipelines.io import atomic_path, decode_image, encode_image

    limits = limits or InputLimits()
    if not isinstance(ref, str) or not ref.strip():
        raise RowRefused("bad_image", f"an image reference must be a non-empty string, got {_show(ref)}")
    if "://" in ref:
        raise RowRefused("bad_image", f"remote image references are not fetched: {_show(ref)}")
    if "\x00" in ref or _SURROGATES.search(ref):
        raise RowRefused("bad_image", f"not a usable path: {_show(ref)}")
    if os.path.isabs(ref):
        raise RowRefused("path_outside_inbox", f"{_show(ref)} is an absolute path; give it relative to the batch file")
    root_real = Path(os.path.realpath(root if root is not None else base))
    try:
        real = Path(os.path.realpath(base / ref))
    except (OSError, ValueError) as exc:
        raise RowRefused("bad_image", f"{_show(ref)}: {exc}") from exc
    if not _inside(real, root_real):
        raise RowRefused("path_outside_inbox", f"{_show(ref)} resolves to {_show(str(real), 120)}, outside "
                                               f"{_show(str(root_real), 120)}")
    try:
        info = os.stat(real)
    except FileNotFoundError as exc:
        raise RowRefused("missing_image", f"image not found: {_show(ref)}") from exc
    except (OSError, ValueError) as exc:
        raise RowRefused("bad_image", f"{_show(ref)} cannot be read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise RowRefused("bad_image", f"{_show(ref)} is not a regular file")
    if info.st_size > limits.max_image_bytes:
        raise RowRefused("image_too_large", f"{_show(ref)}: {info.st_size} bytes > {limits.max_image_bytes} "
                                            f"(inputs.max_image_bytes)")
    try:
        with open(real, "rb") as handle:
            data = handle.read(limits.max_image_bytes + 1)
    except OSError as exc:
        raise RowRefused("bad_image", f"{_show(ref)} cannot be read: {exc}") from exc
    if len(data) > limits.max_image_bytes:
        raise RowRefused("image_too_large", f"{_show(ref)}: more than {limits.max_image_bytes} bytes")
    # the header only: width x height before a single pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
    except Image.DecompressionBombError as exc:
        raise RowRefused("image_too_large", f"{_show(ref)}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a file that is no image
        raise RowRefused("bad_image", f"{_show(ref)}: undecodable image: {type(exc).__name__}: {exc}") from exc
    if width * height > limits.max_pixels:
        raise RowRefused("image_too_large", f"{_show(ref)}: {width}x{height} = {width * height} pixels > "
                                            f"{limits.max_pixels} (inputs.max_pixels)")
    if min(width, height) < limits.min_image_side:
        raise RowRefused("image_too_small", f"{_show(ref)}: {width}x{height}, a side below "
                                            f"{limits.min_image_side} px (inputs.min_image_side)")
    try:
        rgb = decode_image(data, max_pixels=limits.max_pixels)
    except ValueError as exc:
        reason = "image_too_large" if str(exc).startswith("image too large") else "bad_image"
        raise RowRefused(reason, f"{_show(ref)}: {exc}") from exc
    sha = bytes_sha256(data)
    if rgb.info.get("converted"):
        # PIL's plain convert("RGB") — what the downstream readers do — would get this image wrong (16 bit,
        # transparency, CMYK profile, EXIF rotation): store the faithful 8-bit RGB decoding instead of the bytes
        target, payload = images_out / f"{sha[:32]}.png", None
    else:
        suffix = real.suffix.lower()
        target, payload = images_out / f"{sha[:32]}{suffix if suffix in _IMAGE_SUFFIXES else '.img'}", data
    if not target.exists():
        with atomic_path(target) as tmp:
            tmp.write_bytes(payload if payload is not None else encode_image(rgb, "png"))
    return str(target), sha


def _validate_row(raw: Any, base: Path, images_out: Path, root: Path | None = None,
                  limits: InputLimits | None = None) -> tuple[dict[str, Any] | None, str, str]:
    """Returns (row, "", "") or (None, reason, detail)."""
    try:
        return _checked_row(raw, base, images_out, root, limits or InputLimits()), "", ""
    except RowRefused as exc:
        return None, exc.reason, exc.detail


def _checked_row(raw: Any, base: Path, images_out: Path, root: Path | None, limits: InputLimits) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RowRefused("not_an_object", f"expected a JSON object, got {type(raw).__name__}")
    task = raw.get("task")
    if not isinstance(task, str) or task not in TASKS:
        raise RowRefused("unknown_task", f"task {_show(task)} is not one of {TASKS}")
    text = raw.get("text")
    if not isinstance(text, str):
        raise RowRefused("missing_text", f"text must be a non-empty string, got {type(text).__name__}")
    text = normalise_text(text)
    if not text:
        raise RowRefused("missing_text", "text must be a non-empty string")
    if len(text) > limits.max_text_chars:
        raise RowRefused("text_too_long", f"{len(text)} characters > {limits.max_text_chars} (inputs.max_text_chars)")
    split = raw.get("split")
    split = "train" if split is None else split
    if not isinstance(split, str) or split not in SPLITS:
        raise RowRefused("bad_split", f"split {_show(split)} is not one of {SPLITS}")
    tags = _string_list(raw.get("tags"), "bad_tags", "tags")
    if not all(isinstance(t, str) for t in tags):
        raise RowRefused("bad_tags", "tags must be a list of strings")
    tags = [normalise_text(t, "a tag") for t in tags]
    refs = _string_list(raw.get("reference_images"), "bad_references", "reference_images")
    ref_types = _string_list(raw.get("reference_types"), "bad_references", "reference_types")
    source = raw.get("source_image")
    if source is not None and not isinstance(source, str):
        raise RowRefused("bad_image", f"source_image must be a path string, got {type(source).__name__}")
    if task == "edit" and not source:
        raise RowRefused("missing_source_image", "an edit prompt needs source_image")
    if task == "multi_ref":
        if not 1 <= len(refs) <= MAX_REFERENCES:
            raise RowRefused("bad_references", f"multi_ref needs 1..{MAX_REFERENCES} reference_images, got {len(refs)}")
        if len(ref_types) != len(refs):
            raise RowRefused("bad_references", f"{len(refs)} reference_images but {len(ref_types)} reference_types")
        unknown = [t for t in ref_types if not isinstance(t, str) or t not in REFERENCE_TYPES]
        if unknown:
            raise RowRefused("bad_references", f"unknown reference_types {_show(unknown)}; known: {REFERENCE_TYPES}")
    source_path, source_sha = _resolve_image(source, base, images_out, root, limits) if task == "edit" else (None, None)
    resolved = [_resolve_image(r, base, images_out, root, limits) for r in refs] if task == "multi_ref" else []
    types = list(ref_types) if task == "multi_ref" else []
    return {
        "prompt_id": content_id("prompt", task, text, source_sha, [sha for _, sha in resolved], types),
        "task": task,
        "text": text,
        "source_image": source_path,
        "reference_images": [p for p, _ in resolved],
        "reference_types": types,
        "tags": tags,
        "split": split,
    }


# ------------------------------------------------------------------------------------------------------ the batch

def ingest_prompt_file(path: Path, images_out: Path, *, root: Path | None = None, limits: InputLimits | None = None,
                       known_splits: dict[str, tuple[str, str]] | None = None) -> IngestResult:
    """Parse and validate one JSONL batch file. Images are copied to ``images_out`` under their content hash.

    ``root``: the inbox the batch file and every image it names must lie in, after following symlinks (default:
    the batch file's folder). ``limits``: the profile's ``inputs`` (defaults when None). ``known_splits``:
    prompt_id -> (split, where) of prompts already ingested elsewhere (other partitions); a row whose prompt is
    there under the other split is refused (``split_conflict``), as is a later line repeating an earlier line's
    prompt under the other split — the first one ingested keeps it, so no prompt is ever in both splits."""
    path = Path(path)
    limits = limits or InputLimits()
    if root is not None:
        root_real = Path(os.path.realpath(root))
        real = Path(os.path.realpath(path))
        if not _inside(real, root_real):
            raise PromptFileError(f"path_outside_inbox: {_show(str(path), 200)} resolves to {_show(str(real), 200)},"
                                  f" outside the inbox {_show(str(root_real), 200)}")
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise PromptFileError(f"prompt batch file not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise PromptFileError(f"{path}: cannot be read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise PromptFileError(f"{path}: not a regular file")
    if info.st_size > MAX_BATCH_BYTES:
        raise PromptFileError(f"{path}: {info.st_size} bytes, more than the {MAX_BATCH_BYTES} a batch file may have")
    with open(path, "rb") as handle:
        data = handle.read(MAX_BATCH_BYTES + 1)
    if len(data) > MAX_BATCH_BYTES:
        raise PromptFileError(f"{path}: more than the {MAX_BATCH_BYTES} bytes a batch file may have")
    try:
        text = decode_batch(data)
    except PromptFileError as exc:
        raise PromptFileError(f"{path}: {exc}") from exc
    result = IngestResult(sha256=bytes_sha256(data))
    known_splits = known_splits or {}
    seen: dict[str, tuple[int, str]] = {}  # prompt_id -> (line, split) of the line that kept it
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        result.lines += 1
        try:
            row = _checked_row(parse_line(line, limits), path.parent, images_out, root, limits)
            pid = row["prompt_id"]
            if pid in seen:
                first, split = seen[pid]
                if split != row["split"]:
                    raise RowRefused("split_conflict", f"the prompt of line {first} (split {split!r}) again with split "
                                                       f"{row['split']!r}; the first line keeps it")
                raise RowRefused("duplicate_prompt", f"same content as line {first} (prompt_id {pid})")
            other = known_splits.get(pid)
            if other is not None and other[0] != row["split"]:
                raise RowRefused("split_conflict", f"prompt_id {pid} is already ingested with split {other[0]!r} "
                                                   f"({other[1]}); refused here as {row['split']!r}")
        except RowRefused as exc:
            result.drop(number, exc.reason, exc.detail)
            continue
        except Exception as exc:  # noqa: BLE001 - nothing one row does may fail the batch
            try:
                message = f"{type(exc).__name__}: {exc}"
            except Exception:  # noqa: BLE001
                message = type(exc).__name__
            result.drop(number, "row_error", repr(message)[1:-1][:300])
            continue
        seen[pid] = (number, row["split"])
        result.rows.append(row)
    return result


def prompts_frame(rows: list[dict[str, Any]]):
    import polars as pl

    schema = {
        "prompt_id": pl.String, "task": pl.String, "text": pl.String, "source_image": pl.String,
        "reference_images": pl.List(pl.String), "reference_types": pl.List(pl.String),
        "tags": pl.List(pl.String), "split": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)
