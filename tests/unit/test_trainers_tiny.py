"""Each trainer runs a few steps in-process on the tiny pipeline and tiny corpora written here.

Checks: the adapter exists in diffusers' LoRA format and reloads into a fresh pipeline with ``load_lora_weights``
(and reproduces the trained UNet's output), ``metrics.jsonl`` has one line per step with finite values, and a
resumed run continues from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
wds = pytest.importorskip("webdataset")

from tiny_corpus import CAPTIONS, COLOURS, noisy_jpeg, write_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")



# --------------------------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sft_corpus") / "v1"
    samples = [
        {"__key__": f"s{i:04d}", "jpg": noisy_jpeg(COLOURS[i % 6], i), "txt": CAPTIONS[i % 6],
         "json": {"clip_t": 0.3, "lambda_harmonic": 0.3, "reward": 0.5, "quality": 4.0, "quality_feedback": "ok"}}
        for i in range(10)
    ]
    return write_corpus(root, samples, per_shard=4)


@pytest.fixture(scope="module")
def pref_corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pref_corpus") / "v1"
    samples = []
    for i in range(10):
        label_0 = ["1", "0", "0.5"][i % 3]
        label_1 = {"1": "0", "0": "1", "0.5": "0.5"}[label_0]
        samples.append({
            "__key__": f"p{i:04d}",
            "jpg_0.jpg": noisy_jpeg(COLOURS[i % 6], 100 + i),
            "jpg_1.jpg": noisy_jpeg(COLOURS[(i + 3) % 6], 200 + i),
            "caption.txt": CAPTIONS[i % 6],
            "label_0.txt": label_0,
            "label_1.txt": label_1,
            "json": {"pair_id": f"p{i}", "p_chosen": 0.8},
        })
    return write_corpus(root, samples, per_shard=4)


# --------------------------------------------------------------------------------------------- helpers
def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_finite(records: list[dict], keys: list[str]) -> None:
    for rec in records:
        for key in keys:
            assert key in rec, f"{key} missing from {rec}"
        for key, value in rec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), f"step {rec['step']}: {key} = {value}"
            if isinstance(value, list):
                nums = [v for v in value if isinstance(v, (int, float))]
                assert all(math.isfinite(v) for v in nums), f"step {rec['step']}: {key} = {value}"


def _assert_adapter_reloads(model_dir: str, adapter_dir: Path) -> None:
    """The saved adapter loads into a fresh pipeline with diffusers' own loader and changes the UNet."""
    from diffusers import StableDiffusionPipeline

    assert (adapter_dir / "pytorch_lora_weights.safetensors").is_file()
    base = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    tuned = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    tuned.load_lora_weights(str(adapter_dir))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    emb = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        a = base.unet(x, 500, emb).sample
        b = tuned.unet(x, 500, emb).sample
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() > 0  # the LoRA is loaded and non-trivial


# --------------------------------------------------------------------------------------------- data readers
def test_readers(sft_corpus, pref_corpus):
    from trainers.data import collate_preference, collate_sft, corpus_shards, preference_samples, sft_samples

    assert [Path(p).name for p in corpus_shards(sft_corpus)] == ["000000.tar", "000001.tar", "000002.tar"]
    items = list(sft_samples(sft_corpus, None))
    assert len(items) == 10 and items[0][1] == "a red square" and items[0][2]["quality"] == 4.0
    assert items[0][0].size == (64, 64) and items[0][0].mode == "RGB"
    shuffled = [c for _, c, m in sft_samples(sft_corpus, 3)]
    assert sorted(shuffled) == sorted(c for _, c, _ in items)
    # skip reproduces the tail of the same seeded stream
    assert [m["__key__"] for _, _, m in sft_samples(sft_corpus, 3, skip=4)] == \
        [m["__key__"] for _, _, m in sft_samples(sft_corpus, 3)][4:]
    batch = collate_sft(items[:3], 32)
    assert batch["pixels"].shape == (3, 3, 32, 32) and batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1

    pairs = list(preference_samples(pref_corpus))
    assert len(pairs) == 10 and {p[3] for p in pairs} == {1.0, 0.0, 0.5}
    assert len(list(preference_samples(pref_corpus, drop_ties=True))) == 7  # ties at i = 2, 5, 8
    # label_0 = 0 -> img_1 is the winner
    p = pairs[1]
    assert (p[3], p[4]) == (0.0, 1.0)
    col = collate_preference([p], 64)
    from trainers.data import image_to_tensor

    torch.testing.assert_close(col["pixels_w"][0], image_to_tensor(p[1], 64))


