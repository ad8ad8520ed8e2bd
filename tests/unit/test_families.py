"""Every model family on its tiny zoo model: generate, SFT, DPO and GRPO for 2 steps, adapters that the family's own
diffusers pipeline loads with ``load_lora_weights``, GRPO's log-probability recomputation, and task refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

torch = pytest.importorskip("torch")

from tiny_corpus import CAPTIONS, COLOURS, noisy_jpeg, write_corpus  # noqa: E402

SIZE = 32
# zoo builder -> (family, tasks the checkpoint trains on here)
MODELS = {
    "t2i": ("sd", ["t2i"]),
    "edit": ("sd", ["edit", "multi_ref"]),
    "sdxl": ("sdxl", ["t2i"]),
    "sd3": ("sd3", ["t2i"]),
    "flux": ("flux", ["t2i"]),
    "flux_kontext": ("flux", ["t2i", "edit", "multi_ref"]),
    "qwen_image": ("qwen_image", ["t2i"]),
    "qwen_image_edit": ("qwen_image", ["t2i", "edit", "multi_ref"]),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from pipelines.zoo import build_zoo

    root = tmp_path_factory.mktemp("family_zoo")
    return {name: str(path) for name, path in build_zoo(root, only=[*MODELS, "clip"]).items()}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _members(task: str, seed: int) -> dict:
    out = {}
    if task == "edit":
        out["src.jpg"] = noisy_jpeg(COLOURS[seed % 6], 900 + seed, SIZE)
    if task == "multi_ref":
        for k in range(2):
            out[f"ref_{k}.jpg"] = noisy_jpeg(COLOURS[(seed + k) % 6], 950 + seed + k, SIZE)
    return out


def _sft_corpus(root: Path, tasks: list[str]) -> str:
    samples = []
    for i in range(8):
        task = tasks[i % len(tasks)]
        samples.append({"__key__": f"s{i:04d}", "jpg": noisy_jpeg(COLOURS[i % 6], i, SIZE), "txt": CAPTIONS[i % 6],
                        "json": {"task": task, "reward": 0.5}, **_members(task, i)})
    return write_corpus(root, samples, per_shard=8)


def _pref_corpus(root: Path, tasks: list[str]) -> str:
    samples = []
    for i in range(8):
        task = tasks[i % len(tasks)]
        samples.append({"__key__": f"p{i:04d}", "jpg_0.jpg": noisy_jpeg(COLOURS[i % 6], 100 + i, SIZE),
                        "jpg_1.jpg": noisy_jpeg(COLOURS[(i + 3) % 6], 200 + i, SIZE), "caption.txt": CAPTIONS[i % 6],
                        "label_0.txt": "1", "label_1.txt": "0", "json": {"task": task, "pair_id": f"p{i}"},
                        **_members(task, i)})
    return write_corpus(root, samples, per_shard=8)


def _pool(root: Path, tasks: list[str]) -> str:
    import polars as pl
    from PIL import Image

    refs, rows = [], []
    for k in range(2):
        path = root / f"ref_{k}.png"
        Image.new("RGB", (SIZE, SIZE), COLOURS[k]).save(path)
        refs.append(str(path))
    for i, task in enumerate(tasks * 2):
        rows.append({"prompt_id": f"q{i}", "task": task, "text": CAPTIONS[i % 6],
                     "source_image": refs[0] if task == "edit" else None,
                     "reference_images": refs if task == "multi_ref" else [],
                     "reference_types": ["subject", "style"] if task == "multi_ref" else [],
                     "split": "heldout" if i == 0 else "train", "difficulty": 0.5})
    path = root / "pool.parquet"
    pl.DataFrame(rows, schema_overrides={"reference_images": pl.List(pl.String), "source_image": pl.String,
                                         "reference_types": pl.List(pl.String)}).write_parquet(path)
    return str(path)


def _brightness_reward(images, rows):
    import numpy as np

    values = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
    return {"reward": values, "lambda_harmonic": values, "raw_sim": values, "clip_t": values,
            "clip_i_reward": [math.nan] * len(values)}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _generator(model: str, task: str, steps: int = 2):
    from pipelines.generation import ImageGenerator
    from trainers.families import input_images

    n = input_images(model)
    return ImageGenerator(model=model, kind="edit" if n else "t2i", steps=steps, guidance_scale=2.0,
                          width=SIZE, height=SIZE, batch_size=2, cpu_threads=1,
                          reference_input=("native" if n > 1 else "grid" if n == 1 else None))


def _requests(task: str):
    from PIL import Image

    from pipelines.generation import GenerationRequest

    img = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    ref = Image.new("RGB", (SIZE, SIZE), (40, 40, 200))
    if task == "edit":
        return [GenerationRequest("a", "make it blue", 0, source_image=img),
                GenerationRequest("b", "make it green", 1, source_image=img)]
    if task == "multi_ref":
        return [GenerationRequest("a", "the subject in this style", 0, reference_images=(img, ref)),
                GenerationRequest("b", "the subject", 1, reference_images=(ref, img))]
    return [GenerationRequest("a", "a red square", 0), GenerationRequest("b", "a blue circle", 1)]


# ------------------------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("name", list(MODELS))
def test_family_is_read_from_the_checkpoint(zoo, name):
    from trainers.families import detect_family

    assert detect_family(zoo[name]) == MODELS[name][0]


def test_text_only_family_refuses_image_tasks_by_name(zoo):
    from trainers.families import UnsupportedTaskError, load_family

    family = load_family(zoo["flux"])
    with pytest.raises(UnsupportedTaskError, match=r"'multi_ref'.*'flux'.*FluxPipeline"):
        family.check_task("multi_ref")
    edit_only = load_family(zoo["edit"])
    with pytest.raises(UnsupportedTaskError, match="'t2i'.*InstructPix2Pix"):
        edit_only.check_task("t2i")


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_every_task_the_family_takes(zoo, name):
    gen = _generator(zoo[name], MODELS[name][1][0])
    for task in MODELS[name][1]:
        if task == "multi_ref" and gen.reference_input == "grid":
            continue  # single-image models get the grid from the caller (assets/candidates.py)
        images = gen.generate(_requests(task))
        assert len(images) == 2 and all(im.size == (SIZE, SIZE) for im in images)
        again = gen.generate(_requests(task))
        assert [im.tobytes() for im in images] == [im.tobytes() for im in again]  # seeded


def test_native_multi_image_input_changes_the_output(zoo):
    """Qwen-Image-Edit-Plus sees every reference: swapping their order or dropping one changes the image."""
    from PIL import Image

    from pipelines.generation import GenerationRequest

    gen = _generator(zoo["qwen_image_edit"], "multi_ref")
    a = Image.new("RGB", (SIZE, SIZE), (220, 20, 20))
    b = Image.new("RGB", (SIZE, SIZE), (20, 20, 220))
    two = gen.generate([GenerationRequest("k", "x", 0, reference_images=(a, b))])[0]
    swapped = gen.generate([GenerationRequest("k", "x", 0, reference_images=(b, a))])[0]
    one = gen.generate([GenerationRequest("k", "x", 0, reference_images=(a,))])[0]
    assert two.tobytes() != swapped.tobytes() and two.tobytes() != one.tobytes()
    assert gen.params["reference_input"] == "native"


@pytest.mark.parametrize("name", ["sd3", "flux", "qwen_image"])
def test_family_sampler_matches_the_diffusers_pipeline(zoo, name):
    """The flow families' own Euler sampler reproduces the family's diffusers pipeline __call__ (same latents)."""
    import diffusers

    from trainers.families import load_family

    family = load_family(zoo[name])
    pipe = family.pipe
    kwargs = {"max_sequence_length": family.max_sequence_length} if name != "qwen_image" else {}
    if name == "qwen_image":
        kwargs["max_sequence_length"] = family.max_sequence_length
    want = pipe(prompt=["a red square"], num_inference_steps=3, guidance_scale=1.0 if name != "qwen_image" else None,
                height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(3), output_type="pt",
                **{k: v for k, v in kwargs.items()}).images
    cond = family.encode(["a red square"], None, SIZE)
    noise = family.initial_noise([torch.Generator().manual_seed(3)], SIZE)
    with torch.no_grad():
        out = family.sample(cond, None, noise, 3, SIZE)
        got = (family.latents_to_images(out["latents"][-1], SIZE) / 2 + 0.5).clamp(0, 1)
    assert isinstance(pipe, getattr(diffusers, family.pipeline_class))
    assert torch.allclose(got.float(), want.float(), atol=2e-3), float((got - want).abs().max())


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", list(MODELS))
def test_sft_dpo_grpo_on_every_family(zoo, name, tmp_path):
    """Two steps of each trainer with finite losses, conditioned on the task's images; every adapter loads with
    the family's diffusers pipeline (``load_lora_weights``) and changes what it generates."""
    from trainers.dpo import DPOConfig
    from trainers.dpo import train as train_dpo
    from trainers.grpo import GRPOConfig
    from trainers.grpo import train as train_grpo
    from trainers.sft import SFTConfig
    from trainers.sft import train as train_sft

    model, (family_name, tasks) = zoo[name], MODELS[name]
    common = dict(pretrained_model=model, resolution=SIZE, lora_rank=2, checkpoint_every=10, num_threads=1)
    sft = train_sft(SFTConfig(**common, corpus_dir=_sft_corpus(tmp_path / "sft_c", tasks), max_steps=2,
                              batch_size=2, output_dir=str(tmp_path / "sft"), dataloader_num_workers=0))
    dpo = train_dpo(DPOConfig(**common, corpus_dir=_pref_corpus(tmp_path / "dpo_c", tasks), max_steps=2,
                              batch_size=2, beta=100.0, output_dir=str(tmp_path / "dpo"), sample_latents=False))
    grpo = train_grpo(GRPOConfig(**common, prompt_pool=_pool(tmp_path, tasks), output_dir=str(tmp_path / "grpo"),
                                 group_size=2, prompts_per_step=2, num_steps=2, sample_steps=2, heldout_every=0,
                                 heldout_prompts=1, heldout_images_per_prompt=1, guidance_scale=2.0,
                                 train_micro_batch=4, init_adapter=sft["adapter_path"]),
                      reward_fn=_brightness_reward)
    for result, out in ((sft, "sft"), (dpo, "dpo"), (grpo, "grpo")):
        assert result["family"] == family_name
        recs = _metrics(tmp_path / out)
        assert [r["step"] for r in recs] == [1, 2]
        assert all(math.isfinite(r["loss"]) for r in recs), recs
    # the GRPO policy starts as the SFT adapter: the first update's ratio is 1
    assert _metrics(tmp_path / "grpo")[0]["first_logp_abs_diff"] < 1e-4

    gen = _generator(model, tasks[0])
    task = "edit" if name == "edit" else "t2i"
    base = gen.generate(_requests(task))
    gen.load_lora(sft["adapter_path"])  # diffusers' own loader of the family's pipeline class
    tuned = gen.generate(_requests(task))
    assert type(gen.pipeline).__name__ == json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
    assert [im.tobytes() for im in base] != [im.tobytes() for im in tuned]
    for adapter in (dpo["adapter_path"], grpo["adapter_path"], grpo["best_adapter_path"]):
        gen.load_lora(adapter)
        assert len(gen.generate(_requests(task)[:1])) == 1
    gen.unload_lora()


