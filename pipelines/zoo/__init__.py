"""The offline tiny model zoo: randomly initialised models in the standard ``save_pretrained`` layouts.

``build_zoo()`` writes each component into ``zoo_root()/<name>`` once; ``resolve_model("zoo:<name>")`` turns a
profile's model reference into that directory (building just that component if it is missing). Any other
reference (a local directory, a hub id) passes through unchanged, so a real checkpoint is a drop-in replacement.

Layout and crash safety: a component is built into a temporary sibling (``.<name>.tmp-<pid>``), a ``.complete``
marker (JSON: zoo version, builder) is written inside it, then it is renamed into place. A directory without a
current marker is never used. ``root/.lock`` (fcntl) serialises builders across processes.

This module is imported by Dagster code that must load fast: it imports nothing heavy at top level.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ZOO_VERSION = "4"
ZOO_PREFIX = "zoo:"
MARKER = ".complete"
ZOO_COMPONENTS = ("t2i", "edit", "judge", "clip", "sdxl", "sd3", "flux", "flux_kontext", "qwen_image",
                  "qwen_image_edit", "janus")

# name -> "module:function"; builders take the (existing, empty) output directory.
_BUILDERS: dict[str, str] = {
    "t2i": "pipelines.zoo.diffusion:build_t2i",
    "edit": "pipelines.zoo.diffusion:build_edit",
    "judge": "pipelines.zoo.judge:build_judge",
    "clip": "pipelines.zoo.clip:build_clip",
    "sdxl": "pipelines.zoo.families:build_sdxl",
    "sd3": "pipelines.zoo.families:build_sd3",
    "flux": "pipelines.zoo.families:build_flux",
    "flux_kontext": "pipelines.zoo.families:build_flux_kontext",
    "qwen_image": "pipelines.zoo.families:build_qwen_image",
    "qwen_image_edit": "pipelines.zoo.families:build_qwen_image_edit",
    "janus": "pipelines.zoo.janus:build_janus",  # autoregressive VQ-token t2i (Janus-Pro layout)
    # trained on the proving ground's world; built on first use of zoo:<name>, never by `make zoo`
    "world_gen": "pipelines.zoo.trained:build_world_gen",
    "world_edit": "pipelines.zoo.trained:build_world_edit",
    "world_clip": "pipelines.zoo.trained:build_world_clip",
    "world_judge": "pipelines.zoo.trained:build_world_judge",
}
TRAINED_COMPONENTS = ("world_gen", "world_edit", "world_clip", "world_judge")


def zoo_root() -> Path:
    """``$PREFMILL_ZOO`` or ``<repo root>/.zoo`` (repo root = the parent of the ``pipelines`` package)."""
    env = os.environ.get("PREFMILL_ZOO")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / ".zoo"


def component_path(name: str, root: Path | None = None) -> Path:
    _check_name(name)
    return Path(root or zoo_root()).resolve() / name


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a component built by the current ``ZOO_VERSION`` (and, for one built from shipped
    trained files, from the files shipped now)."""
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text())
        if data.get("zoo_version") != ZOO_VERSION:
            return False
        shipped = (data.get("build") or {}).get("manifest_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    if shipped:  # built from shipped trained files: out of date once they change (a pull, a re-ship)
        from pipelines.zoo.trained import manifest_sha256

        return shipped == manifest_sha256(str(data.get("name")))
    return True


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo component {name!r}; known: {', '.join(ZOO_COMPONENTS + TRAINED_COMPONENTS)}")


def _builder(name: str):
    module_name, func_name = _BUILDERS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_one(name: str, root: Path) -> Path:
    """Build ``name`` into a temporary sibling and rename it into place. Caller holds the lock."""
    target = root / name
    # Leftovers of crashed builds: safe to delete, since we hold the lock.
    for stale in root.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        started = time.time()
        builder = _builder(name)
        info = builder(tmp)
        marker = {
            "zoo_version": ZOO_VERSION,
            "name": name,
            "builder": _BUILDERS[name],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.time() - started, 3),
        }
        if isinstance(info, dict):  # what a trained component's builder reports (its eval numbers)
            marker["build"] = info
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        from pipelines.io import replace_dir  # fsync, move an outdated one aside, swap in (one helper)

        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_zoo(root: Path | None = None, force: bool = False, only: Iterable[str] | str | None = None) -> dict[str, Path]:
    """Build the zoo components (all, or those named in ``only``) under ``root``; returns name -> directory.

    Components whose ``.complete`` marker carries the current ``ZOO_VERSION`` are skipped unless ``force``.
    """
    root = Path(root or zoo_root()).resolve()
    names = list(ZOO_COMPONENTS) if only is None else ([only] if isinstance(only, str) else list(only))
    for name in names:
        _check_name(name)
    out: dict[str, Path] = {}
    with _locked(root):
        for name in names:
            target = root / name
            if not force and is_complete(target):
                out[name] = target
                continue
            out[name] = _build_one(name, root)
    return out


def resolve_model(ref: str) -> str:
    """``"zoo:<name>"`` -> absolute path of that zoo component (built if missing); anything else unchanged."""
    if not isinstance(ref, str) or not ref.startswith(ZOO_PREFIX):
        return ref
    name = ref[len(ZOO_PREFIX) :].strip().strip("/")
    target = component_path(name)
    if not is_complete(target):
        target = build_zoo(only=[name])[name]
    return str(target)


def component_stats(path: Path) -> dict[str, int]:
    """Parameter count (from safetensors headers, no torch needed) and size on disk of a component directory."""
    params = 0
    size = 0
    for f in Path(path).rglob("*"):
        if not f.is_file():
            continue
        size += f.stat().st_size
        if f.suffix == ".safetensors":
            params += _safetensors_numel(f)
    return {"parameters": params, "bytes": size}


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    total = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for d in meta.get("shape", []):
            count *= int(d)
        total += count
    return total


__all__ = [
    "ZOO_COMPONENTS",
    "ZOO_VERSION",
    "build_zoo",
    "component_path",
    "component_stats",
    "is_complete",
    "resolve_model",
    "zoo_root",
]
