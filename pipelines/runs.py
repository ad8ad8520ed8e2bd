"""Training runs as directories: ``runs/<trainer>/<run key>/`` holding the config, the trainer's outputs and
``result.json``. The run key hashes the input version and the config, so an unchanged input never retrains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labelers.hashing import content_id
from pipelines.paths import Layout


def run_dir(layout: Layout, trainer: str, inputs: dict[str, Any], config: dict[str, Any]) -> Path:
    return layout.run_root(trainer) / content_id("run", trainer, inputs, config)[:16]


def finished_result(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def latest_run(layout: Layout, trainer: str) -> Path | None:
    pointer = layout.run_root(trainer) / "latest"
    if not pointer.exists():
        return None
    directory = layout.run_root(trainer) / pointer.read_text().strip()
    return directory if finished_result(directory) else None


def point_latest(layout: Layout, trainer: str, directory: Path) -> None:
    from pipelines.io import atomic_path

    with atomic_path(layout.run_root(trainer) / "latest") as tmp:
        tmp.write_text(Path(directory).name + "\n")
