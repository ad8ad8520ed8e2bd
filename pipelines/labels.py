"""Labelling one partition in resumable parts: every ``batch_size`` candidates become one atomically written part
table, keyed by (candidate_id, judge_id); a re-run labels only what no part holds yet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _load_parts(parts_dir: Path):
    import polars as pl

    parts = sorted(parts_dir.glob("[0-9]" * 6 + ".parquet")) if parts_dir.exists() else []
    if not parts:
        return None, 0
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed"), int(parts[-1].stem) + 1


def label_partition(stage, candidates, prompts, shard_dir: Path, parts_dir: Path, out_path: Path,
                    batch_size: int, log: Callable[[str], None] = print):
    """Returns (labels table for every candidate, number labelled in this run)."""
    import polars as pl
    from PIL import Image

    from labelers.stage import label_schema
    from pipelines.candidates import load_candidate_images
    from pipelines.io import write_parquet

    prompts_by_id = {row["prompt_id"]: row for row in prompts.iter_rows(named=True)}
    rows = [{**cand, "task": prompts_by_id[cand["prompt_id"]]["task"], "text": prompts_by_id[cand["prompt_id"]]["text"]}
            for cand in candidates.select("candidate_id", "prompt_id").iter_rows(named=True)]
    for row in rows:
        row["judge_id"] = stage.judge_id_for(row["task"])
    done, next_part = _load_parts(parts_dir)
    done_keys = set(zip(done["candidate_id"].to_list(), done["judge_id"].to_list())) if done is not None else set()
    todo = [row for row in rows if (row["candidate_id"], row["judge_id"]) not in done_keys]
    if done_keys:
        log(f"resuming: {len(rows) - len(todo)} candidates already labelled, {len(todo)} to go")

    def open_rgb(path: str | None):
        if not path:
            return None
        with Image.open(path) as img:
            return img.convert("RGB")

    images = load_candidate_images(shard_dir, {row["candidate_id"] for row in todo}) if todo else {}
    sources = {pid: open_rgb(p["source_image"]) for pid, p in prompts_by_id.items()}
    references = {pid: [open_rgb(r) for r in p["reference_images"]] for pid, p in prompts_by_id.items()}
    parts_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        batch_images = {}
        for row in batch:
            image = images.get(row["candidate_id"], ValueError(f"candidate {row['candidate_id']} not in any shard"))
            batch_images[row["candidate_id"]] = image
        labelled = stage.process_batch(batch, batch_images, sources, references)
        write_parquet(pl.DataFrame(labelled, schema=label_schema()), parts_dir / f"{next_part:06d}.parquet")
        next_part += 1
        log(f"labelled {start + len(batch)}/{len(todo)}")
    done, _ = _load_parts(parts_dir)
    wanted = pl.DataFrame({"candidate_id": [r["candidate_id"] for r in rows], "judge_id": [r["judge_id"] for r in rows]})
    labels = wanted.join(done.unique(subset=["candidate_id", "judge_id"], keep="last"),
                         on=["candidate_id", "judge_id"], how="left")
    write_parquet(labels, out_path)
    return labels, len(todo)
