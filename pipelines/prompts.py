"""Prompt batch ingestion: parse a JSONL batch file, validate every row, keep the good ones, count the rest.

A row that cannot be used is dropped with a reason and its line number; the batch fails only when nothing in it
can be read at all (missing file, not UTF-8 text), so one bad line never loses the good ones.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelers.hashing import bytes_sha256, content_id

TASKS = ("t2i", "edit", "multi_ref")
SPLITS = ("train", "heldout")
REFERENCE_TYPES = ("subject", "style", "background", "pose", "object", "texture")
MAX_REFERENCES = 6
MAX_TEXT_CHARS = 2000
MAX_IMAGE_BYTES = 32 << 20

PROMPT_COLUMNS = (
    "prompt_id", "task", "text", "source_image", "reference_images", "reference_types", "tags", "split",
)


class PromptFileError(ValueError):
    """The batch file as a whole cannot be read."""


@dataclass
class IngestResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    drops: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # "line N: reason: detail", for the run log / metadata

    def drop(self, line: int, reason: str, detail: str) -> None:
        self.drops[reason] += 1
        self.problems.append(f"line {line}: {reason}: {detail}")


def _resolve_image(ref: Any, base: Path, images_out: Path) -> tuple[str, str]:
    """Check an image reference, copy it into the partition under its content hash. Returns (path, sha256)."""
    from pipelines.io import decode_image

    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"image reference must be a non-empty string, got {ref!r}")
    if "://" in ref:
        raise ValueError(f"remote image references are not fetched: {ref!r}")
    path = (base / ref).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {ref!r} (resolved to {path})")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image {ref!r} is larger than {MAX_IMAGE_BYTES} bytes")
    data = path.read_bytes()
    decode_image(data)  # raises ValueError naming the problem
    sha = bytes_sha256(data)
    target = images_out / f"{sha[:32]}{path.suffix.lower() if path.suffix.lower() in ('.png', '.jpg', '.jpeg', '.webp') else '.img'}"
    if not target.exists():
        images_out.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
    return str(target), sha


def _validate_row(raw: Any, base: Path, images_out: Path) -> tuple[dict[str, Any] | None, str, str]:
    """Returns (row, "", "") or (None, reason, detail)."""
    if not isinstance(raw, dict):
        return None, "not_an_object", f"expected a JSON object, got {type(raw).__name__}"
    task = raw.get("task")
    if task not in TASKS:
        return None, "unknown_task", f"task {task!r} is not one of {TASKS}"
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        return None, "missing_text", "text must be a non-empty string"
    if len(text) > MAX_TEXT_CHARS:
        return None, "text_too_long", f"{len(text)} characters > {MAX_TEXT_CHARS}"
    split = raw.get("split", "train")
    if split not in SPLITS:
        return None, "bad_split", f"split {split!r} is not one of {SPLITS}"
    tags = raw.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None, "bad_tags", "tags must be a list of strings"
    refs = raw.get("reference_images") or []
    ref_types = raw.get("reference_types") or []
    if not isinstance(refs, list) or not isinstance(ref_types, list):
        return None, "bad_references", "reference_images and reference_types must be lists"
    source = raw.get("source_image")
    if task == "edit" and not source:
        return None, "missing_source_image", "an edit prompt needs source_image"
    if task == "multi_ref":
        if not 1 <= len(refs) <= MAX_REFERENCES:
            return None, "bad_references", f"multi_ref needs 1..{MAX_REFERENCES} reference_images, got {len(refs)}"
        if len(ref_types) != len(refs):
            return None, "bad_references", f"{len(refs)} reference_images but {len(ref_types)} reference_types"
        unknown = [t for t in ref_types if t not in REFERENCE_TYPES]
        if unknown:
            return None, "bad_references", f"unknown reference_types {unknown}; known: {REFERENCE_TYPES}"
    try:
        source_path, source_sha = _resolve_image(source, base, images_out) if task == "edit" else (None, None)
        resolved = [_resolve_image(r, base, images_out) for r in refs] if task == "multi_ref" else []
    except FileNotFoundError as exc:
        return None, "missing_image", str(exc)
    except ValueError as exc:
        return None, "bad_image", str(exc)
    prompt_id = content_id("prompt", task, text, source_sha, [sha for _, sha in resolved], ref_types)
    row = {
        "prompt_id": prompt_id,
        "task": task,
        "text": text.strip(),
        "source_image": source_path,
        "reference_images": [p for p, _ in resolved],
        "reference_types": list(ref_types) if task == "multi_ref" else [],
        "tags": tags,
        "split": split,
    }
    return row, "", ""


def ingest_prompt_file(path: Path, images_out: Path) -> IngestResult:
    """Parse and validate one JSONL batch file. Images are copied to ``images_out`` under their content hash."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt batch file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc})") from exc
    result = IngestResult()
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            result.drop(number, "malformed_json", f"{exc.msg} at column {exc.colno}")
            continue
        row, reason, detail = _validate_row(raw, path.parent, images_out)
        if row is None:
            result.drop(number, reason, detail)
            continue
        if row["prompt_id"] in seen:
            result.drop(number, "duplicate_prompt", f"same content as an earlier line (prompt_id {row['prompt_id']})")
            continue
        seen.add(row["prompt_id"])
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
