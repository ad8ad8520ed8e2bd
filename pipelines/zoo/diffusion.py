"""Tiny, randomly initialised diffusers pipelines for the offline zoo.

``build_t2i`` writes a ``StableDiffusionPipeline`` and ``build_edit`` a ``StableDiffusionInstructPix2PixPipeline``
in the standard ``save_pretrained`` layout (``model_index.json`` + ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``), so ``diffusers.DiffusionPipeline.from_pretrained(dir)`` loads them through the
same code path as a real SD 1.5 / InstructPix2Pix checkpoint, and such a checkpoint is a drop-in replacement.

Everything is built offline from configs with fixed seeds: the same code gives the same weights. The CLIP
tokenizer's ``vocab.json`` / ``merges.txt`` are derived from the BPE vocabulary open_clip ships inside its
package (exactly the way CLIP's own tokenizer derives them), so nothing is downloaded.

Sizes (default 64x64 images: VAE downsampling 2 -> 32x32 latents):
UNet ~1.0 M parameters, VAE ~0.66 M, CLIP text encoder ~1.6 M (1.58 M of it the 49408 x 32 token embedding).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

# Architecture knobs shared by both pipelines. Changing any of them changes the weights: bump ZOO_VERSION.
SEED = 20240917
IMAGE_SIZE = 64
VAE_BLOCKS = (32, 64)  # 2 blocks -> vae_scale_factor 2 -> 32x32 latents for 64x64 images
UNET_BLOCKS = (32, 64)
TEXT_HIDDEN = 32
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's/GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (~6 s)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed: it ships the CLIP BPE vocabulary the zoo tokenizer needs")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49408 entries) and BPE merges (48894), as ``clip/simple_tokenizer.py`` builds them."""
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or len(merges) != 48894:
        raise RuntimeError(f"unexpected CLIP BPE vocabulary: {len(vocab)} tokens, {len(merges)} merges")
    return vocab, merges  # type: ignore[return-value]


def write_clip_vocab_files(out_dir: Path) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (the files of a hub CLIP tokenizer) into ``out_dir``."""
    vocab, merges = clip_vocab_and_merges()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_clip_tokenizer(work_dir: Path):
    """A ``transformers.CLIPTokenizer`` identical in behaviour to ``openai/clip-vit-large-patch14``'s, offline."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab_files(work_dir)
    common = dict(model_max_length=CLIP_MAX_LENGTH, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                  unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    try:  # transformers < 5: the slow tokenizer reads the files
        tok = CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), **common)
    except TypeError:
        tok = None
    if tok is None or len(tok) != CLIP_VOCAB_SIZE:  # transformers >= 5: tokenizers-backed, takes vocab + merges
        vocab, merges = clip_vocab_and_merges()
        tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **common)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


# --------------------------------------------------------------------------------------------- components
def _text_encoder():
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 1)
    cfg = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        # Real ids (not the legacy eos_token_id=2), so pooling picks the first <|endoftext|> like SD's encoder.
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    return CLIPTextModel(cfg).eval()


def _vae():
    import torch
    from diffusers import AutoencoderKL

    from pipelines.zoo.families import vae_config

    torch.manual_seed(SEED + 2)
    return AutoencoderKL(**vae_config(latent_channels=4, scaling_factor=0.18215)).eval()


def _unet(in_channels: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED + 3 + in_channels)
    latent = IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1)
    return UNet2DConditionModel(
        sample_size=latent,  # pipelines default to sample_size * vae_scale_factor = 64 px
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_BLOCKS,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    # SD 1.5's noise schedule.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build(out_dir: Path, pipeline_cls_name: str, unet_in_channels: int) -> Path:
    import tempfile

    import diffusers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefmill-clip-bpe-") as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp))
    pipe = getattr(diffusers, pipeline_cls_name)(
        vae=_vae(),
        text_encoder=_text_encoder(),
        tokenizer=tokenizer,
        unet=_unet(unet_in_channels),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, out_dir)
    # Also keep the classic vocab files beside tokenizer.json, as hub SD checkpoints have them.
    write_clip_vocab_files(out_dir / "tokenizer")
    return out_dir


def save_pipeline(pipe, out_dir: Path) -> Path:
    """``pipe.save_pretrained(out_dir)`` in safetensors, without a progress bar per component."""
    import transformers.utils.logging as tlog

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bars_on = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # no "Writing model shards" bar per component
    try:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars_on:
            tlog.enable_progress_bar()
    return out_dir


def build_t2i(out_dir: Path) -> Path:
    """Tiny ``StableDiffusionPipeline`` (UNet 4 input channels) saved into ``out_dir``."""
    return _build(Path(out_dir), "StableDiffusionPipeline", unet_in_channels=4)


def build_edit(out_dir: Path) -> Path:
    """Tiny ``StableDiffusionInstructPix2PixPipeline`` (UNet 8 input channels: noisy latents + source latents)."""
    return _build(Path(out_dir), "StableDiffusionInstructPix2PixPipeline", unet_in_channels=8)
