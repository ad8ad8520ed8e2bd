"""sft_corpus and preference_corpus: versioned, sharded WebDataset corpora built from every finished partition.

A new version writes shards only for partitions the previous version does not already hold unchanged (see
``pipelines.corpora``); the asset's metadata says which partitions were written and which referenced."""


import dagster as dg

from assets._metadata import counts_md, path_md
from assets.labels import reward_labels
from assets.pairs import preference_pairs
from pipelines.resources import ProfileResource, StorageResource


def _integrity_check(corpus: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec("shards_match_manifest", asset=corpus, blocking=True,
                             description="Every shard re-read: sha256 and sample count match manifest.json, keys "
                                         "unique, and index.parquet names exactly the samples in the shards.")


def _build(context: dg.AssetExecutionContext, storage: StorageResource, profile: ProfileResource, corpus: str,
           upstream: str, upstream_file: str, config_sections: tuple[str, ...], make_source) -> dict:
    from pipelines.catalog import finished_partitions, input_fingerprints, load_prompts, prompts_by_id
    from pipelines.corpora import build_corpus, verify_corpus
    from pipelines.corpus_sources import CorpusFilters, shard_limits

    layout = storage.layout
    settings = profile.settings()
    partitions = finished_partitions(layout, upstream, upstream_file)
    if not partitions:
        raise dg.Failure(f"{corpus}: no partition has {upstream} output yet; materialize {upstream} first")
    config = {section: settings.get(section) for section in ("corpora", "filters", *config_sections)}
    inputs = input_fingerprints(layout, partitions, [f"{upstream}/{upstream_file}"])
    filters = CorpusFilters(settings.get("filters") or {}, device=settings.get("device", "cpu"))
    source = make_source(layout, prompts_by_id(load_prompts(layout, partitions)), settings, filters)
    build = build_corpus(storage.corpus_root(corpus), corpus, inputs, config, source, shard_limits(settings),
                         log=context.log.info)
    problems = verify_corpus(build.url)
    manifest = build.manifest
    context.log.info(f"{corpus} {build.version}: {manifest['num_samples']} samples "
                     f"({'new' if build.created else 'reused'}; partitions written {build.written}, "
                     f"referenced {build.reused})")
    return {"build": build, "problems": problems}


def _result(built: dict, more_checks: list | None = None, **extra) -> dg.MaterializeResult:
    build, problems = built["build"], built["problems"]
    manifest = build.manifest
    return dg.MaterializeResult(
        check_results=[dg.AssetCheckResult(check_name="shards_match_manifest", passed=not problems,
                                           metadata={"problems": "\n".join(problems) or "none"}),
                       *(more_checks or [])],
        metadata={
            **extra,
            "version": build.version,
            "created": build.created,
            "num_samples": manifest["num_samples"],
            "num_shards": len(manifest["shards"]),
            "num_bytes": manifest.get("num_bytes", 0),
            "partitions_written": dg.MetadataValue.json(build.written),
            "partitions_referenced": dg.MetadataValue.json(build.reused),
            "input_partitions": dg.MetadataValue.json(sorted(manifest["inputs"])),
            "drops_by_reason": counts_md(manifest["drops"]),
            "path": path_md(build.url),
        },
        data_version=dg.DataVersion(build.version),
    )


@dg.asset(deps=[reward_labels], group_name="corpora", kinds={"webdataset"},
          check_specs=[_integrity_check("sft_corpus")])
def sft_corpus(context: dg.AssetExecutionContext, storage: StorageResource,
               profile: ProfileResource) -> dg.MaterializeResult:
    """The best-rewarded ok candidates of every labelled partition (``jpg, txt, json``; json carries every reward
    and feedback), through the image, NSFW and duplicate filters. Versioned by a hash of the input label files
    and the config: unchanged inputs reuse the version, added partitions write only their own shards."""
    from pipelines.corpus_sources import SftSource

    built = _build(context, storage, profile, "sft_corpus", "reward_labels", "labels.parquet", ("rewards",),
                   lambda layout, prompts, settings, filters: SftSource(layout, prompts, settings, filters))
    return _result(built)


@dg.asset(deps=[preference_pairs], group_name="corpora", kinds={"webdataset"},
          check_specs=[_integrity_check("preference_corpus"),
                       dg.AssetCheckSpec("label_0_balanced", asset="preference_corpus", blocking=True,
                                         description="label_0 averages within 45-55 % (a position bias in the data "
                                                     "would teach it), or as close as an odd number of pairs "
                                                     "allows.")])
def preference_corpus(context: dg.AssetExecutionContext, storage: StorageResource,
                      profile: ProfileResource) -> dg.MaterializeResult:
    """Every pair of every partition as Pick-a-Pic samples (``jpg_0, jpg_1, caption, label_0, label_1, json`` +
    ``src``/``ref_K`` images), filtered, with ``jpg_0`` alternating between chosen and rejected so ``label_0`` is
    balanced. ``python -m pipelines.cli export-pickapic`` turns it into a Hugging Face dataset."""
    import fsspec
    import polars as pl

    from pipelines.corpus_sources import PreferenceSource

    built = _build(context, storage, profile, "preference_corpus", "preference_pairs", "pairs.parquet", ("pairs",),
                   lambda layout, prompts, settings, filters: PreferenceSource(
                       layout, prompts, settings["corpora"].get("seed", 0), filters))
    with fsspec.open(f"{built['build'].url}/index.parquet", "rb") as handle:
        index = pl.read_parquet(handle)
    balance = float(index["label_0"].mean()) if len(index) else float("nan")
    context.log.info(f"preference_corpus: mean label_0 {balance:.3f}")
    passed, detail = label_0_balance(index)
    return _result(built, [dg.AssetCheckResult(check_name="label_0_balanced", passed=passed, metadata=detail)],
                   label_0_mean=balance)


def label_0_balance(index) -> tuple[bool, dict]:
    """Within 45-55 %, or off by no more than the half pair an odd number of pairs must leave."""
    import polars as pl

    if not len(index):
        return True, {"label_0_mean": None, "pairs": 0}
    total = float(index["label_0"].sum())
    mean = total / len(index)
    excess = abs(total - len(index) / 2)
    passed = 0.45 <= mean <= 0.55 or excess <= 0.5 + 1e-9  # a tiny corpus with an odd count is as close as it gets
    return passed, {"label_0_mean": mean, "pairs": len(index),
                    "label_0_minus_half": excess, "ties": index.filter(pl.col("label_0") == 0.5).height}
