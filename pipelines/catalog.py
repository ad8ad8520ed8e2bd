"""What is on disk: the partitions each stage has finished, and the tables downstream stages read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.paths import Layout


def finished_partitions(layout: Layout, asset: str, filename: str) -> list[str]:
    base = layout.asset_dir(asset)
    if not base.exists():
        return []
    return sorted(p.name for p in base.iterdir() if (p / filename).is_file())


def load_prompts(layout: Layout, partitions: list[str]):
    import polars as pl

    frames = [pl.read_parquet(layout.prompts(p)).with_columns(pl.lit(p).alias("partition")) for p in partitions
              if layout.prompts(p).exists()]
    if not frames:
        raise FileNotFoundError(f"no prompt_batches output under {layout.asset_dir('prompt_batches')}")
    return pl.concat(frames, how="vertical").unique(subset="prompt_id", keep="first", maintain_order=True)


def prompts_by_id(prompts) -> dict[str, dict[str, Any]]:
    return {row["prompt_id"]: row for row in prompts.iter_rows(named=True)}


def input_fingerprints(layout: Layout, partitions: list[str], files: list[str]) -> dict[str, str]:
    """partition -> sha256 of the named per-partition files, for corpus versions."""
    import hashlib

    from pipelines.io import file_sha256

    fingerprints = {}
    for partition in partitions:
        digest = hashlib.sha256()
        for name in files:
            path = layout.asset_dir(name.split("/")[0], partition) / name.split("/")[1]
            digest.update(file_sha256(path).encode())
        fingerprints[partition] = digest.hexdigest()
    return fingerprints


def load_images_for(layout: Layout, partitions: list[str], keys: set[str]) -> dict[str, Any]:
    from pipelines.candidates import load_candidate_images

    images: dict[str, Any] = {}
    for partition in partitions:
        shard_dir = layout.asset_dir("candidate_images", partition) / "shards"
        if shard_dir.exists():
            images.update(load_candidate_images(Path(shard_dir), keys))
    return images
