"""sft_corpus and preference_corpus: versioned, sharded WebDataset corpora built from every labelled partition."""


from collections import Counter

import dagster as dg

from assets._metadata import counts_md, path_md
from assets.labels import reward_labels
from assets.pairs import preference_pairs
from pipelines.resources import ProfileResource, StorageResource


def _integrity_check(corpus: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec("shards_match_manifest", asset=corpus,
                             description="Every shard re-read: sha256 and sample count match manifest.json, and "
                                         "index.parquet names exactly the samples in the shards.")


def _corpus_result(version_dir, manifest, created: bool, **extra) -> dg.MaterializeResult:
    from pipelines.corpora import verify_corpus

    problems = verify_corpus(version_dir)
    return dg.MaterializeResult(
        check_results=[dg.AssetCheckResult(check_name="shards_match_manifest", passed=not problems,
                                           metadata={"problems": "\n".join(problems) or "none"})],
        metadata={
            **extra,
            "version": manifest["version"],
            "created": created,
            "num_samples": manifest["num_samples"],
            "num_shards": len(manifest["shards"]),
            "input_partitions": dg.MetadataValue.json(sorted(manifest["inputs"])),
            "drops_by_reason": counts_md(manifest["drops"]),
            "path": path_md(version_dir),
        },
        data_version=dg.DataVersion(manifest["version"]),
    )


@dg.asset(deps=[reward_labels], group_name="corpora", kinds={"webdataset"},
          check_specs=[_integrity_check("sft_corpus")])
def sft_corpus(context: dg.AssetExecutionContext, storage: StorageResource,
               profile: ProfileResource) -> dg.MaterializeResult:
    """The best-rewarded ok candidates of every labelled partition (``jpg, txt, json``; json carries every reward
    and feedback). Versioned by a hash of the input label files and the config: unchanged inputs reuse it."""
    import polars as pl

    from pipelines.catalog import finished_partitions, input_fingerprints, load_images_for, load_prompts, prompts_by_id
    from pipelines.corpora import corpus_version, sft_samples, write_corpus

    layout = storage.layout
    settings = profile.settings()
    partitions = finished_partitions(layout, "reward_labels", "labels.parquet")
    if not partitions:
        raise dg.Failure("sft_corpus: no labelled partitions yet; materialize reward_labels first")
    config = {"corpora": settings["corpora"], "rewards": settings["rewards"]}
    version = corpus_version("sft_corpus", input_fingerprints(layout, partitions, ["reward_labels/labels.parquet"]), config)
    labels = pl.concat([pl.read_parquet(layout.labels(p)) for p in partitions], how="diagonal_relaxed")
    prompts = load_prompts(layout, partitions)
    heldout = set(prompts.filter(pl.col("split") == "heldout")["prompt_id"].to_list())
    drops: Counter = Counter()
    drops["heldout_prompt"] = int(labels["prompt_id"].is_in(list(heldout)).sum())
    labels = labels.filter(~pl.col("prompt_id").is_in(list(heldout)))
    ok_rewards = labels.filter(pl.col("status") == "ok")["reward"].drop_nulls()
    quantile = settings["corpora"].get("sft_min_reward_quantile", 0.0)
    min_reward = float(ok_rewards.quantile(quantile, "lower")) if len(ok_rewards) else float("inf")
    images = load_images_for(layout, partitions, set(labels["candidate_id"].to_list()))
    version_dir, manifest, created = write_corpus(
        layout.corpus_root("sft_corpus"), "sft_corpus", version,
        sft_samples(labels, prompts_by_id(prompts), images, min_reward, drops),
        settings["corpora"]["shard_max_samples"],
        {"inputs": partitions, "config": config, "min_reward": min_reward}, drops,
    )
    context.log.info(f"sft_corpus {version}: {manifest['num_samples']} samples ({'new' if created else 'reused'})")
    return _corpus_result(version_dir, manifest, created)


@dg.asset(deps=[preference_pairs], group_name="corpora", kinds={"webdataset"},
          check_specs=[_integrity_check("preference_corpus")])
def preference_corpus(context: dg.AssetExecutionContext, storage: StorageResource,
                      profile: ProfileResource) -> dg.MaterializeResult:
    """Every pair of every partition as Pick-a-Pic-style samples (``jpg_0, jpg_1, caption, label_0, label_1,
    json`` + ``src``/``ref_K`` images), which image is ``jpg_0`` drawn with a seed so ``label_0`` is balanced."""
    import polars as pl

    from pipelines.catalog import finished_partitions, input_fingerprints, load_images_for, load_prompts, prompts_by_id
    from pipelines.corpora import corpus_version, preference_samples, write_corpus

    layout = storage.layout
    settings = profile.settings()
    partitions = finished_partitions(layout, "preference_pairs", "pairs.parquet")
    if not partitions:
        raise dg.Failure("preference_corpus: no partitions with pairs yet; materialize preference_pairs first")
    config = {"corpora": settings["corpora"], "pairs": settings["pairs"]}
    version = corpus_version("preference_corpus",
                             input_fingerprints(layout, partitions, ["preference_pairs/pairs.parquet"]), config)
    pairs = pl.concat([pl.read_parquet(layout.pairs(p)) for p in partitions], how="vertical")
    keys = set(pairs["chosen_id"].to_list()) | set(pairs["rejected_id"].to_list())
    drops: Counter = Counter()
    version_dir, manifest, created = write_corpus(
        layout.corpus_root("preference_corpus"), "preference_corpus", version,
        preference_samples(pairs, prompts_by_id(load_prompts(layout, partitions)), load_images_for(layout, partitions, keys),
                           settings["corpora"].get("seed", 0), drops),
        settings["corpora"]["shard_max_samples"], {"inputs": partitions, "config": config}, drops,
    )
    index = pl.read_parquet(version_dir / "index.parquet")
    balance = float(index["label_0"].mean()) if len(index) else float("nan")
    context.log.info(f"preference_corpus {version}: {manifest['num_samples']} pairs, mean label_0 {balance:.3f}")
    return _corpus_result(version_dir, manifest, created, label_0_mean=balance)
