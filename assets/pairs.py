"""preference_pairs: Bradley-Terry pairs within each prompt's candidates."""


import dagster as dg

from assets._metadata import counts_md, histogram_md, path_md
from assets.labels import reward_labels
from pipelines.partitions import prompt_batch_partitions
from pipelines.resources import ProfileResource, StorageResource


@dg.asset(partitions_def=prompt_batch_partitions, deps=[reward_labels], group_name="labelling", kinds={"parquet"})
def preference_pairs(context: dg.AssetExecutionContext, storage: StorageResource,
                     profile: ProfileResource) -> dg.MaterializeResult:
    """Pairs chosen/rejected candidates of one prompt by the aggregate reward; P(chosen≻rejected) is the
    Bradley-Terry probability σ(Δr/τ). Held-out prompts never make pairs (they are for evaluation)."""
    import polars as pl

    from labelers.pairs import select_pairs
    from pipelines.io import write_parquet

    key = context.partition_key
    layout = storage.layout
    settings = profile.settings()["pairs"]
    labels = pl.read_parquet(layout.labels(key))
    prompts = pl.read_parquet(layout.prompts(key)).select("prompt_id", "split")
    candidates = pl.read_parquet(layout.candidates(key)).select("candidate_id", "image_sha256")
    labels = labels.join(candidates, on="candidate_id", how="left").join(prompts, on="prompt_id", how="left")
    heldout = labels.filter(pl.col("split") == "heldout")
    pairs, drops = select_pairs(labels.filter(pl.col("split") != "heldout"), **settings)
    drops = dict(drops)
    if len(heldout):
        drops["heldout_prompt"] = len(heldout)
    path = write_parquet(pairs, layout.pairs(key))
    return dg.MaterializeResult(metadata={
        "num_pairs": len(pairs),
        "drops_by_reason": counts_md(drops),
        "p_chosen_histogram": histogram_md(pairs["p_chosen"].to_list(), lo=0.5, hi=1.0),
        "mean_margin": float(pairs["margin"].mean()) if len(pairs) else 0.0,
        "path": path_md(path),
    })
