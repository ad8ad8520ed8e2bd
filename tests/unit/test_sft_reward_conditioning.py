"""Reward-conditioned SFT (multi-reward as condition) on the tiny pipeline, and the SFT data stream.

Checks: the reward embedding (scores -> tokens, the unknown token for missing dimensions, safetensors save/load),
a few conditioned training steps that change it, generation through the diffusers pipeline with
``prompt_embeds`` from :func:`encode_prompts_with_rewards` (different requested scores -> different images), an
exact resume (embedding and its optimizer state restored: the resumed run equals an uninterrupted one), and the
DataLoader stream resuming at any position with several workers.
"""

from __future__ import annotations

import json
import math
import os
import time
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

T2I_DIMS = ["prompt_alignment", "visual_quality", "aesthetics"]





def _meta(i: int) -> dict:
    """Label columns as the SFT corpus carries them: t2i samples with the t2i rubric's scores (one null, one NaN),
    and every fourth sample scored with the edit rubric's dimensions (``visual_quality`` is shared, the other t2i
    dimensions are absent -> their "unknown" tokens). Those are t2i samples too: the tiny SD model is text-only, and
    a real edit sample (with its source image) is refused there rather than trained as t2i."""
    if i % 4 == 3:
        return {"task": "t2i", "instruction_following": 4, "detail_preservation": 3, "visual_quality": i % 6,
                "reward": 0.4, "clip_t": 0.3}
    return {"task": "t2i", "prompt_alignment": i % 6, "visual_quality": (2 * i) % 6,
            "aesthetics": None if i % 5 == 0 else (math.nan if i % 7 == 0 else 5 - i % 6),
            "reward": 0.5, "clip_t": 0.3, "lambda_harmonic": 0.3}


@pytest.fixture(scope="module")
def scored_corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("scored_corpus") / "v1"
    samples = [{"__key__": f"s{i:04d}", "jpg": noisy_jpeg(COLOURS[i % 6], i, size=32), "txt": CAPTIONS[i % 6],
                "json": json.dumps(_meta(i)).encode()} for i in range(12)]
    return write_corpus(root, samples, per_shard=5)  # shards of 5, 5, 2


