"""The trainers learn on a flow-matching family too (the tiny Qwen-Image, CPU, one thread, fixed seeds):
SFT's flow-matching loss falls on a fixed evaluation batch, Diffusion-DPO's implicit accuracy on a learnable toy
preference (bright over dark) rises well above 0.5, and Flow-GRPO (Flow-SDE) raises a simple reward (mean pixel
brightness of the decoded image) over a few dozen steps. ``pytest -s`` prints the curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from tiny_corpus import CAPTIONS, write_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = 32
MODEL = "qwen_image"


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory) -> str:
    from pipelines.zoo import build_zoo

    return str(build_zoo(tmp_path_factory.mktemp("flow_zoo"), only=[MODEL])[MODEL])


def _jpeg(arr01) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(arr01, 0, 1) * 255).astype("uint8")).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _texture(seed: int):
    rng = np.random.default_rng(seed)
    return np.clip(0.5 + 0.15 * rng.standard_normal((SIZE, SIZE, 3)), 0, 1)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _means(values, width):
    return [round(float(np.mean(values[i:i + width])), 4) for i in range(0, len(values), width)]


def _texture_corpus(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "jpg": _jpeg(_texture(i % 4)), "txt": CAPTIONS[i % 4],
                "json": {"task": "t2i"}} for i in range(16)]
    return write_corpus(tmp_path / "c", samples, per_shard=16)


def _train_sft(flow_model, corpus, out, steps: int = 40, **overrides) -> dict:
    from trainers.sft import SFTConfig, train

    settings = {"resolution": SIZE, "max_steps": steps, "batch_size": 4, "lora_rank": 8, "learning_rate": 2e-3,
                "checkpoint_every": 100, "dataloader_num_workers": 0, "num_threads": 1, **overrides}
    return train(SFTConfig(pretrained_model=flow_model, corpus_dir=corpus, output_dir=str(out), **settings))


def _eval_loss(flow_model, adapter) -> float:
    """A fixed evaluation batch: the same (image, noise, σ) draws on the textures' posterior-mean latents."""
    from PIL import Image

    from trainers.data import images_to_tensor
    from trainers.families import load_family

    family = load_family(flow_model)
    if adapter:
        family.pipe.load_lora_weights(adapter)
    images = [Image.fromarray((_texture(i % 4) * 255).astype("uint8")) for i in range(8)]
    x0 = family.images_to_latents(images_to_tensor(images, SIZE), sample=False)
    g = torch.Generator().manual_seed(123)
    cond = family.encode([CAPTIONS[i % 4] for i in range(8)], None, SIZE)
    losses = []
    with torch.no_grad():
        for _ in range(4):
            x_t, t, target = family.training_sample(x0, g)
            losses.append(float(((family.predict(x_t, t, cond) - target) ** 2).mean()))
    return float(np.mean(losses))


def test_flow_sft_loss_falls(flow_model, tmp_path):
    result = _train_sft(flow_model, _texture_corpus(tmp_path), tmp_path / "o")
    base, tuned = _eval_loss(flow_model, None), _eval_loss(flow_model, result["adapter_path"])
    curve = [r["loss"] for r in _metrics(tmp_path / "o")]
    print(f"\nflow SFT loss per 10 steps: {_means(curve, 10)}; fixed eval batch {base:.4f} -> {tuned:.4f}")
    assert tuned < base * 0.97


