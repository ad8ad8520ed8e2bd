"""Candidate generation for one prompt-batch partition: plan K seeds per prompt, generate in batches, write
WebDataset shards of ``shard_size`` images each. A shard and its sidecar table are written atomically, so a run
that crashed resumes from the last whole shard and never generates or stores a candidate twice."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labelers.hashing import bytes_sha256, content_id

CANDIDATE_COLUMNS = (
    "candidate_id", "prompt_id", "generator_id", "seed", "params", "width", "height",
    "image_sha256", "shard", "key",
)


def reference_grid(images: list, width: int, height: int):
    """Tile reference images into one ``width`` x ``height`` image (how multi-reference prompts condition an
    image-edit model that takes a single source image)."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = max(1, width // cols), max(1, height // rows)
    grid = Image.new("RGB", (width, height), (127, 127, 127))
    for index, image in enumerate(images):
        tile = image.convert("RGB").resize((cell_w, cell_h))
        grid.paste(tile, ((index % cols) * cell_w, (index // cols) * cell_h))
    return grid


def plan_candidates(prompts: list[dict[str, Any]], generators: dict[str, dict[str, Any]],
                    seeds_per_prompt: int, base_seed: int) -> list[dict[str, Any]]:
    """One planned candidate per (prompt, seed). ``generators`` maps task -> {"generator_id", "params"}."""
    import json

    plan = []
    for prompt in prompts:
        gen = generators[prompt["task"]]
        params_json = json.dumps(gen["params"], sort_keys=True)
        for index in range(seeds_per_prompt):
            seed = base_seed + index
            plan.append({
                "candidate_id": content_id("candidate", prompt["prompt_id"], gen["generator_id"], seed, gen["params"]),
                "prompt_id": prompt["prompt_id"],
                "task": prompt["task"],
                "generator_id": gen["generator_id"],
                "seed": seed,
                "params": params_json,
            })
    return plan


def _shard_tables(shard_dir: Path):
    return sorted(shard_dir.glob("[0-9]" * 6 + ".parquet"))


def remove_partition_temps(shard_dir: Path, started_at: float | None = None,
                           log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what killed writers left in ``shard_dir``: half-written shards and sidecar tables
    (``.NNNNNN.tar.tmp-<pid>@<host>.*.tmp``, ``.NNNNNN.parquet...``), and in the partition folder above a
    ``shards`` folder, the temp of ``candidates.parquet``. Only temps whose owner process is gone (or, naming
    none, that are older than ``started_at``) go: see :func:`pipelines.io.remove_stale_temps`."""
    from pipelines.io import remove_stale_temps

    removed = remove_stale_temps(shard_dir, started_at, log)
    if shard_dir.name == "shards":
        removed += remove_stale_temps(shard_dir.parent, started_at, log)
    return removed


def load_done(shard_dir: Path):
    """Candidates already stored (from the sidecar tables of whole shards). Orphan tars (a crash between the tar
    and its sidecar) are removed so their number is reused."""
    import polars as pl

    if not shard_dir.exists():
        return pl.DataFrame(schema=_schema())
    tables = _shard_tables(shard_dir)
    with_table = {p.stem for p in tables}
    for tar in shard_dir.glob("[0-9]" * 6 + ".tar"):
        if tar.stem not in with_table:
            tar.unlink()
    if not tables:
        return pl.DataFrame(schema=_schema())
    return pl.concat([pl.read_parquet(p) for p in tables], how="vertical")


def _schema():
    import polars as pl

    return {
        "candidate_id": pl.String, "prompt_id": pl.String, "generator_id": pl.String, "seed": pl.Int64,
        "params": pl.String, "width": pl.Int64, "height": pl.Int64, "image_sha256": pl.String,
        "shard": pl.String, "key": pl.String,
    }


def generate_partition(
    plan: list[dict[str, Any]],
    prompts_by_id: dict[str, dict[str, Any]],
    make_requests: Callable[[list[dict[str, Any]]], dict[str, list]],
    generate: Callable[[str, list], list],
    shard_dir: Path,
    shard_size: int,
    log: Callable[[str], None] = print,
):
    """Generate every planned candidate not yet stored. ``make_requests`` groups a chunk of the plan by task
    into generation requests; ``generate(task, requests)`` returns PIL images in order. Returns the candidates
    table for the whole plan (in plan order) and how many were generated now."""
    import polars as pl

    from pipelines.io import encode_image, write_parquet, write_shard

    shard_dir.mkdir(parents=True, exist_ok=True)
    remove_partition_temps(shard_dir, log=log)
    done = load_done(shard_dir)
    done_ids = set(done["candidate_id"].to_list())
    todo = [c for c in plan if c["candidate_id"] not in done_ids]
    next_number = max([int(p.stem) + 1 for p in _shard_tables(shard_dir)], default=0)
    if done_ids:
        log(f"resuming: {len(done_ids)} candidates already in {len(_shard_tables(shard_dir))} shards, {len(todo)} to go")
    for start in range(0, len(todo), shard_size):
        chunk = todo[start:start + shard_size]
        images: dict[str, Any] = {}
        for task, requests in make_requests(chunk).items():
            for request, image in zip(requests, generate(task, requests), strict=True):
                images[request.key] = image
        shard_name = f"{next_number:06d}"
        rows, samples = [], []
        for cand in chunk:
            data = encode_image(images[cand["candidate_id"]], "png")
            image = images[cand["candidate_id"]]
            samples.append({"__key__": cand["candidate_id"], "png": data,
                            "json": {k: cand[k] for k in ("candidate_id", "prompt_id", "generator_id", "seed")}})
            rows.append({**{k: cand[k] for k in ("candidate_id", "prompt_id", "generator_id", "seed", "params")},
                         "width": image.width, "height": image.height, "image_sha256": bytes_sha256(data),
                         "shard": f"{shard_name}.tar", "key": cand["candidate_id"]})
        write_shard(shard_dir / f"{shard_name}.tar", samples)
        write_parquet(pl.DataFrame(rows, schema=_schema()), shard_dir / f"{shard_name}.parquet")
        log(f"shard {shard_name}.tar: {len(rows)} candidates")
        next_number += 1
    stored = load_done(shard_dir)
    order = pl.DataFrame({"candidate_id": [c["candidate_id"] for c in plan]}).with_row_index("_order")
    table = stored.join(order, on="candidate_id", how="inner").sort("_order").drop("_order")
    return table, len(todo)


def load_candidate_images(shard_dir: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """candidate_id -> PIL image, or the ``ValueError`` explaining why it could not be decoded."""
    from pipelines.io import decode_image, read_shard

    images: dict[str, Any] = {}
    for tar in sorted(shard_dir.glob("[0-9]" * 6 + ".tar")):
        for sample in read_shard(tar):
            key = sample["__key__"]
            if keys is not None and key not in keys:
                continue
            payload = sample.get("png") or sample.get("jpg")
            if payload is None:
                images[key] = ValueError(f"{tar.name}/{key}: no image member")
                continue
            try:
                images[key] = decode_image(payload)
            except ValueError as exc:
                images[key] = ValueError(f"{tar.name}/{key}: {exc}")
    return images
