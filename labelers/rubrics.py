"""Versioned judge rubrics, one YAML file per task under ``labelers/rubrics/``.

A rubric file holds ``version``, ``task``, ``system`` (the judge's system prompt) and ``dimensions`` (a list of
``{name, description}``); every dimension is scored 0–5 with one sentence of feedback. ``Rubric.fingerprint`` is
a content hash of the *parsed* file (so comments and formatting do not matter, wording does): it goes into the
judge id, so changing a rubric changes the provenance of every label made with it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelers.hashing import content_id

RUBRIC_DIR = Path(__file__).resolve().parent / "rubrics"
TASKS: tuple[str, ...] = ("t2i", "edit", "multi_ref")
SCORE_MIN = 0
SCORE_MAX = 5
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class RubricError(ValueError):
    """A rubric file is missing or malformed."""


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str


@dataclass(frozen=True)
class Rubric:
    task: str
    version: int | str
    system: str
    dimensions: tuple[Dimension, ...]
    fingerprint: str

    @property
    def dimension_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)


def _parse(data: Any, source: str) -> Rubric:
    if not isinstance(data, dict):
        raise RubricError(f"{source}: a rubric must be a mapping, got {type(data).__name__}")
    missing = [k for k in ("version", "task", "system", "dimensions") if k not in data]
    if missing:
        raise RubricError(f"{source}: missing keys {missing}")
    dims_raw = data["dimensions"]
    if not isinstance(dims_raw, list) or not dims_raw:
        raise RubricError(f"{source}: 'dimensions' must be a non-empty list")
    dims: list[Dimension] = []
    for i, d in enumerate(dims_raw):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("description"), str):
            raise RubricError(f"{source}: dimension {i} must be a mapping with string 'name' and 'description'")
        if not _NAME_RE.match(d["name"]) or d["name"].endswith("_feedback"):
            raise RubricError(f"{source}: invalid dimension name {d['name']!r} (snake_case, not ending in _feedback)")
        dims.append(Dimension(name=d["name"], description=" ".join(d["description"].split())))
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise RubricError(f"{source}: duplicate dimension names {names}")
    if not isinstance(data["system"], str) or not data["system"].strip():
        raise RubricError(f"{source}: 'system' must be a non-empty string")
    return Rubric(
        task=str(data["task"]),
        version=data["version"],
        system=data["system"].strip(),
        dimensions=tuple(dims),
        fingerprint=content_id("rubric", data),
    )


def load_rubric_file(path: str | Path) -> Rubric:
    """Load a rubric from any YAML file (e.g. a profile's custom rubric)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RubricError(f"rubric file not found: {path}")
    with path.open("r", encoding="utf-8") as f:
        return _parse(yaml.safe_load(f), str(path))


@functools.lru_cache(maxsize=None)
def _load_cached(task: str, directory: str) -> Rubric:
    rubric = load_rubric_file(Path(directory) / f"{task}.yaml")
    if rubric.task != task:
        raise RubricError(f"{directory}/{task}.yaml declares task {rubric.task!r}")
    return rubric


def load_rubric(task: str, rubric_dir: str | Path | None = None) -> Rubric:
    """The rubric of ``task`` (``t2i``, ``edit``, ``multi_ref``), from ``rubric_dir`` or the bundled ones."""
    directory = Path(rubric_dir) if rubric_dir is not None else RUBRIC_DIR
    if rubric_dir is None and task not in TASKS:
        raise RubricError(f"unknown task {task!r}; known: {list(TASKS)}")
    return _load_cached(task, str(directory.resolve()))


def all_dimensions(tasks: tuple[str, ...] = TASKS, rubric_dir: str | Path | None = None) -> list[str]:
    """Union of the dimensions of ``tasks``, in task order then file order (stable label-table columns)."""
    seen: dict[str, None] = {}
    for task in tasks:
        for name in load_rubric(task, rubric_dir).dimension_names:
            seen.setdefault(name, None)
    return list(seen)
