"""rl_prompt_pool: the prompts GRPO samples from, with difficulty statistics from their labels."""


import dagster as dg

from assets._metadata import counts_md, histogram_md, path_md
from assets.labels import reward_labels
from pipelines.resources import StorageResource

# GRPO samples from text with the text-to-image model; edit prompts need an edit policy (not trained here yet).
RL_TASKS = ("t2i", "multi_ref")


@dg.asset(deps=[reward_labels], group_name="corpora", kinds={"parquet"})
def rl_prompt_pool(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Every labelled prompt of an RL task with its candidates' mean and spread of reward and its mean raw
    similarity (the easiness DyRef's DAR down-weights). Held-out prompts stay in, marked, for model selection."""
    import polars as pl

    from pipelines.catalog import finished_partitions, load_prompts
    from pipelines.io import write_parquet

    layout = storage.layout
    partitions = finished_partitions(layout, "reward_labels", "labels.parquet")
    if not partitions:
        raise dg.Failure("rl_prompt_pool: no labelled partitions yet; materialize reward_labels first")
    prompts = load_prompts(layout, partitions).filter(pl.col("task").is_in(list(RL_TASKS)))
    labels = pl.concat([pl.read_parquet(layout.labels(p)) for p in partitions], how="diagonal_relaxed")
    ok = labels.filter(pl.col("status") == "ok").with_columns(
        pl.coalesce("clip_i", "clip_t").alias("raw_similarity"))
    stats = ok.group_by("prompt_id").agg(
        pl.len().alias("num_labelled"),
        pl.col("reward").mean().alias("reward_mean"),
        pl.col("reward").std().fill_null(0.0).alias("reward_std"),
        pl.col("raw_similarity").mean().alias("difficulty_easiness"),
    )
    pool = prompts.join(stats, on="prompt_id", how="left").with_columns(
        pl.col("reference_images").list.len().alias("n_refs"),
        (1.0 - pl.col("difficulty_easiness").fill_null(0.0)).alias("difficulty"),
    )
    path = write_parquet(pool, layout.asset_dir("rl_prompt_pool") / "pool.parquet")
    return dg.MaterializeResult(metadata={
        "num_prompts": len(pool),
        "by_task": counts_md(dict(pool.group_by("task").len().iter_rows()), "task"),
        "by_split": counts_md(dict(pool.group_by("split").len().iter_rows()), "split"),
        "difficulty_histogram": histogram_md(pool["difficulty"].to_list()),
        "path": path_md(path),
    })
