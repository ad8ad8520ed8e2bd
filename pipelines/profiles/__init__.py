"""Profiles: which models and batch settings a setup uses. ``PREFMILL_PROFILE`` picks one (default ``tiny``).

A profile is a YAML file; a name resolves to ``pipelines/profiles/<name>.yaml``, anything else is a path.
``extends: <profile>`` starts from another profile; sections given here replace that profile's sections whole
(so a judge section never mixes two backends' settings).
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

PROFILE_ENV = "PREFMILL_PROFILE"
DEFAULT_PROFILE = "tiny"
PROFILE_DIR = Path(__file__).resolve().parent
REQUIRED_SECTIONS = ("generation", "judge", "clip", "rewards", "pairs", "corpora", "training", "eval")
TASKS = ("t2i", "edit", "multi_ref")


class ProfileError(ValueError):
    pass


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    candidate = PROFILE_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    raise ProfileError(f"unknown profile {name_or_path!r}: not one of {available_profiles()} and not a YAML file")


@lru_cache(maxsize=16)
def _load(path: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} is not a mapping")
    parent = data.pop("extends", None)
    if parent:
        if str(profile_path(parent)) == str(path):
            raise ProfileError(f"profile {path} extends itself")
        data = {**copy.deepcopy(_load(str(profile_path(parent)))), **data}
    missing = [s for s in REQUIRED_SECTIONS if s not in data]
    if missing:
        raise ProfileError(f"profile {path} lacks sections {missing}")
    generators = data["generation"].get("generators", {})
    absent = [t for t in TASKS if t not in generators]
    if absent:
        raise ProfileError(f"profile {path}: generation.generators lacks tasks {absent}")
    return data


def load_profile(name_or_path: str | None = None) -> dict[str, Any]:
    """The profile as a fresh dict (callers may mutate it)."""
    name = name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    return copy.deepcopy(_load(str(profile_path(name))))