def test_flow_sft_on_posterior_means_learns_the_images_not_the_vae_noise(tmp_path):
    """zoo:world_gen's VAE was fitted as an autoencoder only: its posterior std is ~1, so a posterior sample is the
    image's latent plus unit noise. SFT with ``sample_latents=False`` trains on the means (what the generator was
    pre-trained on) and fits the images far better than on samples, where it learns to draw that noise."""
    from pipelines.proving_world import png_bytes, render, world_items
    from pipelines.zoo import resolve_model

    model = resolve_model("zoo:world_gen")
    items = world_items(5, "t2i", 16, max_objects=1, plain=True)
    samples = [{"__key__": f"w{i:03d}", "jpg": _png_to_jpeg(png_bytes(render(it.scene, 48))), "txt": it.text,
                "json": {"task": "t2i"}} for i, it in enumerate(items)]
    corpus = write_corpus(tmp_path / "c", samples, per_shard=16)
    overrides = {"resolution": 48, "learning_rate": 1e-3}
    sampled = _train_sft(model, corpus, tmp_path / "sampled", steps=20, **overrides)
    means = _train_sft(model, corpus, tmp_path / "means", steps=20, sample_latents=False, **overrides)
    train_loss = {name: float(np.mean([r["loss"] for r in _metrics(tmp_path / name)][-10:]))
                  for name in ("sampled", "means")}
    print(f"\nlast-10 SFT train loss {train_loss}")
    assert train_loss["means"] < 0.3 * train_loss["sampled"]
    assert sampled["adapter_path"] and means["adapter_path"]


def _png_to_jpeg(data: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_flow_dpo_implicit_accuracy_rises(flow_model, tmp_path):
    from trainers.dpo import DPOConfig, train

    samples = []
    for i in range(16):
        tex = _texture(100 + i)
        samples.append({"__key__": f"p{i:03d}", "jpg_0.jpg": _jpeg(tex * 0.4 + 0.6), "jpg_1.jpg": _jpeg(tex * 0.4),
                        "caption.txt": CAPTIONS[i % 6], "label_0.txt": "1", "label_1.txt": "0",
                        "json": {"task": "t2i"}})
    corpus = write_corpus(tmp_path / "c", samples, per_shard=16)
    train(DPOConfig(pretrained_model=flow_model, corpus_dir=corpus, output_dir=str(tmp_path / "o"), resolution=SIZE,
                    max_steps=30, batch_size=4, lora_rank=8, learning_rate=3e-4, beta=500.0, sample_latents=False,
                    checkpoint_every=100, num_threads=1))
    recs = _metrics(tmp_path / "o")
    acc, margin = [r["implicit_acc"] for r in recs], [r["margin"] for r in recs]
    print(f"\nflow DPO implicit accuracy per 5 steps: {_means(acc, 5)}; margin {_means(margin, 5)}")
    assert abs(margin[0]) < 1e-6  # step 1: the policy is the reference (accuracy 0 by the strict > 0 rule)
    assert np.mean(acc[-10:]) >= 0.8 and np.mean(margin[-10:]) > np.mean(margin[:5])


def test_flow_grpo_raises_brightness(flow_model, tmp_path):
    import polars as pl

    from trainers.grpo import GRPOConfig, train

    def brightness(images, rows):
        values = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
        return {"reward": values, "lambda_harmonic": values, "raw_sim": values, "clip_t": values,
                "clip_i_reward": [float("nan")] * len(values)}

    rows = [{"prompt_id": f"q{i}", "task": "t2i", "text": CAPTIONS[i % 6], "reference_images": [],
             "reference_types": [], "split": "train", "difficulty": 0.5} for i in range(6)]
    pool = tmp_path / "pool.parquet"
    pl.DataFrame(rows, schema_overrides={"reference_images": pl.List(pl.String),
                                         "reference_types": pl.List(pl.String)}).write_parquet(pool)
    train(GRPOConfig(pretrained_model=flow_model, prompt_pool=str(pool), output_dir=str(tmp_path / "o"),
                     resolution=SIZE, num_steps=36, group_size=4, prompts_per_step=2, sample_steps=4, eta=0.7,
                     sde_type="flow_sde", learning_rate=2e-2, lora_rank=8, kl_coef=0.0, clip_range=0.2,
                     heldout_every=0, checkpoint_every=100, num_threads=1, train_micro_batch=8),
          reward_fn=brightness)
    reward = [r["reward_mean"] for r in _metrics(tmp_path / "o")]
    print(f"\nflow GRPO mean reward per 6 steps: {_means(reward, 6)}")
    assert np.mean(reward[-6:]) > np.mean(reward[:6]) + 0.004  # ~10x the first window's step-to-step spread