def test_trainer_refuses_a_task_the_family_cannot_condition_on(zoo, tmp_path):
    from trainers.families import UnsupportedTaskError
    from trainers.sft import SFTConfig
    from trainers.sft import train as train_sft

    cfg = SFTConfig(pretrained_model=zoo["flux"], resolution=SIZE, lora_rank=2, max_steps=1, batch_size=2,
                    corpus_dir=_sft_corpus(tmp_path / "c", ["multi_ref"]), output_dir=str(tmp_path / "o"),
                    dataloader_num_workers=0, num_threads=1)
    with pytest.raises(UnsupportedTaskError, match="'multi_ref'.*'flux'"):
        train_sft(cfg)
    # listing only the tasks the model takes skips the others instead of training them as t2i
    corpus = _sft_corpus(tmp_path / "mixed", ["t2i", "multi_ref"])
    result = train_sft(SFTConfig(**{**cfg.__dict__, "corpus_dir": corpus, "tasks": ["t2i"],
                                    "output_dir": str(tmp_path / "o2")}))
    assert result["steps"] == 1


# ------------------------------------------------------------------------------------------------ log-probs
SDE_CASES = [("t2i", "ddim"), ("sdxl", "ddim")] + [(n, s) for n in ("sd3", "flux", "qwen_image_edit")
                                                   for s in ("flow_sde", "dance_sde", "cps")]


