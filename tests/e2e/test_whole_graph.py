"""The whole asset graph on one small partition of the bundled samples, on the tiny profile, into tmp_path;
every output checked against DESIGN.md's data contracts."""

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from pipelines.definitions import ALL_ASSETS
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.paths import SAMPLES_DIR
from pipelines.resources import default_resources

pytestmark = pytest.mark.slow

PARTITIONED = {"prompt_batches", "candidate_images", "reward_labels", "preference_pairs"}
# the proving ground's assets run on the proving profile's world prompts only (tests/e2e/test_proving_ground.py);
# a subject run takes its subject as config (tests/unit/test_rpo.py); ar_grpo_run trains an autoregressive model and
# skips without the profile's ar_grpo section (tests/e2e/test_tiny_ar_graph.py runs it)
MAIN_ASSETS = [a for a in ALL_ASSETS if not set(a.group_names_by_key.values()) & {"proving", "subject"}
               and a.key.to_user_string() != "ar_grpo_run"]
# per task: train prompts, held-out prompts
QUOTA = {"t2i": (3, 1), "edit": (1, 0), "multi_ref": (2, 1)}


def _small_batch(inbox: Path) -> None:
    """A few prompts of every task from the bundled samples, their images copied next to the batch file (image
    paths must stay inside the inbox: absolute ones are refused as path_outside_inbox)."""
    import shutil

    picked, counts = [], {}

    def local(ref: str) -> str:
        source = (path.parent / ref).resolve()
        (inbox / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, inbox / "images" / source.name)
        return f"images/{source.name}"

    for path in sorted((SAMPLES_DIR).rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            slot = (row["task"], row.get("split", "train"))
            want = QUOTA[row["task"]][0 if slot[1] == "train" else 1]
            if counts.get(slot, 0) >= want:
                continue
            counts[slot] = counts.get(slot, 0) + 1
            if row.get("source_image"):
                row["source_image"] = local(row["source_image"])
            row["reference_images"] = [local(r) for r in row.get("reference_images") or []]
            picked.append(row)
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "e2e.jsonl").write_text("\n".join(json.dumps(r) for r in picked) + "\n")


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "data"
    _small_batch(data / "inbox")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["e2e"])
    resources = default_resources(str(data), "tiny")
    first = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in PARTITIONED], partition_key="e2e",
                           instance=instance, resources=resources)
    rest = [a for a in MAIN_ASSETS if a.key.to_user_string() not in PARTITIONED]
    second = dg.materialize(rest, instance=instance, resources=resources)
    return data, first, second, instance


def _meta(result, asset):
    return result.asset_materializations_for_node(asset)[0].metadata


def test_every_asset_materialized(graph_run):
    _, first, second, _ = graph_run
    assert first.success and second.success
    done = {e.asset_key.to_user_string() for r in (first, second) for e in r.get_asset_materialization_events()}
    assert done == {a.key.to_user_string() for a in MAIN_ASSETS}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed
              for r in (first, second) for c in r.get_asset_check_evaluations()}
    assert checks == {("reward_labels", "labels_follow_contract"): True,
                      ("reward_labels", "parse_error_rate_below_threshold"): True,
                      ("reward_labels", "judge_clip_agreement"): True,
                      ("preference_pairs", "no_duplicate_pairs"): True,
                      ("sft_corpus", "shards_match_manifest"): True,
                      ("preference_corpus", "shards_match_manifest"): True,
                      ("preference_corpus", "label_0_balanced"): True}


def test_the_ui_gets_counts_thumbnails_and_curves(graph_run):
    _, first, second, _ = graph_run
    labels = _meta(first, "reward_labels")
    assert labels["best_and_worst"].value.count("data:image/png;base64,") >= 2
    assert "| reason |" in _meta(second, "sft_corpus")["drops_by_reason"].value or \
        _meta(second, "sft_corpus")["drops_by_reason"].value == "_none_"
    for trainer in ("sft", "dpo", "grpo"):
        curves = _meta(second, f"{trainer}_run")["training_curves"].value
        assert "data:image/png;base64," in curves, curves[:200]


