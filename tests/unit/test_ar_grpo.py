"""AR GRPO (trainers.ar_grpo) on the tiny Janus: exact ratio at the first update, a simple reward rises, LOO-FID keeps
the step's samples diverse, the entropy coefficient adapts toward its target; plus the pure pieces and the default
CLIP / LOO-FID reward path with held-out selection and the saved adapter."""

import json
import logging
import math

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGET_TOKEN = 7


def _pool(path):
    import polars as pl

    rows = [{"prompt_id": f"p{i}", "task": "t2i", "text": t, "split": s} for i, (t, s) in enumerate([
        ("a red cube", "train"), ("a blue sphere", "train"), ("a green cone on grass", "train"),
        ("two yellow stars", "train"), ("a purple triangle", "heldout"), ("an orange ring", "heldout")])]
    pl.DataFrame(rows).write_parquet(path)
    return str(path)


def token_reward(images, rows):
    """A simple reward: the share of the sample's image tokens equal to one code (maximised by collapsing)."""
    share = [float(np.mean(np.asarray(r["image_tokens"]) == TARGET_TOKEN)) for r in rows]
    return {"token_share": share, "lambda_harmonic": share}


def _run(tmp, name, **over):
    from trainers.ar_grpo import train

    cfg = dict(pretrained_model="zoo:janus", prompt_pool=_pool(tmp / "pool.parquet"), output_dir=str(tmp / name),
               num_steps=20, group_size=8, prompts_per_step=2, learning_rate=0.01, lora_rank=8,
               reward_weights={"token_share": 1.0, "loo_fid": 0.0}, entropy_coef=0.0, adaptive_entropy=False,
               kl_coef=0.0, heldout_every=0, checkpoint_every=1000, num_threads=1, seed=0)
    cfg.update(over)
    train(cfg, reward_fn=token_reward)
    return [json.loads(line) for line in open(tmp / name / "metrics.jsonl")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ar_grpo")
    out = {"off": _run(tmp, "off"),
           "loo": _run(tmp, "loo", reward_weights={"token_share": 1.0, "loo_fid": 2.0}),
           "entropy": _run(tmp, "entropy", entropy_coef=0.01, adaptive_entropy=True, target_entropy_ratio=0.9,
                           entropy_coef_lr=2.0, entropy_coef_min=0.001)}
    for name, hist in out.items():  # the curves, for the report (pytest -s)
        print(name, "reward", [round(m["reward_token_share_mean"], 3) for m in hist])
        print(name, "diversity", [round(m["diversity"], 4) for m in hist])
        print(name, "entropy", [round(m["token_entropy"], 3) for m in hist],
              "coef", [round(m["entropy_coef"], 4) for m in hist], "target", round(hist[0]["target_entropy"], 3))
    return out


# ---------------------------------------------------------------------------------------------- pure pieces
def test_entropy_coef_update_moves_toward_target_and_clips():
    from trainers.losses import entropy_coef_update

    up = entropy_coef_update(math.log(0.1), entropy=1.0, target=2.0, lr=0.5)
    assert up == pytest.approx(math.log(0.1) + 0.5)  # entropy below target: α grows
    assert entropy_coef_update(math.log(0.1), 3.0, 2.0, 0.5) == pytest.approx(math.log(0.1) - 0.5)
    assert entropy_coef_update(math.log(0.9), 0.0, 5.0, 1.0, coef_max=1.0) == pytest.approx(0.0)
    assert entropy_coef_update(math.log(0.01), 9.0, 1.0, 1.0, coef_min=1e-3) == pytest.approx(math.log(1e-3))


def test_categorical_kl_entropy_pairwise_distance_and_composite():
    import torch

    from trainers.ar_grpo.ar_grpo_trainer import composite_reward
    from trainers.losses import categorical_entropy, categorical_kl, mean_pairwise_distance

    p = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    q = torch.zeros(1, 2)
    assert float(categorical_kl(p, q)) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert float(categorical_kl(p, p)) == pytest.approx(0.0, abs=1e-7)
    assert float(categorical_entropy(q)) == pytest.approx(math.log(2))
    assert mean_pairwise_distance([[0, 0], [3, 4], [0, 4]]) == pytest.approx((5 + 4 + 3) / 3)
    r = composite_reward({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]}, {"a": 2.0, "b": 1.0, "c": 0.0})
    assert r == pytest.approx(2.0 * np.array([-1.0, 0.0, 1.0]) / np.std([1, 2, 3]), rel=1e-6)
    with pytest.raises(ValueError, match="preference"):
        composite_reward({"a": [1.0, 2.0, 3.0]}, {"a": 1.0, "preference": 1.0})