@pytest.mark.parametrize("name,sde_type", SDE_CASES)
def test_recomputed_log_prob_equals_sampling_log_prob(zoo, name, sde_type):
    """GRPO's first update: the log-probability recomputed with gradients (the trainer's own function) equals the
    one recorded while sampling -- ratio 1 within 1e-5 -- with and without CFG, in fp32 and under bf16 autocast."""
    from trainers.families import load_family
    from trainers.grpo.grpo_trainer import transition_log_prob

    family = load_family(zoo[name])
    task = "multi_ref" if family.max_input_images > 1 else "t2i"
    from PIL import Image

    ims = None
    if task == "multi_ref":
        ims = [[Image.new("RGB", (SIZE, SIZE), (200, 30, 30)), Image.new("RGB", (SIZE, SIZE), (30, 30, 200))]] * 2
    cond = family.encode(["a red square", "a dog"], ims, SIZE)
    uncond = family.encode(["", ""], ims, SIZE)
    for dtype in (torch.float32, torch.bfloat16):
        for guidance in (1.0, 3.0):
            gen = torch.Generator().manual_seed(0)
            noise = family.initial_noise(gen, SIZE, batch=2)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = family.sample(cond, uncond if guidance > 1 else None, noise, 3, SIZE, guidance=guidance,
                                    eta=0.7 if sde_type != "ddim" else 1.0, sde_type=sde_type, generator=gen)
                for j, std in enumerate(out["stds"]):
                    if std <= 1e-8:
                        continue
                    logp, *_ = transition_log_prob(family, out["schedule"], j, out["latents"][j],
                                                   out["latents"][j + 1], cond, uncond if guidance > 1 else None,
                                                   guidance, 0.7 if sde_type != "ddim" else 1.0, sde_type)
                    ratio = torch.exp(logp.float() - out["log_probs"][j].float())
                    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), (dtype, guidance, j, ratio)