def test_prompts_candidates_labels_pairs_follow_the_contracts(graph_run):
    from labelers.rubrics import all_dimensions
    from pipelines.io import file_sha256, read_shard
    from labelers.hashing import bytes_sha256

    data, _, _, _ = graph_run
    prompts = pl.read_parquet(data / "prompt_batches/e2e/prompts.parquet")
    assert prompts.columns == ["prompt_id", "task", "text", "source_image", "reference_images", "reference_types",
                               "tags", "split"]
    assert len(prompts) == sum(a + b for a, b in QUOTA.values())

    candidates = pl.read_parquet(data / "candidate_images/e2e/candidates.parquet")
    for column in ("candidate_id", "prompt_id", "generator_id", "seed", "params", "width", "height",
                   "image_sha256", "shard", "key"):
        assert column in candidates.columns
    assert len(candidates) == 4 * len(prompts) and candidates["candidate_id"].n_unique() == len(candidates)
    stored = {}
    for tar in sorted((data / "candidate_images/e2e/shards").glob("*.tar")):
        for sample in read_shard(tar):
            stored[sample["__key__"]] = bytes_sha256(sample["png"])
    assert stored == dict(zip(candidates["key"], candidates["image_sha256"]))

    labels = pl.read_parquet(data / "reward_labels/e2e/labels.parquet")
    required = ["candidate_id", "prompt_id", "judge_id", "clip_t", "clip_i", "clip_i_per_ref", "lambda_harmonic",
                "reward", "status", "error"]
    for dim in all_dimensions():
        required += [dim, f"{dim}_feedback"]
    assert set(required) <= set(labels.columns)
    assert len(labels) == len(candidates)
    ok = labels.filter(pl.col("status") == "ok")
    assert len(ok) > 0 and set(labels["status"].unique()) <= {"ok", "parse_error", "image_error"}
    for row in ok.iter_rows(named=True):
        task_dims = [d for d in all_dimensions() if row[d] is not None]
        assert len(task_dims) == 3 and all(0 <= row[d] <= 5 for d in task_dims)
        assert all(isinstance(row[f"{d}_feedback"], str) for d in task_dims)
        assert row["reward"] is not None and row["lambda_harmonic"] is not None
        assert row["diversity"] is not None  # LOO-FID against the EMA feature moments
    assert (data / "reward_labels" / "_diversity" / "clip_feature_moments.safetensors").exists()

    pairs = pl.read_parquet(data / "preference_pairs/e2e/pairs.parquet")
    assert pairs.columns == ["pair_id", "prompt_id", "chosen_id", "rejected_id", "p_chosen", "margin", "strategy",
                             "label"]
    assert len(pairs) > 0 and (pairs["p_chosen"] >= 0.5).all() and (pairs["margin"] >= 0).all()
    heldout = set(prompts.filter(pl.col("split") == "heldout")["prompt_id"])
    assert not set(pairs["prompt_id"]) & heldout


@pytest.mark.parametrize("corpus", ["sft_corpus", "preference_corpus"])
def test_corpora_are_versioned_and_read_by_webdataset_and_datasets(graph_run, corpus, tmp_path):
    import datasets
    import webdataset as wds

    from pipelines.io import file_sha256

    data, _, _, _ = graph_run
    root = data / "corpora" / corpus
    version = (root / "latest").read_text().strip()
    version_dir = root / version
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["schema_version"] == 5 and manifest["inputs"] == ["e2e"] and "drops" in manifest
    assert manifest["segments"]["e2e"]["num_samples"] == manifest["num_samples"]
    shards = sorted((version_dir / "shards").glob("*.tar"))
    assert [f"shards/{s.name}" for s in shards] == [s["path"] for s in manifest["shards"]]
    for shard, info in zip(shards, manifest["shards"]):
        assert file_sha256(shard) == info["sha256"]
    index = pl.read_parquet(version_dir / "index.parquet")
    assert len(index) == manifest["num_samples"] > 0

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == index["key"].to_list()
    # datasets infers a schema from a tar's first samples, so it reads one layout (task + members) at a time
    hf_rows, column_sets = 0, []
    for layout, layout_shards in manifest["layouts"].items():
        hf = datasets.load_dataset("webdataset", data_files={"train": [str(version_dir / s) for s in layout_shards]},
                                   split="train")
        hf_rows += len(hf)
        column_sets.append(set(hf.column_names))
    assert hf_rows == len(index)
    # the whole version in one call, through its dataset card (README.md): every task, every member declared
    whole = datasets.load_dataset(str(version_dir), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(whole) == len(index) and set(whole.column_names) >= set().union(*column_sets)
    if corpus == "sft_corpus":
        assert {"jpg", "txt", "json"} <= set(samples[0])
        meta = samples[0]["json"]
        assert "reward" in meta and "lambda_harmonic" in meta
        assert all({"jpg", "txt", "json"} <= columns for columns in column_sets)
    else:
        for sample in samples:
            assert {"jpg_0.jpg", "jpg_1.jpg", "caption.txt", "label_0.txt", "label_1.txt", "json"} <= set(sample)
            assert {sample["label_0.txt"], sample["label_1.txt"]} in ({"1", "0"}, {"0.5"})
            if sample["json"]["task"] == "edit":
                assert "src.jpg" in sample
            if sample["json"]["task"] == "multi_ref":
                assert "ref_0.jpg" in sample
        assert all({"jpg_0.jpg", "jpg_1.jpg", "caption.txt", "label_0.txt", "label_1.txt"} <= columns
                   for columns in column_sets)


def test_training_runs_and_evals_wrote_their_outputs(graph_run):
    from safetensors.torch import load_file

    data, _, second, _ = graph_run
    for trainer in ("sft", "dpo", "grpo"):
        run = data / "runs" / trainer / (data / "runs" / trainer / "latest").read_text().strip()
        result = json.loads((run / "result.json").read_text())
        adapter = Path(result["adapter_path"]) / "pytorch_lora_weights.safetensors"
        assert adapter.exists() and len(load_file(str(adapter))) > 0
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert lines and all(isinstance(l.get("step"), int) for l in lines)
        summary = json.loads((data / "evals" / trainer / run.name / "summary.json").read_text())
        assert summary["num_images"] > 0
        assert set(summary["mean"]) == {"base", "trained"}
        meta = _meta(second, f"{trainer}_eval")
        assert "win_rate_reward" in meta


def test_rematerializing_reuses_versions_and_runs(graph_run):
    data, _, _, instance = graph_run
    resources = default_resources(str(data), "tiny")
    wanted = {"sft_corpus", "preference_corpus", "sft_run"}
    again = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in wanted], instance=instance,
                           resources=resources)
    assert again.success
    assert _meta(again, "sft_corpus")["created"].value is False
    assert _meta(again, "preference_corpus")["created"].value is False
    assert _meta(again, "sft_run")["reused"].value is True


