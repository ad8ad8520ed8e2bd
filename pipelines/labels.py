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


def remove_label_temps(parts_dir: Path, out_path: Path, started_at: float | None = None,
                       log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temps killed writers left: half-written label parts in ``parts_dir`` and, beside ``out_path``,
    those of ``labels.parquet`` and the partition's other tables (embeddings). Only temps whose owner process
    is gone (or, naming none, older than ``started_at``): :func:`pipelines.io.remove_stale_temps`."""
    from pipelines.io import remove_stale_temps

    return remove_stale_temps(parts_dir, started_at, log) + remove_stale_temps(out_path.parent, started_at, log)


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
    remove_label_temps(parts_dir, out_path, log=log)
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
    from labelers.oom import map_batches_with_oom_backoff

    parts_dir.mkdir(parents=True, exist_ok=True)
    fits = batch_size  # shrinks for good after an out-of-memory error
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        batch_images = {}
        for row in batch:
            image = images.get(row["candidate_id"], ValueError(f"candidate {row['candidate_id']} not in any shard"))
            batch_images[row["candidate_id"]] = image
        # A CUDA out-of-memory error labels the batch in smaller pieces (one part is still written per batch).
        labelled, fits = map_batches_with_oom_backoff(
            batch, fits, lambda rows: stage.process_batch(rows, batch_images, sources, references),
            on_shrink=lambda old, new: log(f"out of memory labelling {old} candidates at once; trying {new}"))
        write_parquet(pl.DataFrame(labelled, schema=label_schema()), parts_dir / f"{next_part:06d}.parquet")
        next_part += 1
        log(f"labelled {start + len(batch)}/{len(todo)}")
    done, _ = _load_parts(parts_dir)
    wanted = pl.DataFrame({"candidate_id": [r["candidate_id"] for r in rows], "judge_id": [r["judge_id"] for r in rows]})
    labels = wanted.join(done.unique(subset=["candidate_id", "judge_id"], keep="last"),
                         on=["candidate_id", "judge_id"], how="left")
    write_parquet(labels, out_path)
    return labels, len(todo)


def image_embeddings(path: Path, images: dict, scorer, log: Callable[[str], None] = print) -> dict:
    """candidate_id -> L2-normalised CLIP image embedding (float32) of every decodable image in ``images``,
    stored in ``path`` (parquet: candidate_id, embedding) for the corpora's near-duplicate filter; a stored table
    holding the same candidates is reused instead of embedding again."""
    import numpy as np
    import polars as pl

    from pipelines.io import write_parquet

    keys = sorted(k for k, image in images.items() if image is not None and not isinstance(image, Exception))
    if path.exists():
        stored = pl.read_parquet(path)
        if sorted(stored["candidate_id"].to_list()) == keys:
            return dict(zip(stored["candidate_id"].to_list(), np.asarray(stored["embedding"].to_list(), np.float32)))
    if not keys:
        return {}
    features = scorer.embed_images([images[k] for k in keys]).numpy().astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    write_parquet(pl.DataFrame({"candidate_id": keys, "embedding": features.tolist()},
                               schema={"candidate_id": pl.String, "embedding": pl.List(pl.Float32)}), path)
    log(f"embeddings: {len(keys)} images -> {path.name}")
    return dict(zip(keys, features))


def add_diversity(labels, partition: str, images: dict, scorer, state_dir: Path, decay: float,
                  log: Callable[[str], None] = print, features_by_id: dict | None = None):
    """Add the ``diversity`` column: each ok candidate's leave-one-out effect on the CLIP-feature FID of its
    partition against feature moments kept as an exponential moving average across partitions (the GRPO/LOO-FID
    paper's distribution-level reward). The moments are read and updated under a file lock, so partitions running
    side by side take turns; a partition's values are stored and reused, so a re-run neither recomputes them nor
    folds the partition into the moments twice. Non-ok rows and partitions with fewer than 3 ok images get null.
    ``features_by_id`` (from :func:`image_embeddings`) saves embedding the images again."""
    import fcntl

    import numpy as np
    import polars as pl

    from labelers.diversity import FeatureMoments, loo_fid_diversity
    from pipelines.io import write_parquet

    state_dir.mkdir(parents=True, exist_ok=True)
    stored_path = state_dir / "partitions" / f"{partition}.parquet"
    ok = labels.filter(pl.col("status") == "ok")
    keys = [k for k in ok["candidate_id"].to_list() if not isinstance(images.get(k), (Exception, type(None)))]
    if stored_path.exists():
        stored = pl.read_parquet(stored_path)
        if set(stored["candidate_id"].to_list()) == set(keys):
            log(f"diversity: reusing the values stored for partition {partition}")
            return labels.drop("diversity", strict=False).join(stored, on="candidate_id", how="left")
    values = np.full(len(keys), np.nan)
    if len(keys) >= 3:
        if features_by_id is not None and all(k in features_by_id for k in keys):
            features = np.stack([features_by_id[k] for k in keys]).astype(np.float64)
        else:
            features = scorer.embed_images([images[k] for k in keys]).numpy().astype(np.float64)
        moments_path = state_dir / "clip_feature_moments.safetensors"
        with open(state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reference = FeatureMoments.load(moments_path) if moments_path.exists() else None
            if reference is None or reference.dim != features.shape[1]:
                # The first partition (or a new feature space) is its own reference and starts the moments.
                reference = FeatureMoments.from_features(features)
                values = loo_fid_diversity(features, reference)
            else:
                values = loo_fid_diversity(features, reference)
                reference.ema_update(features, decay)
            reference.save(moments_path)
        log(f"diversity: {len(keys)} candidates against moments of {reference.count} features")
    stored = pl.DataFrame({"candidate_id": keys, "diversity": values}, schema={"candidate_id": pl.String,
                                                                              "diversity": pl.Float64})
    stored = stored.with_columns(pl.col("diversity").fill_nan(None))
    write_parquet(stored, stored_path)
    return labels.drop("diversity", strict=False).join(stored, on="candidate_id", how="left")