# --------------------------------------------------------------------------------------------- SFT
def test_sft_trains_saves_and_resumes(tiny_model, sft_corpus, tmp_path):
    from trainers.sft import SFTConfig, train

    out = tmp_path / "sft"
    cfg = SFTConfig(pretrained_model=tiny_model, corpus_dir=sft_corpus, output_dir=str(out), max_steps=4,
                    batch_size=2, resolution=32, checkpoint_every=2, seed=0, learning_rate=1e-3)
    result = train(cfg)
    assert result["steps"] == 4 and result["resumed_from_step"] == 0
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    _assert_finite(recs, ["loss", "lr", "grad_norm", "step_time"])
    assert (out / "checkpoints" / "step-00000004" / "optimizer.pt").is_file()
    first_run_lines = (out / "metrics.jsonl").read_text().splitlines()

    # resume: same config, more steps -> continues at 5, keeps lines 1..4 untouched
    cfg6 = SFTConfig(**{**cfg.__dict__, "max_steps": 6})
    result6 = train(cfg6)
    assert result6["resumed_from_step"] == 4 and result6["steps"] == 6
    recs6 = _metrics(out)
    assert [r["step"] for r in recs6] == [1, 2, 3, 4, 5, 6]
    assert (out / "metrics.jsonl").read_text().splitlines()[:4] == first_run_lines
    assert json.loads((out / "result.json").read_text())["steps"] == 6
    _assert_adapter_reloads(tiny_model, out / "adapter")

    # the resumed run equals an uninterrupted 6-step run (same data order, noise, optimizer state)
    straight = tmp_path / "sft_straight"
    train(SFTConfig(**{**cfg6.__dict__, "output_dir": str(straight)}))
    losses_resumed = [r["loss"] for r in recs6]
    losses_straight = [r["loss"] for r in _metrics(straight)]
    assert losses_resumed == pytest.approx(losses_straight, rel=1e-4, abs=1e-6)

    # a different config must not silently resume from these checkpoints
    with pytest.raises(ValueError, match="different config"):
        train(SFTConfig(**{**cfg6.__dict__, "max_steps": 7, "learning_rate": 5e-4}))