def test_refresh_with_a_new_partition_writes_only_its_shards(graph_run):
    """A partition added later: the corpora's new versions write shards for it alone and reference the shards of
    the partition they already held; the trainers' reader sees every sample of both."""
    from pipelines.corpora import verify_corpus
    from trainers.data import corpus_shards

    data, _, _, instance = graph_run
    inbox = data / "inbox"
    rows = [json.loads(line) for line in (inbox / "e2e.jsonl").read_text().splitlines()]
    extra = [{**row, "text": row["text"] + ", at dusk"}
             for row in rows if row["task"] == "t2i" and row.get("split", "train") == "train"][:2]
    (inbox / "e2e_more.jsonl").write_text("\n".join(json.dumps(r) for r in extra) + "\n")
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, ["e2e_more"])
    resources = default_resources(str(data), "tiny")
    first = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in PARTITIONED], partition_key="e2e_more",
                           instance=instance, resources=resources)
    corpora = dg.materialize([a for a in ALL_ASSETS if a.key.to_user_string() in {"sft_corpus", "preference_corpus"}],
                             instance=instance, resources=resources)
    assert first.success and corpora.success
    for corpus in ("sft_corpus", "preference_corpus"):
        meta = _meta(corpora, corpus)
        assert meta["created"].value is True
        assert meta["partitions_written"].value == ["e2e_more"] and meta["partitions_referenced"].value == ["e2e"]
        root = data / "corpora" / corpus
        version_dir = root / (root / "latest").read_text().strip()
        manifest = json.loads((version_dir / "manifest.json").read_text())
        assert manifest["previous_version"] in {p.name for p in root.iterdir()}
        old = [s["path"] for s in manifest["segments"]["e2e"]["shards"]]
        assert old and all(p.startswith(f"../{manifest['previous_version']}/shards/") for p in old)
        assert verify_corpus(version_dir) == []
        assert len(corpus_shards(version_dir)) == len(manifest["shards"])


def test_pairwise_mode_rebuilds_pairs_from_judge_verdicts(graph_run, tmp_path):
    """The same partition's pairs in pairwise mode: the judge compares candidates in both orders, BT strengths are
    fitted per prompt, and the pairs keep the contract."""
    data, _, _, instance = graph_run
    profile = tmp_path / "tiny_pairwise.yaml"
    profile.write_text("extends: tiny\nname: tiny_pairwise\n"
                       "pairs: {mode: pairwise, max_pairs_per_prompt: 3, tie_policy: keep, bt_prior: 0.1}\n")
    pairs_asset = [a for a in ALL_ASSETS if a.key.to_user_string() == "preference_pairs"]
    result = dg.materialize(pairs_asset, partition_key="e2e", instance=instance,
                            resources=default_resources(str(data), str(profile)))
    assert result.success
    meta = _meta(result, "preference_pairs")
    assert meta["mode"].value == "pairwise"
    bias = meta["position_bias_rate"].value  # None only when no verdict was ok
    assert bias is None or 0.0 <= bias <= 1.0
    verdicts = pl.read_parquet(data / "preference_pairs/e2e/verdicts.parquet")
    train_prompts = sum(train for train, _ in QUOTA.values())  # each with 4 candidates -> up to 3 pairs
    assert 0 < len(verdicts) <= 3 * train_prompts and set(verdicts["status"]) <= {"ok", "parse_error", "image_error"}
    assert set(verdicts.filter(pl.col("status") == "ok")["verdict"]) <= {"first", "second", "tie"}
    pairs = pl.read_parquet(data / "preference_pairs/e2e/pairs.parquet")
    assert pairs.columns == ["pair_id", "prompt_id", "chosen_id", "rejected_id", "p_chosen", "margin", "strategy",
                             "label"]
    assert set(pairs["strategy"]) <= {"pairwise_judge"}
