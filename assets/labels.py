"""reward_labels: the VLM judge's 0–5 scores with feedback per dimension, plus CLIP rewards, per candidate."""


import dagster as dg

from assets._metadata import counts_md, histogram_md, path_md, thumbnails_md
from assets.candidates import candidate_images
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import ClipResource, JudgeResource, ProfileResource, StorageResource

#: beside a partition's labels when ``checks.verifier_agreement`` is on: ``verifier_agreement``'s answer
VERIFIER_AGREEMENT_FILE = "verifier_agreement.json"


@dg.asset(partitions_def=prompt_batch_partitions, deps=[candidate_images], group_name="labelling",
          kinds={"transformers", "open_clip", "parquet"}, pool="gpu",
          retry_policy=dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL),
          check_specs=[
              dg.AssetCheckSpec("labels_follow_contract", asset="reward_labels", blocking=True,
                                description="Every contract column; statuses known; ok rows scored 0-5 on their "
                                            "task's dimensions with a reward and no NaN/inf anywhere; failures "
                                            "explained."),
              dg.AssetCheckSpec("parse_error_rate_below_threshold", asset="reward_labels", blocking=True,
                                description="The judge's parse failures stay under checks.max_parse_error_rate of "
                                            "the partition's candidates (a broken judge or rubric must not feed "
                                            "the corpora)."),
              dg.AssetCheckSpec("judge_clip_agreement", asset="reward_labels",
                                description="Reported: the share of same-prompt candidate pairs the judge and CLIP order "
                                            "the same way; warns below checks.min_judge_clip_agreement."),
          ])