def _cfg(model: str, corpus: str, out: Path, **kw):
    from trainers.sft import SFTConfig

    base = dict(pretrained_model=model, corpus_dir=corpus, output_dir=str(out), max_steps=3, batch_size=2,
                resolution=32, checkpoint_every=2, seed=0, learning_rate=1e-2, reward_conditioning=True,
                reward_dropout=0.3, reward_dimension_dropout=0.2, caption_dropout=0.2)
    base.update(kw)
    return SFTConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _load_pipe(model: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------- the module
def test_config_defaults_to_the_t2i_rubric():
    from labelers.rubrics import load_rubric
    from trainers.sft import SFTConfig

    cfg = SFTConfig()
    assert cfg.reward_conditioning is False and cfg.reward_scale == 5.0
    assert cfg.reward_dimensions == list(load_rubric("t2i").dimension_names) == T2I_DIMS


def test_reward_embedding_scores_unknown_and_roundtrip(tmp_path):
    from trainers.conditioning import RewardEmbedding, load_reward_embedding, save_reward_embedding

    emb = RewardEmbedding(T2I_DIMS, 32, tokens_per_dimension=2, seed=1)
    metas = [{"prompt_alignment": 5, "visual_quality": "4", "aesthetics": 3.5, "reward": 0.9},
             {"task": "edit", "visual_quality": 2, "instruction_following": 4},  # t2i dims absent
             {"prompt_alignment": None, "visual_quality": math.nan, "aesthetics": True}]  # all unusable
    scores = emb.scores_tensor(metas)
    assert scores.shape == (3, 3)
    assert scores[0].tolist() == [5.0, 4.0, 3.5]
    assert math.isnan(scores[1, 0]) and scores[1, 1] == 2.0 and math.isnan(scores[1, 2])
    assert torch.isnan(scores[2]).all()
    with pytest.raises(ValueError, match="unknown reward dimension"):
        emb.scores_tensor([{"prompt_alignmnet": 5}], strict=True)

    with torch.no_grad():
        tokens = emb(scores)
    assert tokens.shape == (3, 3 * 2, 32) and torch.isfinite(tokens).all()
    unknown = emb.unknown_embedding  # (D, K, W)
    # missing dimensions get the learned unknown token of that dimension, known ones do not
    torch.testing.assert_close(tokens[1, 0:2], unknown[0], rtol=0, atol=0)
    torch.testing.assert_close(tokens[1, 4:6], unknown[2], rtol=0, atol=0)
    assert not torch.allclose(tokens[1, 2:4], unknown[1])
    torch.testing.assert_close(tokens[2], unknown.reshape(6, 32), rtol=0, atol=0)
    # different scores -> different tokens
    with torch.no_grad():
        hi, lo = emb(torch.full((1, 3), 5.0)), emb(torch.zeros(1, 3))
        half = emb(torch.full((1, 3), 4.5))
    assert (hi - lo).abs().max() > 1e-3 and (hi - half).abs().max() > 1e-4

    save_reward_embedding(emb, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward_embedding.json", "reward_embedding.safetensors"]
    again = load_reward_embedding(tmp_path)
    assert again.dimensions == tuple(T2I_DIMS) and again.tokens_per_dimension == 2 and not again.training
    with torch.no_grad():
        torch.testing.assert_close(again(scores), tokens, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- training
def test_conditioned_sft_trains_saves_and_generates(tiny_model, scored_corpus, tmp_path):
    from trainers.conditioning import (RewardEmbedding, encode_prompts_with_rewards, load_reward_embedding,
                                       reward_pipeline_kwargs, save_reward_embedding)
    from trainers.sft import train

    out = tmp_path / "sft_cond"
    cfg = _cfg(tiny_model, scored_corpus, out)
    result = train(cfg)
    assert result["steps"] == 3 and result["reward_dimensions"] == T2I_DIMS
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for rec in recs:
        assert all(math.isfinite(rec[k]) for k in ("loss", "grad_norm", "reward_known", "reward_kept"))
    adapter = out / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"pytorch_lora_weights.safetensors", "reward_embedding.safetensors",
                                                    "reward_embedding.json"}
    assert Path(result["reward_embedding_file"]) == adapter / "reward_embedding.safetensors"
    ckpt = out / "checkpoints" / "step-00000003" / "adapter" / "reward_embedding.safetensors"
    assert ckpt.is_file()

    # every parameter of the embedding moved away from its (seeded) initialisation
    emb = load_reward_embedding(adapter)
    init = RewardEmbedding(T2I_DIMS, 32, seed=cfg.seed)
    for (name, trained), (_, start) in zip(emb.state_dict().items(), init.state_dict().items()):
        assert (trained - start).abs().max() > 1e-4, f"{name} did not train"
    # the final adapter's embedding is the last checkpoint's
    ck = load_reward_embedding(ckpt.parent)
    for a, b in zip(emb.state_dict().values(), ck.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    pipe = _load_pipe(tiny_model)
    pipe.load_lora_weights(str(adapter))
    top = {d: 5.0 for d in T2I_DIMS}
    pe = encode_prompts_with_rewards(pipe, ["a red square", "a blue circle"], top, emb)
    assert pe.shape == (2, 77 + 3, 32)
    # saved + reloaded reproduces the same prompt_embeds exactly
    save_reward_embedding(emb, tmp_path / "copy")
    reloaded = load_reward_embedding(tmp_path / "copy")
    pe2 = encode_prompts_with_rewards(pipe, ["a red square", "a blue circle"], top, reloaded)
    torch.testing.assert_close(pe, pe2, rtol=0, atol=0)
    plain = encode_prompts_with_rewards(pipe, ["a red square"], None, emb)
    assert plain.shape == (1, 77, 32)
    torch.testing.assert_close(pe[:1, :77], plain, rtol=0, atol=0)
    # only the known dimensions change; a dimension left out is the unknown token
    partial = encode_prompts_with_rewards(pipe, ["a red square"], {"prompt_alignment": 5}, emb)
    torch.testing.assert_close(partial[0, 78:], emb.unknown_embedding[1:].reshape(2, 32), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown reward dimension"):
        encode_prompts_with_rewards(pipe, ["x"], {"asthetics": 5}, emb)

    def generate(scores):
        kwargs = reward_pipeline_kwargs(pipe, ["a red square"], scores, emb)
        return pipe(**kwargs, num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    best, worst = generate(top), generate({d: 0.0 for d in T2I_DIMS})
    again = generate(top)
    assert best.shape == (1, 3, 32, 32) and torch.isfinite(best).all()
    torch.testing.assert_close(best, again, rtol=0, atol=0)
    assert (best - worst).abs().max() > 1e-4  # asking for other scores changes the image
    unconditioned = generate(None)  # the plain pipeline (what reward_dropout trains) still works
    assert unconditioned.shape == (1, 3, 32, 32) and torch.isfinite(unconditioned).all()


def test_conditioned_sft_resumes_exactly(tiny_model, scored_corpus, tmp_path):
    from trainers.conditioning import load_reward_embedding
    from trainers.sft import train

    out = tmp_path / "resumed"
    first = train(_cfg(tiny_model, scored_corpus, out, max_steps=2, dataloader_num_workers=2))
    assert first["steps"] == 2
    opt_state = torch.load(out / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert len(opt_state["param_groups"]) == 2  # LoRA, then the reward embedding
    n_emb = len(list(load_reward_embedding(out / "adapter").parameters()))
    assert len(opt_state["param_groups"][1]["params"]) == n_emb
    assert all(i in opt_state["state"] for i in opt_state["param_groups"][1]["params"])

    result = train(_cfg(tiny_model, scored_corpus, out, max_steps=5, dataloader_num_workers=2))
    assert result["resumed_from_step"] == 2 and result["steps"] == 5
    straight = tmp_path / "straight"
    train(_cfg(tiny_model, scored_corpus, straight, max_steps=5, dataloader_num_workers=2))
    resumed_recs, straight_recs = _metrics(out), _metrics(straight)
    assert [r["step"] for r in resumed_recs] == [1, 2, 3, 4, 5]
    for key in ("loss", "grad_norm", "reward_known", "reward_kept"):
        assert [r[key] for r in resumed_recs] == pytest.approx([r[key] for r in straight_recs], rel=1e-4, abs=1e-6)
    a, b = load_reward_embedding(out / "adapter"), load_reward_embedding(straight / "adapter")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
    # a different worker count changes the data order: it must not silently resume
    with pytest.raises(ValueError, match="different config"):
        train(_cfg(tiny_model, scored_corpus, out, max_steps=6, dataloader_num_workers=1))


def test_plain_sft_writes_no_reward_embedding(tiny_model, scored_corpus, tmp_path):
    from trainers.sft import train

    out = tmp_path / "plain"
    result = train(_cfg(tiny_model, scored_corpus, out, reward_conditioning=False, max_steps=1,
                        dataloader_num_workers=0))
    assert result["steps"] == 1 and "reward_embedding_file" not in result
    assert [p.name for p in (out / "adapter").iterdir()] == ["pytorch_lora_weights.safetensors"]
    assert "reward_known" not in _metrics(out)[0]
    opt_state = torch.load(out / "checkpoints" / "step-00000001" / "optimizer.pt", weights_only=True)
    assert len(opt_state["param_groups"]) == 1


# --------------------------------------------------------------------------------------------- data stream
@pytest.mark.parametrize("workers,chunk", [(2, 3), (0, 2)])
def test_stream_resumes_at_any_position(scored_corpus, workers, chunk):
    from trainers.sft.stream import SFTStream

    kw = dict(resolution=16, chunk_size=chunk, seed=5, shuffle_buffer=4, num_workers=workers)
    with SFTStream(scored_corpus, **kw) as s:
        ref = []
        for _ in range(10):
            ref += s.keys(3)
            assert len(s._pending) <= 2  # workers with unequal shares (5+2 vs 5 samples) do not run ahead
    assert sorted(ref[:12]) == sorted(ref[12:24]) == [f"s{i:04d}" for i in range(12)]  # exact epochs
    assert ref[:12] != ref[12:24]  # reshuffled per epoch
    for cut in (1, 5, 6, 11, 12, 13, 20):
        with SFTStream(scored_corpus, **kw) as s:
            head = s.keys(cut)
            pos = s.position
        with SFTStream(scored_corpus, **kw, position=pos) as s:
            mid = s.keys(4)
            pos2 = s.position
        with SFTStream(scored_corpus, **kw, position=pos2) as s:  # a resumed stream resumes too
            tail = s.keys(30 - cut - 4)
        assert head + mid + tail == ref, f"cut at {cut} ({pos})"
    with SFTStream(scored_corpus, **kw) as s:
        batch = s.take(5)
    assert batch["pixels"].shape == (5, 3, 16, 16) and len(batch["captions"]) == len(batch["meta"]) == 5
    # closing while the workers wait for the next epoch to open is prompt
    s = SFTStream(scored_corpus, **kw)
    s.keys(11)
    time.sleep(0.2)
    t0 = time.perf_counter()
    s.close()
    assert time.perf_counter() - t0 < 3.0
