"""Profiles: which models and batch settings a setup uses. ``PREFMILL_PROFILE`` picks one (default ``tiny``).

A profile is a YAML file; a name resolves to ``pipelines/profiles/<name>.yaml``, anything else is a path.
``extends: <profile>`` starts from another profile; sections given here replace that profile's sections whole
(so a judge section never mixes two backends' settings).

The optional ``inputs`` section bounds what a prompt batch may bring in (``InputLimits``: image pixels and sides,
line bytes, JSON depth, text length); a profile without it gets the defaults, a key given there replaces only that
default, and an unknown key or a value that is not a positive integer is a ``ProfileError``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
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


@dataclass(frozen=True)
class InputLimits:
    """What one prompt batch may bring in: the profile's optional ``inputs`` section, these defaults when absent."""

    max_pixels: int = 16_777_216  # width x height of a source/reference image, read from its header (4096^2)
    min_image_side: int = 16  # the shorter side of a source/reference image, in pixels
    max_image_bytes: int = 32 << 20  # an image file larger than this is not read
    max_line_bytes: int = 256 << 10  # one JSONL line (one prompt row), in UTF-8 bytes
    max_json_depth: int = 32  # nesting of arrays/objects in one row (a prompt row needs 2)
    max_text_chars: int = 2000  # the prompt text after normalisation

    @classmethod
    def from_mapping(cls, section: Any) -> InputLimits:
        if section is None:
            return cls()
        if not isinstance(section, dict):
            raise ProfileError(f"inputs must be a mapping of limits, got {type(section).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ProfileError(f"inputs: unknown keys {unknown}; known: {known}")
        for key, value in section.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProfileError(f"inputs.{key} must be a positive integer, got {value!r}")
        return cls(**section)


def input_limits(settings: dict[str, Any] | None) -> InputLimits:
    """The ``inputs`` limits of a loaded profile (defaults for every key it does not give)."""
    return InputLimits.from_mapping((settings or {}).get("inputs"))


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
    try:
        input_limits(data)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc}") from exc
    return data


def load_profile(name_or_path: str | None = None) -> dict[str, Any]:
    """The profile as a fresh dict (callers may mutate it)."""
    name = name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    return copy.deepcopy(_load(str(profile_path(name))))
