"""preference_pairs: Bradley-Terry pairs within each prompt's candidates."""


import dagster as dg

from assets._metadata import counts_md, histogram_md, path_md
from assets.labels import reward_labels
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import JudgeResource, ProfileResource, StorageResource


@dg.asset(partitions_def=prompt_batch_partitions, deps=[reward_labels], group_name="labelling", kinds={"parquet"},
          check_specs=[dg.AssetCheckSpec("no_duplicate_pairs", asset="preference_pairs", blocking=True,
                                         description="No pair_id twice and no two candidates paired twice (in "
                                                     "either order); chosen and rejected always differ.")])
def preference_pairs(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                     judge: JudgeResource) -> dg.MaterializeResult:
    """Pairs of one prompt's candidates. ``pairs.mode: pointwise`` (default) orders them by the aggregate reward,
    P(chosen≻rejected) = σ(Δr/τ); ``pairwise`` asks the judge to compare each pair in both orders (an
    order-inconsistent answer is a tie) and fits Bradley-Terry strengths per prompt to the verdicts. Held-out
    prompts never make pairs (they are for evaluation)."""
    import polars as pl

    from pipelines.io import write_parquet
    from pipelines.stages import judge_section, pair_selector_from_profile

    key = context.partition_key
    layout = storage.layout
    settings = profile.settings()
    selector = pair_selector_from_profile(settings["pairs"])
    mode = selector.mode
    labels = pl.read_parquet(layout.labels(key))
    prompts = pl.read_parquet(layout.prompts(key))
    candidates = pl.read_parquet(layout.candidates(key)).select("candidate_id", "image_sha256")
    labels = labels.join(candidates, on="candidate_id", how="left").join(
        prompts.select("prompt_id", "split"), on="prompt_id", how="left")
    heldout = labels.filter(pl.col("split") == "heldout")
    train = labels.filter(pl.col("split") != "heldout")
    extra: dict = {}
    if mode == "pointwise":
        pairs, drops = selector(train)
    elif mode == "pairwise":
        from labelers.diagnostics import position_bias_rate
        from pipelines.candidates import load_candidate_images

        images = load_candidate_images(layout.asset_dir("candidate_images", key) / "shards",
                                       set(train["candidate_id"].to_list()))
        pairs, drops, verdicts = selector(
            train, judge=judge.judge(), prompts=prompts, images=images,
            out_dir=layout.asset_dir("preference_pairs", key), batch_size=judge_section(settings["judge"]).batch_size,
            log=context.log.info)
        answered = verdicts.filter(pl.col("status") == "ok").rename(
            {"answer_ab": "first_order", "answer_ba": "second_order"})
        extra = {"num_verdicts": len(verdicts), "position_bias_rate": position_bias_rate(answered),
                 "verdicts": path_md(layout.asset_dir("preference_pairs", key) / "verdicts.parquet")}
    else:
        raise dg.Failure(f"pairs.mode {mode!r} is not one of pointwise, pairwise")
    drops = dict(drops)
    if len(heldout):
        drops["heldout_prompt"] = len(heldout)
    path = write_parquet(pairs, layout.pairs(key))
    duplicates = _duplicate_pairs(pairs)
    return dg.MaterializeResult(
        check_results=[dg.AssetCheckResult(check_name="no_duplicate_pairs", passed=not duplicates,
                                           metadata={"problems": "\n".join(duplicates[:20]) or "none"})],
        metadata={
            "mode": mode,
            **extra,
            "num_pairs": len(pairs),
            "drops_by_reason": counts_md(drops),
            "p_chosen_histogram": histogram_md(pairs["p_chosen"].to_list(), lo=0.5, hi=1.0),
            "mean_margin": float(pairs["margin"].mean()) if len(pairs) else 0.0,
            "path": path_md(path),
        },
    )


def _duplicate_pairs(pairs) -> list[str]:
    import polars as pl

    problems = []
    repeated = pairs.group_by("pair_id").len().filter(pl.col("len") > 1)
    problems += [f"pair_id {row['pair_id']} appears {row['len']} times" for row in repeated.iter_rows(named=True)]
    unordered = pairs.select(pl.min_horizontal("chosen_id", "rejected_id").alias("a"),
                             pl.max_horizontal("chosen_id", "rejected_id").alias("b"))
    twice = unordered.group_by("a", "b").len().filter(pl.col("len") > 1)
    problems += [f"candidates {row['a']} and {row['b']} paired {row['len']} times" for row in twice.iter_rows(named=True)]
    same = pairs.filter(pl.col("chosen_id") == pl.col("rejected_id"))
    problems += [f"pair {row['pair_id']} pairs a candidate with itself" for row in same.iter_rows(named=True)]
    return problems