def test_grpo_runs_under_bf16_mixed_precision_with_gdpo_and_a_window(zoo, tmp_path):
    """``python -m trainers.grpo`` under ``mixed_precision: bf16`` (sampling runs under the training autocast; it used
    to fail with a dtype mismatch), with GDPO advantages, a 1-step SDE window, a velocity-space KL and the CLIP
    λ-Harmonic reward on a t2i + multi_ref pool (own process: accelerate's precision is per process)."""
    import subprocess
    import sys

    tasks = ["t2i", "multi_ref"]
    config = dict(pretrained_model=zoo["qwen_image_edit"], clip_model=zoo["clip"], resolution=SIZE, lora_rank=2,
                  prompt_pool=_pool(tmp_path, tasks), output_dir=str(tmp_path / "g"), group_size=2,
                  prompts_per_step=2, num_steps=2, sample_steps=3, heldout_every=1, heldout_prompts=1,
                  heldout_images_per_prompt=1, mixed_precision="bf16", advantage="gdpo", sde_window_size=1,
                  kl_type="velocity", kl_coef=0.1, guidance_scale=2.0, num_threads=1, checkpoint_every=10,
                  train_micro_batch=4, device="cpu")
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "trainers.grpo", "--config", str(path)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _metrics(tmp_path / "g")
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    assert all(len(r["sde_window"]) == 1 and r["trained_timesteps"] == 1 for r in recs)
    assert math.isfinite(recs[-1]["heldout_lambda_harmonic"])
    assert json.loads((tmp_path / "g" / "result.json").read_text())["family"] == "qwen_image"


def test_reward_conditioned_sft_on_an_edit_family(zoo, tmp_path):
    """The Multi-Reward paper trains an *edit* model conditioned on the judge's scores: reward tokens appended to
    Qwen-Image-Edit-Plus's text states (masked out under reward dropout), saved beside the LoRA, and at inference
    asking for different scores changes the edit."""
    from PIL import Image

    from trainers.conditioning import family_condition_with_rewards, load_reward_embedding
    from trainers.families import load_family
    from trainers.sft import SFTConfig
    from trainers.sft import train as train_sft

    dims = ["instruction_following", "detail_preservation", "visual_quality"]
    samples = []
    for i in range(8):
        samples.append({"__key__": f"s{i:04d}", "jpg": noisy_jpeg(COLOURS[i % 6], i, SIZE), "txt": CAPTIONS[i % 6],
                        "json": {"task": "edit", **{d: float((i + k) % 6) for k, d in enumerate(dims)}},
                        **_members("edit", i)})
    corpus = write_corpus(tmp_path / "c", samples, per_shard=8)
    result = train_sft(SFTConfig(pretrained_model=zoo["qwen_image_edit"], corpus_dir=corpus, resolution=SIZE,
                                 lora_rank=2, max_steps=3, batch_size=4, output_dir=str(tmp_path / "o"),
                                 dataloader_num_workers=0, num_threads=1, reward_conditioning=True,
                                 reward_dimensions=dims, reward_dropout=0.5, learning_rate=1e-2))
    recs = _metrics(tmp_path / "o")
    assert all(math.isfinite(r["loss"]) for r in recs) and "reward_kept" in recs[0]
    family = load_family(zoo["qwen_image_edit"])
    family.pipe.load_lora_weights(result["adapter_path"])
    emb = load_reward_embedding(result["adapter_path"])
    source = [[Image.new("RGB", (SIZE, SIZE), (200, 40, 40))]]
    outs = []
    for score in (5.0, 0.0):
        cond = family_condition_with_rewards(family, ["make it blue"], source, {d: score for d in dims}, emb, SIZE)
        noise = family.initial_noise([torch.Generator().manual_seed(0)], SIZE)
        with torch.no_grad():
            outs.append(family.sample(cond, None, noise, 2, SIZE)["latents"][-1])
    assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], outs[1])