def reward_labels(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource,
                  judge: JudgeResource, clip: ClipResource) -> dg.MaterializeResult:
    """Labels every candidate of the partition. Labels are written in parts keyed by (candidate_id, judge_id), so
    a crash resumes from the rows already labelled and a changed rubric or judge model re-labels. A row that
    cannot be scored keeps its status (image_error, parse_error, reward_error: a NaN/inf among its rewards) and
    error instead of being dropped, zeroed or clamped."""
    import polars as pl

    from labelers.diagnostics import diagnostics_markdown, judge_clip_agreement
    from labelers.rubrics import all_dimensions
    from labelers.validation import label_problems
    from pipelines.candidates import load_candidate_images
    from pipelines.io import write_parquet
    from pipelines.labels import add_diversity, image_embeddings, label_partition
    from pipelines.stages import checks_section, judge_section, labeling_stage_from_profile, rewards_section

    key = context.partition_key
    layout = storage.layout
    settings = profile.settings()
    rewards = rewards_section(settings["rewards"])
    stage = labeling_stage_from_profile(rewards, judge=judge.judge(), scorer=clip.scorer(),
                                        preference_scorer=clip.preference_scorer())
    prompts = pl.read_parquet(layout.prompts(key))
    labels, relabelled = label_partition(
        stage=stage,
        candidates=pl.read_parquet(layout.candidates(key)),
        prompts=prompts,
        shard_dir=layout.asset_dir("candidate_images", key) / "shards",
        parts_dir=layout.asset_dir("reward_labels", key) / "parts",
        out_path=layout.labels(key),
        batch_size=judge_section(settings["judge"]).batch_size,
        log=context.log.info,
    )
    shard_dir = layout.asset_dir("candidate_images", key) / "shards"
    ok_ids = set(labels.filter(pl.col("status") == "ok")["candidate_id"].to_list())
    ok_images = load_candidate_images(shard_dir, ok_ids)
    # Stored for the corpora's near-duplicate filter (and reused by the diversity reward below).
    embeddings = image_embeddings(layout.asset_dir("reward_labels", key) / "embeddings.parquet", ok_images,
                                  clip.scorer(), log=context.log.info)
    if rewards.diversity.enabled:
        labels = add_diversity(labels, key, ok_images, clip.scorer(),
                               layout.asset_dir("reward_labels") / "_diversity", rewards.diversity.ema_decay,
                               log=context.log.info, features_by_id=embeddings)
        write_parquet(labels, layout.labels(key))
    problems = label_problems(labels, dict(zip(prompts["prompt_id"], prompts["task"])))
    by_status = dict(labels.group_by("status").len().iter_rows())
    ok = labels.filter(pl.col("status") == "ok")
    dims = [d for d in all_dimensions() if d in labels.columns and ok[d].null_count() < len(ok)]
    means = {d: round(float(ok[d].mean()), 4) for d in dims} if len(ok) else {}
    for name in ("clip_t", "clip_i", "lambda_harmonic", "reward", "diversity"):
        if len(ok) and name in ok.columns and ok[name].null_count() < len(ok):
            means[name] = round(float(ok[name].mean()), 4)
    parse_errors = by_status.get("parse_error", 0)
    checks = checks_section(settings)
    max_parse_rate = float(checks.max_parse_error_rate)
    parse_rate = parse_errors / max(1, len(labels))
    agreement = judge_clip_agreement(labels)["agreement"]
    min_agreement = checks.min_judge_clip_agreement
    extra: dict = {}
    if checks.verifier_agreement:  # the proving ground: how the judge and CLIP agree with the verifier
        from labelers.diagnostics import verifier_agreement
        from pipelines.io import write_json

        texts = {r["prompt_id"]: (r["task"], r["text"]) for r in prompts.select("prompt_id", "task", "text").to_dicts()}
        agreement_v = verifier_agreement(labels, ok_images, texts)
        write_json(agreement_v, layout.asset_dir("reward_labels", key) / VERIFIER_AGREEMENT_FILE)  # proving_report
        extra["judge_verifier_agreement"] = counts_md(
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in agreement_v.items() if k != "pair_counts"},
            "measure", "value")
        extra["verifier_pairwise_reward"] = agreement_v["pairwise_reward"]
        context.log.info(f"agreement with the verifier: {agreement_v}")
    for row in labels.filter(pl.col("status") != "ok").head(10).iter_rows(named=True):
        context.log.warning(f"candidate {row['candidate_id']}: {row['status']}: {row['error']}")
    return dg.MaterializeResult(
        check_results=[
            dg.AssetCheckResult(check_name="labels_follow_contract", passed=not problems,
                                metadata={"problems": "\n".join(problems) or "none"}),
            dg.AssetCheckResult(check_name="parse_error_rate_below_threshold", passed=parse_rate <= max_parse_rate,
                                metadata={"parse_error_rate": parse_rate, "threshold": max_parse_rate,
                                          "parse_errors": parse_errors}),
            dg.AssetCheckResult(check_name="judge_clip_agreement", severity=dg.AssetCheckSeverity.WARN,
                                passed=(min_agreement is None or agreement is None
                                        or float(agreement) >= float(min_agreement)),
                                metadata={"agreement": agreement, "minimum": min_agreement}),
        ],
        metadata={
            "num_labels": len(labels),
            "labelled_now": relabelled,
            "by_status": counts_md(by_status, "status"),
            "parse_error_rate": parse_errors / max(1, len(labels)),
            "reward_errors": by_status.get("reward_error", 0),
            "mean_by_dimension": counts_md(means, "dimension", "mean"),
            "judge_clip_agreement": agreement,
            "best_and_worst": _extremes(ok, ok_images, prompts),
            "judge_diagnostics": dg.MetadataValue.md(diagnostics_markdown(labels)),
            "reward_histogram": histogram_md(ok["reward"].to_list()) if len(ok) else "no ok rows",
            "path": path_md(layout.labels(key)),
            **extra,
        },
    )


def _extremes(ok, images: dict, prompts, n: int = 3) -> dg.MetadataValue:
    """Thumbnails of the ``n`` best- and worst-rewarded ok candidates, with their reward and prompt."""
    texts = dict(zip(prompts["prompt_id"], prompts["text"]))
    ranked = ok.filter(ok["reward"].is_not_null()).sort(["reward", "candidate_id"], descending=[True, False])
    picked = ranked.head(n).to_dicts() + (ranked.tail(n).to_dicts() if len(ranked) > n else [])
    rows = [(f"{'best' if i < n else 'worst'} · reward {row['reward']:.3f} · {texts.get(row['prompt_id'], '')}",
             images[row["candidate_id"]]) for i, row in enumerate(picked)
            if not isinstance(images.get(row["candidate_id"]), (Exception, type(None)))]
    return thumbnails_md(rows)