# ---------------------------------------------------------------------------------------------- learning
def test_first_update_ratio_is_exactly_one(runs):
    for hist in runs.values():
        assert hist[0]["first_logp_abs_diff"] < 1e-5
        assert hist[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_ar_grpo_raises_a_simple_reward(runs):
    reward = [m["reward_token_share_mean"] for m in runs["off"]]
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.5, reward


def test_loo_fid_keeps_the_step_diverse(runs):
    off = [m["diversity"] for m in runs["off"]]
    loo = [m["diversity"] for m in runs["loo"]]
    assert off[0] == pytest.approx(loo[0])  # the same first step (same seeds, same policy)
    assert np.mean(loo[-4:]) > np.mean(off[-4:]) + 0.05, (off, loo)
    assert all(np.isfinite(m["loo_fid_mean"]) and m["loo_fid_std"] > 0 for m in runs["loo"])


def test_entropy_coefficient_adapts_toward_its_target(runs):
    hist = runs["entropy"]
    target = hist[0]["target_entropy"]
    assert target == pytest.approx(0.9 * hist[0]["token_entropy"], rel=0.05)
    for m in hist:  # α moves up while the entropy is below target, down while above
        change = m["entropy_coef_next"] - m["entropy_coef"]
        if m["token_entropy"] < target:
            assert change >= 0
        else:
            assert change <= 0
    coefs = [m["entropy_coef"] for m in hist]
    assert max(coefs) > 10 * coefs[0]  # it rose when the reward pulled the entropy under target
    off_final = runs["off"][-1]["token_entropy"]
    assert abs(hist[-1]["token_entropy"] - target) < abs(off_final - target) - 1.0


# ---------------------------------------------------------------------------------------------- default path
def test_clip_and_loo_fid_reward_selection_and_adapter(tmp_path):
    from pipelines.generation import GenerationRequest, ImageGenerator
    from trainers.ar_grpo import train

    out = tmp_path / "run"
    result = train(dict(pretrained_model="zoo:janus", prompt_pool=_pool(tmp_path / "pool.parquet"),
                        output_dir=str(out), num_steps=2, group_size=4, prompts_per_step=2, learning_rate=0.01,
                        guidance_scale=3.0, reward_weights={"clip_t": 1.0, "loo_fid": 0.5}, heldout_every=1,
                        heldout_prompts=2, checkpoint_every=1, fid_warmup_batches=1, num_threads=1))
    hist = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for key in ("reward_clip_t_mean", "reward_loo_fid_mean", "loo_fid_mean", "fid_to_reference", "token_entropy",
                "kl", "entropy_coef", "diversity", "heldout_lambda_harmonic"):
        assert all(np.isfinite(m[key]) for m in hist), key
    assert hist[0]["first_logp_abs_diff"] < 1e-5  # with CFG too
    assert result["best_step"] in (1, 2) and (out / "best_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-00000002" / "adapter" / "fid_moments.safetensors").is_file()

    req = [GenerationRequest(key="k", text="a purple triangle", seed=3)]
    gen = ImageGenerator("zoo:janus", guidance_scale=3.0, batch_size=1, cpu_threads=1)
    base = np.asarray(gen.generate(req)[0])
    gen.load_lora(result["adapter_path"])  # transformers' own load_adapter reads the PEFT adapter
    tuned = np.asarray(gen.generate(req)[0])
    assert gen.generator_id != ImageGenerator("zoo:janus", guidance_scale=3.0).generator_id
    assert not np.array_equal(base, tuned)


def test_tiny_ar_profile_section_builds_the_config_and_the_asset_is_registered():
    from pipelines.definitions import ALL_ASSETS
    from pipelines.profiles import load_profile
    from trainers.ar_grpo import ARGRPOConfig
    from trainers.common import config_from_dict

    profile = load_profile("tiny_ar")
    assert profile["generation"]["generators"]["t2i"]["model"] == "zoo:janus"
    cfg = config_from_dict(ARGRPOConfig, profile["ar_grpo"])  # unknown keys are errors
    assert cfg.guidance_scale == 1.0 and cfg.reward_weights["loo_fid"] > 0
    assert not load_profile("tiny").get("ar_grpo")  # the default demo never runs it
    assert "ar_grpo_run" in {k.to_user_string() for a in ALL_ASSETS for k in getattr(a, "keys", [])}


def test_a_resumed_run_continues_from_its_checkpoint_as_if_never_stopped(tmp_path, caplog):
    """Stopped after step 2 and run again with more steps, AR GRPO loads the checkpoint (adapter, optimizer, the
    entropy coefficient and its target) and its steps 3-4 equal an uninterrupted run's."""
    entropy = dict(entropy_coef=0.01, adaptive_entropy=True, target_entropy_ratio=0.9, entropy_coef_lr=2.0)
    straight = _run(tmp_path, "straight", num_steps=4, checkpoint_every=2, **entropy)
    _run(tmp_path, "stopped", num_steps=2, checkpoint_every=2, **entropy)
    caplog.set_level(logging.INFO)
    resumed = _run(tmp_path, "stopped", num_steps=4, checkpoint_every=2, **entropy)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # lines 1-2 kept, 3-4 appended
    for key in ("loss", "entropy_coef", "target_entropy", "reward_token_share_mean"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in straight], rel=1e-4, abs=1e-6), key
    assert f"resumed from {tmp_path / 'stopped' / 'checkpoints'}" in caplog.text and "at step 2" in caplog.text
