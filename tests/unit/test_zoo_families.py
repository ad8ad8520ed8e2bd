"""The modern-family zoo components (``pipelines/zoo/families.py``): each builds offline through
``resolve_model("zoo:<name>")``, reloads with ``DiffusionPipeline.from_pretrained`` like a real checkpoint, and
generates through the pipeline's own ``__call__``.

``QwenImageEditPlusPipeline.__call__`` resizes every condition image to ~1024x1024 for the VAE (module constant
``VAE_IMAGE_SIZE``): at the zoo's vae_scale_factor 2 that is 65536 image tokens per condition image, and a 2-step
call with two 64x64 inputs ran for more than 2 minutes on this 2-core machine without finishing. So the edit test
checks ``encode_prompt`` with two small images as the pipeline is, and runs ``__call__`` only with those module
constants monkeypatched down to 64x64.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pipelines.zoo as zoo  # noqa: E402

FAMILIES = ("sdxl", "sd3", "flux", "flux_kontext", "qwen_image", "qwen_image_edit")

# zoo name -> (pipeline class, {component attribute: class name})
EXPECTED = {
    "sdxl": ("StableDiffusionXLPipeline", {
        "vae": "AutoencoderKL", "unet": "UNet2DConditionModel", "scheduler": "EulerDiscreteScheduler",
        "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
        "image_encoder": None, "feature_extractor": None}),
    "sd3": ("StableDiffusion3Pipeline", {
        "vae": "AutoencoderKL", "transformer": "SD3Transformer2DModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
        "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5Tokenizer",
        "image_encoder": None, "feature_extractor": None}),
    "flux": ("FluxPipeline", {
        "vae": "AutoencoderKL", "transformer": "FluxTransformer2DModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer",
        "image_encoder": None, "feature_extractor": None}),
    "flux_kontext": ("FluxKontextPipeline", {
        "vae": "AutoencoderKL", "transformer": "FluxTransformer2DModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
        "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer",
        "image_encoder": None, "feature_extractor": None}),
    "qwen_image": ("QwenImagePipeline", {
        "vae": "AutoencoderKLQwenImage", "transformer": "QwenImageTransformer2DModel",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer"}),
    "qwen_image_edit": ("QwenImageEditPlusPipeline", {
        "vae": "AutoencoderKLQwenImage", "transformer": "QwenImageTransformer2DModel",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer",
        "processor": "Qwen2VLProcessor"}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def zoo_env(tmp_path_factory):
    """A fresh zoo root for this module, reached the way profiles reach it: ``$PREFMILL_ZOO`` + ``resolve_model``."""
    root = tmp_path_factory.mktemp("families_zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFMILL_ZOO", str(root))
        yield root


@pytest.fixture(scope="module")
def load(zoo_env):
    from diffusers import DiffusionPipeline

    cache: dict[str, object] = {}

    def _load(name: str):
        if name not in cache:
            path = Path(zoo.resolve_model(f"zoo:{name}"))
            assert path == zoo_env / name and zoo.is_complete(path)
            cache[name] = DiffusionPipeline.from_pretrained(path)
        return cache[name]

    return _load


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


def _generator(seed: int = 0):
    import torch

    return torch.Generator().manual_seed(seed)


def _check_images(images, size: int) -> None:
    assert images.shape == (1, size, size, 3)
    assert np.isfinite(images).all() and images.std() > 0


# ------------------------------------------------------------------------------------------------ registry
def test_components_are_registered():
    for name in FAMILIES:
        assert name in zoo.ZOO_COMPONENTS
        assert zoo._BUILDERS[name] == f"pipelines.zoo.families:build_{name}"


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("name", FAMILIES)
def test_loads_like_a_checkpoint(name, load):
    pipe = load(name)
    cls, components = EXPECTED[name]
    assert type(pipe).__name__ == cls
    got = {k: (type(v).__name__ if v is not None else None) for k, v in pipe.components.items()}
    assert got == components
    assert pipe.vae_scale_factor == 2
    path = Path(zoo.component_path(name))
    assert (path / "model_index.json").is_file()
    assert not list(path.rglob("*.bin")), "weights must be safetensors"
    stats = zoo.component_stats(path)
    assert stats["parameters"] < 3_500_000 and stats["bytes"] < 25_000_000
    model = pipe.unet if name == "sdxl" else pipe.transformer
    assert sum(p.numel() for p in model.parameters()) < 1_100_000


def test_family_configs(load):
    sdxl = load("sdxl")
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert sdxl.unet.config.cross_attention_dim == (
        sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size)
    assert sdxl.unet.config.projection_class_embeddings_input_dim == (
        6 * sdxl.unet.config.addition_time_embed_dim + sdxl.text_encoder_2.config.projection_dim)
    assert sdxl.tokenizer.pad_token == "<|endoftext|>" and sdxl.tokenizer_2.pad_token == "!"

    sd3 = load("sd3")
    cfg = sd3.transformer.config
    assert cfg.in_channels == sd3.vae.config.latent_channels == 16
    assert cfg.joint_attention_dim == sd3.text_encoder_3.config.d_model
    pooled = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    assert cfg.pooled_projection_dim == pooled
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert sd3.scheduler.config.shift == 3.0

    for name in ("flux", "flux_kontext"):
        flux = load(name)
        cfg = flux.transformer.config
        assert cfg.in_channels == 4 * flux.vae.config.latent_channels == 64
        assert cfg.joint_attention_dim == flux.text_encoder_2.config.d_model
        assert cfg.pooled_projection_dim == flux.text_encoder.config.hidden_size
        assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim and not cfg.guidance_embeds
        assert flux.scheduler.config.use_dynamic_shifting and flux.scheduler.config.shift == 3.0
        assert (flux.vae.config.scaling_factor, flux.vae.config.shift_factor) == (0.3611, 0.1159)

    for name in ("qwen_image", "qwen_image_edit"):
        qwen = load(name)
        cfg = qwen.transformer.config
        assert cfg.in_channels == 4 * qwen.vae.config.z_dim == 64 and cfg.out_channels == 16
        assert cfg.joint_attention_dim == qwen.text_encoder.config.text_config.hidden_size
        assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
        sched = qwen.scheduler.config
        assert sched.use_dynamic_shifting and sched.time_shift_type == "exponential" and sched.shift_terminal == 0.02
        assert len(qwen.vae.config.latents_mean) == len(qwen.vae.config.latents_std) == 16


def test_t5_tokenizer_round_trips_and_encodes(load):
    from pipelines.zoo.families import build_t5_tokenizer

    flux = load("flux")
    fresh = build_t5_tokenizer()
    text = "A watercolor painting of a fox in a snowy forest, 3 birds <extra_id_0>"
    assert flux.tokenizer_2(text).input_ids == fresh(text).input_ids
    ids = flux.tokenizer_2(text).input_ids
    assert ids[-1] == 1 and 2 not in ids and len(ids) < 20  # </s> at the end, no <unk>, real subwords
    assert (flux.tokenizer_2.pad_token_id, flux.tokenizer_2.model_max_length, len(flux.tokenizer_2)) == (0, 512, 1100)
    assert flux.tokenizer_2.convert_tokens_to_ids("<extra_id_0>") == 1099
    embeds, pooled, text_ids = flux.encode_prompt(prompt=text, prompt_2=None, max_sequence_length=24)
    assert embeds.shape == (1, 24, flux.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, flux.transformer.config.pooled_projection_dim)
    assert text_ids.shape == (24, 3)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("name,size", [("sdxl", 64), ("sd3", 64), ("flux", 64), ("qwen_image", 64), ("flux", 32)])
def test_text_to_image(name, size, load):
    pipe = load(name)
    out = pipe(prompt="a red fox in the snow", num_inference_steps=2, height=size, width=size,
               generator=_generator(), output_type="np")
    _check_images(out.images, size)


def test_flux_kontext_edit(load):
    pipe = load("flux_kontext")
    # Without max_area the output is rescaled to ~1024x1024, without _auto_resize=False the input image too.
    out = pipe(image=_image(1), prompt="make it red", num_inference_steps=2, height=64, width=64,
               max_area=64 * 64, _auto_resize=False, generator=_generator(), output_type="np")
    _check_images(out.images, 64)


def test_qwen_image_edit_plus_encode_prompt(load):
    pipe = load("qwen_image_edit")
    images = [_image(2), _image(3, (48, 64))]
    one, _ = pipe.encode_prompt("make the cat red", image=images[:1])
    two, mask = pipe.encode_prompt("make the cat red", image=images)
    hidden = pipe.text_encoder.config.text_config.hidden_size
    assert one.shape[0] == two.shape[0] == 1 and one.shape[2] == two.shape[2] == hidden
    assert two.shape[1] > one.shape[1]  # each image adds its vision tokens
    assert mask is None  # a single prompt: nothing padded
    # The VAE takes the condition images at their own (small) size: (B, C, T, H, W) -> 16 x 32 x 32 latents.
    import torch

    pixels = torch.from_numpy(np.asarray(images[0], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None, :, None]
    latents = pipe.vae.encode(pixels).latent_dist.mode()
    assert latents.shape == (1, 16, 1, 32, 32)


def test_qwen_image_edit_plus_call_with_small_condition_sizes(load, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    pipe = load("qwen_image_edit")
    out = pipe(image=[_image(4), _image(5)], prompt="put the cat into the garden", num_inference_steps=2,
               height=64, width=64, true_cfg_scale=1.0, generator=_generator(), output_type="np")
    _check_images(out.images, 64)


def test_qwen_prompt_template_start_idx(load):
    from pipelines.zoo.families import qwen_prompt_template_start_idx

    pipe = load("qwen_image")
    idx = qwen_prompt_template_start_idx(pipe)
    assert idx > pipe.prompt_template_encode_start_idx == 34  # the zoo BPE splits the system prompt finer
    prompt = "a red fox"
    full = len(pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids)
    default, _ = pipe.encode_prompt(prompt)
    pipe.prompt_template_encode_start_idx = idx
    try:
        exact, _ = pipe.encode_prompt(prompt)
    finally:
        pipe.prompt_template_encode_start_idx = 34
    assert default.shape[1] == full - 34 and exact.shape[1] == full - idx


# ------------------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", ["flux", "qwen_image_edit"])
def test_builds_are_byte_identical(name, tmp_path):
    from pipelines.zoo import families

    trees = []
    for k in range(2):
        families._t5_pieces.cache_clear()  # re-derive the T5 vocabulary too
        out = getattr(families, f"build_{name}")(tmp_path / f"build{k}")
        trees.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert trees[0].keys() == trees[1].keys()
    assert any(p.suffix == ".safetensors" for p in trees[0])
    for rel in trees[0]:
        assert trees[0][rel] == trees[1][rel], rel
