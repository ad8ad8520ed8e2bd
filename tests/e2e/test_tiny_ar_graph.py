"""The graph on the ``tiny_ar`` profile (a tiny Janus-Pro, ``zoo:janus``, generates the t2i candidates) on a few t2i
prompts from the bundled samples, into tmp_path: prompt_batches -> candidate_images -> reward_labels ->
preference_pairs -> rl_prompt_pool -> ar_grpo_run (``trainers.ar_grpo`` through Pipes, shortened to a few steps by
a tmp profile that extends tiny_ar). Janus candidates go through the same generation, labelling and pairing as any
other generator's, and the AR GRPO run writes its per-step metrics and a LoRA that ImageGenerator loads."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from pipelines.definitions import ALL_ASSETS
from pipelines.partitions import PROMPT_BATCH_PARTITIONS
from pipelines.paths import REPO_ROOT, SAMPLES_DIR
from pipelines.resources import GeneratorResource, ProfileResource, default_resources

pytestmark = pytest.mark.slow

KEY = "janus"
PARTITIONED = ("prompt_batches", "candidate_images", "reward_labels", "preference_pairs")
TRAIN_PROMPTS, HELDOUT_PROMPTS = 3, 1
BATCH_SIZE, SHARD_SIZE = 3, 4
# tiny_ar's ar_grpo section, shortened (a section given in a profile replaces the whole of the one it extends)
AR_GRPO = {"num_steps": 2, "group_size": 4, "prompts_per_step": 2, "learning_rate": 1.0e-3, "lora_rank": 4,
           "guidance_scale": 1.0, "reward_weights": {"clip_t": 1.0, "loo_fid": 0.5}, "fid_ema_decay": 0.95,
           "fid_warmup_batches": 1, "target_entropy_ratio": 0.9, "heldout_every": 1, "checkpoint_every": 2}
STEP_KEYS = ("reward_mean", "reward_clip_t_mean", "reward_loo_fid_mean", "loo_fid_mean", "token_entropy", "kl",
             "entropy_coef", "target_entropy", "diversity", "heldout_lambda_harmonic")


def _assets(*names):
    return [a for a in ALL_ASSETS if a.key.to_user_string() in names]


def _t2i_rows() -> list[dict]:
    want = {"train": TRAIN_PROMPTS, "heldout": HELDOUT_PROMPTS}
    rows = []
    for path in sorted(SAMPLES_DIR.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            split = row.get("split", "train")
            if row["task"] == "t2i" and want.get(split, 0) > 0:
                want[split] -= 1
                rows.append(row)
    assert not any(want.values())
    return rows


def _write_inbox(data: Path, rows: list[dict]) -> None:
    (data / "inbox").mkdir(parents=True)
    (data / "inbox" / f"{KEY}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _meta(result, asset):
    return result.asset_materializations_for_node(asset)[0].metadata


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_ar")
    profile = tmp / "tiny_ar_short.yaml"
    generation = yaml.safe_load((REPO_ROOT / "pipelines" / "profiles" / "tiny_ar.yaml").read_text())["generation"]
    # several shards, and batches that do not divide them (the last batch of each shard is padded)
    generation = {**generation, "batch_size": BATCH_SIZE, "shard_size": SHARD_SIZE}
    profile.write_text(yaml.safe_dump({"extends": "tiny_ar", "name": "tiny_ar_short", "generation": generation,
                                       "ar_grpo": AR_GRPO}))
    rows = _t2i_rows()
    data = tmp / "data"
    _write_inbox(data, rows)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [KEY])
    resources = default_resources(str(data), str(profile))
    first = dg.materialize(_assets(*PARTITIONED), partition_key=KEY, instance=instance, resources=resources)
    second = dg.materialize(_assets("rl_prompt_pool", "ar_grpo_run"), instance=instance, resources=resources)
    return {"tmp": tmp, "data": data, "profile": profile, "rows": rows, "first": first, "second": second}


def test_the_partition_and_the_ar_grpo_run_materialize(graph):
    first, second = graph["first"], graph["second"]
    assert first.success and second.success
    done = {e.asset_key.to_user_string() for r in (first, second) for e in r.get_asset_materialization_events()}
    assert done == {*PARTITIONED, "rl_prompt_pool", "ar_grpo_run"}
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed
              for r in (first, second) for c in r.get_asset_check_evaluations()}
    assert checks.get(("reward_labels", "labels_follow_contract")) is True
    assert checks.get(("preference_pairs", "no_duplicate_pairs")) is True


def test_janus_candidates_are_seeded_sized_and_stored(graph):
    import io

    from PIL import Image

    from labelers.hashing import bytes_sha256
    from pipelines.io import read_shard
    from pipelines.profiles import load_profile

    data = graph["data"]
    spec = load_profile(str(graph["profile"]))["generation"]["generators"]["t2i"]
    generator = GeneratorResource(profile=ProfileResource(name=str(graph["profile"]))).for_task("t2i")
    assert generator.model == "zoo:janus" == spec["model"]
    candidates = pl.read_parquet(data / "candidate_images" / KEY / "candidates.parquet")
    assert len(candidates) == 4 * len(graph["rows"]) and candidates["candidate_id"].n_unique() == len(candidates)
    # every row was generated by the Janus generator with the profile's sampling settings (CFG on: 3.0)
    assert set(candidates["generator_id"]) == {generator.generator_id}
    params = json.loads(candidates["params"][0])
    assert params["guidance_scale"] == spec["guidance_scale"] == 3.0
    assert (params["width"], params["height"]) == (spec["width"], spec["height"])
    assert set(candidates["seed"]) == {0, 1, 2, 3}
    assert (candidates["width"] == spec["width"]).all() and (candidates["height"] == spec["height"]).all()
    stored = {}
    for tar in sorted((data / "candidate_images" / KEY / "shards").glob("*.tar")):
        for sample in read_shard(tar):
            stored[sample["__key__"]] = bytes_sha256(sample["png"])
            with Image.open(io.BytesIO(sample["png"])) as image:
                image.load()
                assert image.size == (spec["width"], spec["height"]) and image.mode == "RGB"
    assert stored == dict(zip(candidates["key"], candidates["image_sha256"]))
    assert candidates["shard"].n_unique() == len(candidates) // SHARD_SIZE
    meta = _meta(graph["first"], "candidate_images")
    assert meta["num_shards"].value == len(candidates) // SHARD_SIZE and meta["generated_now"].value == len(candidates)
    # the seeds make each prompt's candidates differ from each other
    for _, group in candidates.group_by("prompt_id"):
        assert group["image_sha256"].n_unique() > 1


def test_janus_candidates_reproduce_in_a_fresh_data_root(graph):
    """The same prompts materialized again from scratch (another data root, another instance): the same
    candidate ids and the same image bytes."""
    data = graph["tmp"] / "again"
    _write_inbox(data, graph["rows"])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(PROMPT_BATCH_PARTITIONS, [KEY])
    again = dg.materialize(_assets("prompt_batches", "candidate_images"), partition_key=KEY, instance=instance,
                           resources=default_resources(str(data), str(graph["profile"])))
    assert again.success and _meta(again, "candidate_images")["generated_now"].value == 4 * len(graph["rows"])
    columns = ["candidate_id", "prompt_id", "generator_id", "seed", "image_sha256"]
    before = pl.read_parquet(graph["data"] / "candidate_images" / KEY / "candidates.parquet").select(columns)
    after = pl.read_parquet(data / "candidate_images" / KEY / "candidates.parquet").select(columns)
    assert before.sort("candidate_id").equals(after.sort("candidate_id"))


def test_janus_images_are_labelled_and_paired(graph):
    data = graph["data"]
    candidates = pl.read_parquet(data / "candidate_images" / KEY / "candidates.parquet")
    labels = pl.read_parquet(data / "reward_labels" / KEY / "labels.parquet")
    assert len(labels) == len(candidates) and set(labels["candidate_id"]) == set(candidates["candidate_id"])
    ok = labels.filter(pl.col("status") == "ok")
    assert len(ok) >= len(labels) * 0.8, labels.group_by("status").len()
    assert ok["clip_t"].is_not_null().all() and ok["reward"].is_not_null().all()
    assert ok["clip_i"].is_null().all()  # t2i: no references
    assert ok["diversity"].is_not_null().all()
    assert (data / "reward_labels" / "_diversity" / "clip_feature_moments.safetensors").exists()

    pairs = pl.read_parquet(data / "preference_pairs" / KEY / "pairs.parquet")
    assert len(pairs) >= 1 and (pairs["p_chosen"] >= 0.5).all()
    assert set(pairs["chosen_id"]) | set(pairs["rejected_id"]) <= set(candidates["candidate_id"])
    heldout = {r["text"] for r in graph["rows"] if r["split"] == "heldout"}
    prompts = pl.read_parquet(data / "prompt_batches" / KEY / "prompts.parquet")
    heldout_ids = set(prompts.filter(pl.col("text").is_in(list(heldout)))["prompt_id"])
    assert heldout_ids and not set(pairs["prompt_id"]) & heldout_ids

    pool = pl.read_parquet(data / "rl_prompt_pool" / "pool.parquet")
    assert len(pool) == len(graph["rows"]) and set(pool["task"]) == {"t2i"}
    assert pool["reward_mean"].is_not_null().all()


def test_ar_grpo_run_writes_metrics_and_a_loadable_adapter(graph):
    from pipelines.generation import GenerationRequest, ImageGenerator

    data, second = graph["data"], graph["second"]
    run = data / "runs" / "ar_grpo" / (data / "runs" / "ar_grpo" / "latest").read_text().strip()
    result = json.loads((run / "result.json").read_text())
    assert result["steps"] == AR_GRPO["num_steps"] and result["family"] == "janus"
    config = json.loads((run / "config.json").read_text())
    # the labelling stage's EMA moments seed the LOO-FID reference
    assert config["fid_reference_moments"].endswith("clip_feature_moments.safetensors")
    assert config["num_steps"] == AR_GRPO["num_steps"] and config["guidance_scale"] == 1.0

    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if isinstance(l.get("step"), int) and "token_entropy" in l]
    assert [l["step"] for l in steps] == list(range(1, AR_GRPO["num_steps"] + 1))
    for line in steps:
        for key in STEP_KEYS:
            assert np.isfinite(line[key]), (key, line)
    meta = _meta(second, "ar_grpo_run")
    assert meta["reused"].value is False and meta["steps"].value == AR_GRPO["num_steps"]
    assert "data:image/png;base64," in meta["training_curves"].value

    req = [GenerationRequest(key="k", text=graph["rows"][0]["text"], seed=3)]
    base_gen = ImageGenerator("zoo:janus", guidance_scale=3.0, batch_size=1, cpu_threads=1)
    base = np.asarray(base_gen.generate(req)[0])
    for adapter in (Path(result["adapter_path"]), Path(result["best_adapter_path"])):
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        gen = ImageGenerator("zoo:janus", guidance_scale=3.0, batch_size=1, cpu_threads=1)
        gen.setup()
        gen.load_lora(str(adapter))
        assert gen.lora is not None and gen.generator_id != base_gen.generator_id
        image = gen.generate(req)[0]
        assert image.size == (64, 64)
    assert not np.array_equal(base, np.asarray(image))  # the trained LoRA changes the policy's samples


def test_rematerializing_ar_grpo_run_reuses_the_run(graph):
    """Same prompt pool, same LOO-FID reference, same config: the asset reports the finished run, no retraining."""
    data = graph["data"]
    latest = (data / "runs" / "ar_grpo" / "latest").read_text().strip()
    again = dg.materialize(_assets("ar_grpo_run"), instance=dg.DagsterInstance.ephemeral(),
                           resources=default_resources(str(data), str(graph["profile"])))
    assert again.success
    assert _meta(again, "ar_grpo_run")["reused"].value is True
    assert (data / "runs" / "ar_grpo" / "latest").read_text().strip() == latest
    assert len([p for p in (data / "runs" / "ar_grpo").iterdir() if p.is_dir()]) == 1
