"""Profiles: which models and batch settings a setup uses. ``PREFMILL_PROFILE`` picks one (default ``world``: the
tiny graph with the models trained on the procedural world; ``tiny`` is the random zoo the tests use).

A profile is a YAML file; a name resolves to ``pipelines/profiles/<name>.yaml``, anything else is a path.
``extends: <profile>`` starts from another profile; sections given here replace that profile's sections whole
(so a judge section never mixes two backends' settings).

The optional ``inputs`` section bounds what a prompt batch may bring in (``InputLimits``: image pixels and sides,
line bytes, JSON depth, text length); a profile without it gets the defaults, a key given there replaces only that
default, and an unknown key or a value that is not a positive integer is a ``ProfileError``.

Every profile is validated at load against the typed schema (:mod:`pipelines.profile_schema`, after ``extends:``):
an unknown or misspelt key, a wrong type, an unknown backend/strategy or a key the chosen backend does not use is a
``ProfileError`` listing each problem as ``path.to.key: problem`` (``did you mean 'x'?`` for a near miss).
``load_profile`` returns the validated settings as a plain dict with the schema's defaults filled in.
``python -m pipelines.cli check-profile FILE|NAME`` prints them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.profile_schema import TASKS, Inputs, ProfileProblems, resolve

PROFILE_ENV = "PREFMILL_PROFILE"
DEFAULT_PROFILE = "world"
PROFILE_DIR = Path(__file__).resolve().parent
REQUIRED_SECTIONS = ("generation", "judge", "clip", "rewards", "pairs", "corpora", "training", "eval")


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class InputLimits:
    """What one prompt batch may bring in: the profile's optional ``inputs`` section, these defaults when absent."""

    # the defaults live in the schema (pipelines.profile_schema.Inputs), with their docs
    max_pixels: int = Inputs.model_fields["max_pixels"].default  # source/reference width x height (4096^2)
    min_image_side: int = Inputs.model_fields["min_image_side"].default  # shorter side of a source/reference image
    max_image_bytes: int = Inputs.model_fields["max_image_bytes"].default  # a larger image file is not read
    max_line_bytes: int = Inputs.model_fields["max_line_bytes"].default  # one JSONL line (one prompt row), bytes
    max_json_depth: int = Inputs.model_fields["max_json_depth"].default  # nesting of arrays/objects in one row
    max_text_chars: int = Inputs.model_fields["max_text_chars"].default  # the prompt text after normalisation

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


def _stamp(path: str) -> tuple[int, int] | None:
    """(mtime in ns, size) of a profile file, None when it cannot be read: what the profile cache compares."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _merged(path: str, read: list[tuple[str, tuple[int, int] | None]] | None = None) -> dict[str, Any]:
    """The profile file with its ``extends:`` chain merged in (sections replace the parent's whole), unvalidated;
    each file's (path, stamp), taken before reading it, is appended to ``read``."""
    import yaml

    if read is not None:
        read.append((path, _stamp(path)))
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"profile {path} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} is not a mapping")
    parent = data.pop("extends", None)
    if parent:
        if not isinstance(parent, str):
            raise ProfileError(f"profile {path}: extends must be a profile name or path, got {parent!r}")
        if str(profile_path(parent)) == str(path):
            raise ProfileError(f"profile {path} extends itself")
        data = {**copy.deepcopy(_merged(str(profile_path(parent)), read)), **data}
    return data


def problems_message(path: str, problems: list[str]) -> str:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return (f"profile {path} is invalid ({count}; unknown keys, wrong types and unsupported values are errors):\n"
            + "\n".join(f"  {p}" for p in problems))


#: path -> (the (file, stamp) pairs of its extends chain, the resolved profile); a long-lived process (the code
#: server that evaluates sensors) sees an edited profile, or an edited parent, on its next load
_LOADED: dict[str, tuple[tuple[tuple[str, tuple[int, int] | None], ...], dict[str, Any]]] = {}


def _load(path: str) -> dict[str, Any]:
    cached = _LOADED.get(path)
    if cached is not None and all(_stamp(f) == stamp for f, stamp in cached[0]):
        return cached[1]
    read: list[tuple[str, tuple[int, int] | None]] = []
    resolved = _resolve_file(path, read)
    if len(_LOADED) >= 32:
        _LOADED.clear()
    _LOADED[path] = (tuple(read), resolved)
    return resolved


def _resolve_file(path: str, read: list[tuple[str, tuple[int, int] | None]]) -> dict[str, Any]:
    data = _merged(path, read)
    missing = [s for s in REQUIRED_SECTIONS if s not in data]
    if missing:
        raise ProfileError(f"profile {path} lacks sections {missing}")
    generation = data["generation"]
    generators = (generation.get("generators") if isinstance(generation, dict) else None) or {}
    absent = [t for t in TASKS if not isinstance(generators, dict) or t not in generators]
    if absent:
        raise ProfileError(f"profile {path}: generation.generators lacks tasks {absent}")
    try:
        resolved = resolve(data)
    except ProfileProblems as exc:
        raise ProfileError(problems_message(path, exc.problems)) from None
    try:
        input_limits(resolved)
    except ProfileError as exc:
        raise ProfileError(f"profile {path}: {exc}") from exc
    return resolved


def selected_profile(name_or_path: str | None = None) -> str:
    """The profile a caller means: ``name_or_path``, else ``$PREFMILL_PROFILE``, else :data:`DEFAULT_PROFILE`."""
    return name_or_path or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def load_profile(name_or_path: str | None = None) -> dict[str, Any]:
    """The validated profile as a fresh dict, the schema's defaults filled in (callers may mutate it); a
    ``ProfileError`` naming each bad key otherwise."""
    return copy.deepcopy(_load(str(profile_path(selected_profile(name_or_path)))))
