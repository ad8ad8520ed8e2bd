"""The tiny diffusion zoo, the seeded batched generator, and the bundled sample prompts (no Dagster)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipelines.zoo as zoo  # noqa: E402
from pipelines.generation import GenerationRequest, ImageGenerator  # noqa: E402
from pipelines.sample_data import MAX_REFS, REFERENCE_TYPES, TASKS, samples_dir  # noqa: E402

STEPS = 4  # enough to exercise the sampler loop; keeps the file fast on 2 cores


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """One intra-op thread: on a small shared machine, 2 spinning OpenMP threads competing with other processes
    made these generations ~10x slower (1-2 s -> 7-20 s); one thread is steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return zoo.build_zoo(root, only=["t2i", "edit"])


@pytest.fixture(scope="module")
def t2i(zoo_dirs) -> ImageGenerator:
    gen = ImageGenerator(str(zoo_dirs["t2i"]), kind="t2i", steps=STEPS, batch_size=4)
    gen.setup()
    yield gen
    gen.teardown()


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _requests(n: int, offset: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(key=f"k{i}", text=f"a small red house number {i}", seed=1000 + i) for i in
            range(offset, offset + n)]


# ------------------------------------------------------------------------------------------------ zoo
def test_zoo_components_complete_and_reloadable(zoo_dirs):
    from diffusers import DiffusionPipeline

    for name, cls, in_ch in (("t2i", "StableDiffusionPipeline", 4), ("edit", "StableDiffusionInstructPix2PixPipeline", 8)):
        path = zoo_dirs[name]
        marker = json.loads((path / ".complete").read_text())
        assert marker["zoo_version"] == zoo.ZOO_VERSION and name in marker["builder"]
        assert zoo.is_complete(path)
        pipe = DiffusionPipeline.from_pretrained(path)
        assert type(pipe).__name__ == cls
        assert pipe.unet.config.in_channels == in_ch
        assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408
        assert pipe.tokenizer.model_max_length == 77
        ids = pipe.tokenizer("a photo of a cat").input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) > 3  # real CLIP BPE, not byte fallback
        assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
        stats = zoo.component_stats(path)
        assert 2_000_000 < stats["parameters"] < 5_000_000
    # No leftovers of the temporary build directories.
    assert not [p for p in zoo_dirs["t2i"].parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_build_zoo_skips_complete_components(zoo_dirs, monkeypatch):
    root = zoo_dirs["t2i"].parent
    monkeypatch.setattr(zoo, "_builder", lambda name: pytest.fail(f"rebuilt {name}"))
    assert zoo.build_zoo(root, only=["t2i", "edit"]) == zoo_dirs


def test_build_zoo_atomic_replace_and_stale_cleanup(tmp_path, monkeypatch):
    calls = []

    def fake_builder(name):
        def build(out_dir):
            calls.append(name)
            assert out_dir.is_dir() and out_dir.name.startswith(f".{name}.tmp-")
            (out_dir / "weights.txt").write_text(f"built {len(calls)}")
        return build

    monkeypatch.setattr(zoo, "_builder", fake_builder)
    (tmp_path / ".clip.tmp-99999").mkdir()  # a crashed build
    (tmp_path / "clip").mkdir()  # a half-written component without marker
    out = zoo.build_zoo(tmp_path, only="clip")
    assert calls == ["clip"] and (out["clip"] / "weights.txt").read_text() == "built 1"
    assert not (tmp_path / ".clip.tmp-99999").exists()
    zoo.build_zoo(tmp_path, only="clip")
    assert calls == ["clip"]  # complete: skipped
    zoo.build_zoo(tmp_path, only="clip", force=True)
    assert calls == ["clip", "clip"] and (out["clip"] / "weights.txt").read_text() == "built 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "clip"]
    with pytest.raises(ValueError, match="unknown zoo component"):
        zoo.build_zoo(tmp_path, only=["nope"])


def test_resolve_model(zoo_dirs, monkeypatch):
    for ref in ("runwayml/stable-diffusion-v1-5", "/models/sd15", "./relative/dir"):
        assert zoo.resolve_model(ref) == ref
    monkeypatch.setenv("PREFMILL_ZOO", str(zoo_dirs["t2i"].parent))
    assert zoo.zoo_root() == zoo_dirs["t2i"].parent.resolve()
    assert zoo.resolve_model("zoo:edit") == str(zoo_dirs["edit"])
    with pytest.raises(ValueError):
        zoo.resolve_model("zoo:does-not-exist")


def test_zoo_root_default(monkeypatch):
    monkeypatch.delenv("PREFMILL_ZOO", raising=False)
    assert zoo.zoo_root() == Path(zoo.__file__).resolve().parents[2] / ".zoo"


# ------------------------------------------------------------------------------------------ generation
def test_generate_sizes_and_seeds(t2i):
    reqs = _requests(6)
    images = t2i.generate(reqs)
    assert len(images) == 6
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    # Different seeds (same text) -> different images.
    a, b = t2i.generate([GenerationRequest("a", "a tree", 1), GenerationRequest("b", "a tree", 2)])
    assert np.abs(_px(a) - _px(b)).mean() > 1.0


def test_same_seed_same_pixels_regardless_of_batching(t2i, zoo_dirs):
    reqs = _requests(5)
    base = [_px(im) for im in t2i.generate(reqs)]  # batches [0..3], [4 + padding]
    # Other neighbours, other order, other batch boundaries, same batch_size: bit-identical.
    regrouped = t2i.generate([reqs[4], reqs[2], *_requests(2, offset=50), reqs[0], reqs[3], reqs[1]])
    for i, im in zip([4, 2, None, None, 0, 3, 1], regrouped):
        if i is not None:
            assert np.array_equal(base[i], _px(im)), f"request {i} changed with its batch"
    # Another batch_size (a different tensor shape): the same images up to float rounding of the kernels.
    other = ImageGenerator(str(zoo_dirs["t2i"]), kind="t2i", steps=STEPS, batch_size=2)
    other._pipe, other._call_params = t2i._pipe, t2i._call_params  # share the loaded weights
    for b, im in zip(base, other.generate(reqs)):
        diff = np.abs(b - _px(im))
        assert diff.max() <= 2 and diff.mean() < 0.05


def test_generator_id_identity(zoo_dirs):
    m = str(zoo_dirs["t2i"])
    ref = ImageGenerator(m, steps=8).generator_id
    assert ImageGenerator(m, steps=8, device="cuda", batch_size=32).generator_id == ref
    assert ImageGenerator(m, steps=9).generator_id != ref
    assert ImageGenerator(m, steps=8, kind="edit").generator_id != ref
    assert ImageGenerator("zoo:t2i", steps=8).generator_id != ref
    params = ImageGenerator(m, kind="edit").params
    assert json.loads(json.dumps(params)) == params and params["image_guidance_scale"] == 1.5


def test_edit_generation(zoo_dirs):
    import torch

    gen = ImageGenerator(str(zoo_dirs["edit"]), kind="edit", steps=STEPS, batch_size=4, cpu_threads=1)
    threads = torch.get_num_threads()
    src = Image.open(samples_dir() / "images" / "src_001.png")
    big = src.resize((100, 80))
    with pytest.raises(ValueError, match="cand-2"):
        gen.generate([GenerationRequest("cand-1", "make it blue", 1, src), GenerationRequest("cand-2", "x", 2)])
    out = gen.generate([GenerationRequest("cand-1", "make it blue", 1, src),
                        GenerationRequest("cand-3", "make it blue", 1, big)])
    assert [im.size for im in out] == [(64, 64), (64, 64)]
    assert torch.get_num_threads() == threads  # cpu_threads is scoped to the call
    again = gen.generate([GenerationRequest("cand-1", "make it blue", 1, src)])
    assert np.array_equal(_px(out[0]), _px(again[0]))
    gen.teardown()
    assert not gen.is_setup


def test_lora_load_unload(t2i, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # A random (non-zero) adapter in diffusers' LoRA format, made on a throwaway copy of the UNet.
    unet = type(t2i.pipeline.unet).from_config(t2i.pipeline.unet.config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    req = _requests(1)
    base_id, base = t2i.generator_id, _px(t2i.generate(req)[0])
    t2i.load_lora(str(tmp_path))
    try:
        assert t2i.generator_id != base_id and t2i.lora is not None
        assert np.abs(_px(t2i.generate(req)[0]) - base).mean() > 0.5
    finally:
        t2i.unload_lora()
    assert t2i.generator_id == base_id
    assert np.array_equal(_px(t2i.generate(req)[0]), base)


# ------------------------------------------------------------------------------------------ samples
def _sample_rows() -> list[tuple[Path, dict]]:
    files = sorted((samples_dir() / "prompts").glob("batch-*.jsonl"))
    assert [f.name for f in files] == ["batch-0001.jsonl", "batch-0002.jsonl", "batch-0003.jsonl"]
    rows = []
    for f in files:
        lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert 8 <= len(lines) <= 16
        rows += [(f, json.loads(ln)) for ln in lines]
    return rows


def test_sample_prompts_invariants():
    rows = _sample_rows()
    assert 24 <= len(rows) <= 60
    keys = {"task", "text", "source_image", "reference_images", "reference_types", "tags", "split"}
    for f, row in rows:
        assert set(row) == keys, f
        assert row["task"] in TASKS and row["text"].strip() and row["split"] in ("train", "heldout")
        assert isinstance(row["tags"], list) and all(isinstance(t, str) for t in row["tags"])
        refs, types = row["reference_images"], row["reference_types"]
        assert len(refs) == len(types) and all(t in REFERENCE_TYPES for t in types)
        if row["task"] == "edit":
            assert row["source_image"] and not refs
        elif row["task"] == "multi_ref":
            assert 1 <= len(refs) <= MAX_REFS and row["source_image"] is None
        else:
            assert row["source_image"] is None and not refs
        for rel in [row["source_image"], *refs]:
            if rel:
                assert not Path(rel).is_absolute()
                with Image.open(f.parent / rel) as im:
                    im.load()
                    assert im.size == (64, 64)
    per_file = {}
    for f, row in rows:
        per_file.setdefault(f.name, []).append(row)
    for name, batch in per_file.items():
        assert {r["task"] for r in batch} == set(TASKS), name
        assert 1 <= sum(r["split"] == "heldout" for r in batch) <= 3, name
    assert len({row["text"] for _, row in rows}) == len(rows)


def test_sample_data_regenerates_identically(tmp_path):
    from pipelines.sample_data import write_samples

    written = write_samples(tmp_path)
    for path in written["prompts"] + written["images"]:
        committed = samples_dir() / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), committed