def test_lora_target_modules_reach_the_feed_forward_and_reload_in_diffusers(tiny_model, sft_corpus, tmp_path):
    """``lora_target_modules`` widens the adapter beyond the family's attention projections; diffusers' own loader
    takes the wider adapter; a name that matches no module is refused before training, naming it."""
    from safetensors import safe_open

    from trainers.sft import SFTConfig, train

    out = tmp_path / "wide"
    train(SFTConfig(pretrained_model=tiny_model, corpus_dir=sft_corpus, output_dir=str(out), max_steps=2,
                    batch_size=2, resolution=32, checkpoint_every=2, learning_rate=1e-3,
                    lora_target_modules=["to_q", "to_v", "ff.net.0.proj"]))
    with safe_open(str(out / "adapter" / "pytorch_lora_weights.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert any(".ff.net.0.proj.lora" in k for k in keys) and any(".to_q.lora" in k for k in keys)
    assert not any("to_k.lora" in k or "to_out" in k for k in keys)  # only what was asked
    _assert_adapter_reloads(tiny_model, out / "adapter")

    with pytest.raises(ValueError, match=r"lora_target_modules \['ff_typo'\] match no module") as refused:
        train(SFTConfig(pretrained_model=tiny_model, corpus_dir=sft_corpus, output_dir=str(tmp_path / "bad"),
                        max_steps=1, batch_size=2, resolution=32, lora_target_modules=["to_q", "ff_typo"]))
    assert "'ff.net.0.proj'" in str(refused.value)  # the names it could have used, as they would be typed


# --------------------------------------------------------------------------------------------- DPO
def test_dpo_trains_from_sft_adapter(tiny_model, pref_corpus, sft_corpus, tmp_path):
    from trainers.dpo import DPOConfig, train
    from trainers.sft import SFTConfig
    from trainers.sft import train as train_sft

    sft_out = tmp_path / "sft"
    train_sft(SFTConfig(pretrained_model=tiny_model, corpus_dir=sft_corpus, output_dir=str(sft_out), max_steps=1,
                        batch_size=2, resolution=32, learning_rate=1e-2))
    for init in (None, str(sft_out / "adapter")):
        out = tmp_path / f"dpo_{'sft' if init else 'base'}"
        cfg = DPOConfig(pretrained_model=tiny_model, corpus_dir=pref_corpus, output_dir=str(out), init_adapter=init,
                        max_steps=3, batch_size=2, resolution=32, checkpoint_every=2, learning_rate=1e-3)
        result = train(cfg)
        recs = _metrics(out)
        assert [r["step"] for r in recs] == [1, 2, 3]
        _assert_finite(recs, ["loss", "implicit_acc", "margin", "grad_norm", "raw_samples_consumed"])
        # before the first update the policy equals the reference (fresh LoRA has B = 0; an init adapter is
        # both the policy's start and the frozen reference): inside = 0 -> loss = log 2
        assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert recs[0]["margin"] == pytest.approx(0.0, abs=1e-4)
        assert result["lora"]["reference"] == ("init_adapter" if init else "base")
        # ties dropped: 2 pairs per step over 3 steps consumed >= 6 raw samples (one tie in the first 7)
        assert recs[-1]["raw_samples_consumed"] >= 7
        _assert_adapter_reloads(tiny_model, Path(result["adapter_path"]))


# --------------------------------------------------------------------------------------------- GRPO
def test_grpo_reward_pieces():
    from trainers.grpo import GRPOConfig
    from trainers.grpo.grpo_trainer import sample_rewards

    cfg = GRPOConfig(lambdas={"t2i": 0.0, "multi_ref": 0.5}, drs_k0=10.0, drs_k1=3.0, drs_tau=0.7)
    # t2i: reward = λ-Harmonic with no CLIP_I = CLIP_T; raw similarity = CLIP_T
    r = sample_rewards(0.3, [], "t2i", cfg)
    assert r["reward"] == pytest.approx(0.3) and r["raw_sim"] == pytest.approx(0.3) and math.isnan(r["clip_i"])
    # multi_ref, 2 refs (k = 10 + 3·0 = 10), sims (0.7, 0.8), CLIP_T 0.3, λ 0.5:
    #   sharpened σ(10·0) = 0.5, σ(10·0.1) = σ(1) = 0.7310586 -> mean 0.6155293
    #   reward = 1/(0.5/0.6155293 + 0.5/0.3) = 1/(0.8123156 + 1.6666667) = 0.4033929
    #   raw: CLIP_I = 0.75 -> λH = 1/(0.5/0.75 + 0.5/0.3) = 1/(0.6666667 + 1.6666667) = 0.4285714
    r = sample_rewards(0.3, [0.7, 0.8], "multi_ref", cfg)
    assert r["reward"] == pytest.approx(0.4033929, abs=1e-6)
    assert r["lambda_harmonic"] == pytest.approx(0.4285714, abs=1e-6)
    assert r["raw_sim"] == pytest.approx(0.75) and r["clip_i"] == pytest.approx(0.75)
    cfg_nodrs = GRPOConfig(use_drs=False, lambdas={"multi_ref": 0.5})
    assert sample_rewards(0.3, [0.7, 0.8], "multi_ref", cfg_nodrs)["reward"] == pytest.approx(0.4285714, abs=1e-6)


def test_grpo_trains_selects_best_and_resumes(tiny_model, tiny_clip, prompt_pool, sft_corpus, tmp_path):
    from trainers.grpo import GRPOConfig, train

    out = tmp_path / "grpo"
    cfg = GRPOConfig(pretrained_model=tiny_model, prompt_pool=prompt_pool, clip_model=tiny_clip,
                     output_dir=str(out), resolution=32, group_size=3, prompts_per_step=2, num_steps=2,
                     sample_steps=3, heldout_every=2, heldout_prompts=2, heldout_images_per_prompt=1,
                     checkpoint_every=1, learning_rate=1e-3, kl_coef=0.1, lambdas={"t2i": 0.0, "multi_ref": 0.5},
                     tasks=["t2i"])
    # the pool also holds multi_ref prompts, which a text-only SD model cannot condition on: refused, by name
    from trainers.families import UnsupportedTaskError

    with pytest.raises(UnsupportedTaskError, match="multi_ref.*'sd'"):
        train(GRPOConfig(**{**cfg.__dict__, "tasks": None, "output_dir": str(tmp_path / "refused")}))
    result = train(cfg)
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    keys = ["loss", "ppo_loss", "kl", "reward_mean", "adv_std", "dar_weights", "dar_w_min", "dar_w_max",
            "lambda_harmonic_mean", "grad_norm", "step_time"]
    _assert_finite(recs, keys)
    assert len(recs[0]["dar_weights"]) == 2 and sum(recs[0]["dar_weights"]) == pytest.approx(2.0, abs=1e-4)
    # step 1: the policy is still the reference (fresh LoRA) -> KL 0 and ratio 1
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-8)
    assert recs[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
    assert "heldout_lambda_harmonic" in recs[1] and math.isfinite(recs[1]["heldout_lambda_harmonic"])
    assert result["best_step"] == 2 and (out / "best_adapter" / "pytorch_lora_weights.safetensors").is_file()
    _assert_adapter_reloads(tiny_model, out / "adapter")

    # resume to 3 steps: continues at step 3 with the best held-out score carried over
    result3 = train(GRPOConfig(**{**cfg.__dict__, "num_steps": 3}))
    assert result3["resumed_from_step"] == 2 and result3["steps"] == 3
    recs3 = _metrics(out)
    assert [r["step"] for r in recs3] == [1, 2, 3]
    assert recs3[2]["best_heldout_lambda_harmonic"] >= recs[1]["heldout_lambda_harmonic"]


# --------------------------------------------------------------------------------------------- Dagster Pipes
def test_trainer_reports_through_dagster_pipes(tiny_model, sft_corpus, tmp_path, monkeypatch):
    """Under Pipes (env params as Dagster's subprocess client sets them) every metric line is logged and the run
    ends with one asset materialization carrying the final metrics, the adapter path and the loss curve."""
    from dagster_pipes import PipesContext, encode_param

    from trainers.sft import SFTConfig, train

    messages = tmp_path / "messages.jsonl"
    context = {"asset_keys": ["sft_run"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
               "partition_key": None, "partition_key_range": None, "partition_time_window": None,
               "run_id": "test-run", "job_name": None, "retry_number": 0, "extras": {}}
    monkeypatch.setenv("DAGSTER_PIPES_CONTEXT", encode_param({"data": context}))
    monkeypatch.setenv("DAGSTER_PIPES_MESSAGES", encode_param({"path": str(messages)}))
    monkeypatch.setattr(PipesContext, "_instance", None)
    out = tmp_path / "sft"
    train(SFTConfig(pretrained_model=tiny_model, corpus_dir=sft_corpus, output_dir=str(out), max_steps=2,
                    batch_size=2, resolution=32, checkpoint_every=0))
    msgs = [json.loads(line) for line in messages.read_text().splitlines() if line.strip()]
    methods = [m["method"] for m in msgs]
    assert methods[0] == "opened" and methods[-1] == "closed"
    logs = [m["params"]["message"] for m in msgs if m["method"] == "log"]
    assert sum('"step": ' in line for line in logs) == 2
    (mat,) = [m["params"] for m in msgs if m["method"] == "report_asset_materialization"]
    md = mat["metadata"]
    assert mat["asset_key"] == "sft_run"
    assert md["steps"]["raw_value"] == 2
    assert md["adapter_path"]["raw_value"] == str(out / "adapter") and md["adapter_path"]["type"] == "path"
    assert len(md["loss_curve"]["raw_value"]) == 2 and md["loss_curve"]["type"] == "json"
    assert math.isfinite(md["final/loss"]["raw_value"])
    assert md["checkpoint_path"]["raw_value"].endswith("step-00000002")
