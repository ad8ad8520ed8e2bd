"""Shared helpers of the asset tests: small prompt batches cut from the bundled samples."""

import json
from pathlib import Path

import pytest

from pipelines.paths import SAMPLES_DIR


def _sample_rows(task: str, split: str) -> list[dict]:
    """Every bundled sample row of one task and split, in file order, image paths made absolute (batch files
    resolve image paths against their own folder, so a copied row must not keep a relative one)."""
    rows = []
    for path in sorted(SAMPLES_DIR.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["task"] != task or row.get("split", "train") != split:
                continue
            if row.get("source_image"):
                row["source_image"] = str((path.parent / row["source_image"]).resolve())
            row["reference_images"] = [str((path.parent / r).resolve()) for r in row.get("reference_images") or []]
            rows.append(row)
    return rows


@pytest.fixture(scope="session")
def t2i_rows() -> list[dict]:
    """The bundled samples' text-to-image training prompts, in file order."""
    return _sample_rows("t2i", "train")


@pytest.fixture(scope="session")
def write_batch():
    """``write_batch(inbox, key, rows)``: the batch file ``<inbox>/<key>.jsonl`` (one partition)."""

    def write(inbox: Path, key: str, rows: list[dict]) -> Path:
        inbox.mkdir(parents=True, exist_ok=True)
        path = inbox / f"{key}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    return write
