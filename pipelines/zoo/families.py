"""Tiny, randomly initialised diffusers pipelines of the modern model families, for the offline zoo.

One builder per zoo component; each writes the pipeline with ``save_pretrained(safe_serialization=True)`` in the
standard layout (``model_index.json`` + one folder per component), so ``diffusers.DiffusionPipeline
.from_pretrained(dir)`` loads it through the same code path as the real checkpoint it imitates:

=====================  ==============================  ===================================================
component              pipeline                        imitates
=====================  ==============================  ===================================================
``sdxl``               ``StableDiffusionXLPipeline``   stabilityai/stable-diffusion-xl-base-1.0
``sd3``                ``StableDiffusion3Pipeline``    stabilityai/stable-diffusion-3-medium-diffusers
``flux``               ``FluxPipeline``                black-forest-labs/FLUX.1-dev (no guidance embedding)
``flux_kontext``       ``FluxKontextPipeline``         black-forest-labs/FLUX.1-Kontext-dev (idem)
``qwen_image``         ``QwenImagePipeline``           Qwen/Qwen-Image
``qwen_image_edit``    ``QwenImageEditPlusPipeline``   Qwen/Qwen-Image-Edit-2509
=====================  ==============================  ===================================================

Everything is built offline from small configs with fixed seeds (same code -> same bytes):

* CLIP tokenizers: the zoo's CLIP BPE tokenizer (``pipelines.zoo.diffusion.build_clip_tokenizer``); the second
  CLIP tokenizer of SDXL / SD3 pads with ``"!"`` as the OpenCLIP bigG tokenizer of those checkpoints does.
* T5 tokenizer (FLUX, SD3): a ``T5Tokenizer`` (tokenizers-backed, SentencePiece-style Unigram with ``<pad>=0``,
  ``</s>=1``, ``<unk>=2`` and 100 ``<extra_id_*>`` sentinels at the end, as T5's) whose Unigram vocabulary is
  derived in memory, deterministically, from the judge's corpus (see ``_t5_pieces``).
* Qwen text encoder: the zoo's tiny Qwen2.5-VL judge (``pipelines.zoo.judge``: same tokenizer, processor, config
  and seed, so the weights are the judge's).
* Every VAE downsamples once (``vae_scale_factor`` 2, the real ones 8), so 64x64 images have 32x32 latents; the
  packed families (FLUX, Qwen: 2x2 patches) and SD3 (patch 2) see 16x16 = 256 image tokens.

Traps of the real pipelines that these tiny models make visible (see the tests):

* ``FluxKontextPipeline.__call__`` rescales the *output* to ``max_area`` (default 1024**2) whatever ``height`` /
  ``width`` say, and with ``_auto_resize=True`` (default) the input image to a ~1024**2 preferred resolution: pass
  ``max_area=height * width, _auto_resize=False`` for small images.
* ``QwenImageEditPlusPipeline.__call__`` resizes every condition image to ~1024**2 for the VAE (module constant
  ``VAE_IMAGE_SIZE``), i.e. 65536 image tokens each at ``vae_scale_factor`` 2: unusable on CPU. Encode the
  conditions through the components (``encode_prompt`` + ``vae``) at your own size instead (or, as the tests do,
  monkeypatch ``VAE_IMAGE_SIZE`` / ``CONDITION_IMAGE_SIZE`` of ``pipeline_qwenimage_edit_plus``).
* The Qwen pipelines drop a hard-coded number of template tokens from the text encoder's output (34 / 64, counted
  with Qwen's real tokenizer); the zoo's tokenizer splits the template into more tokens: see
  :func:`qwen_prompt_template_start_idx`.

Sizes: each transformer is ~80-95 k parameters, the SDXL UNet ~1 M, each VAE ~0.5-0.7 M; the CLIP text encoders are
dominated by their 49408 x 16 token embedding (0.79 M parameters each). On disk: sdxl ~20 MB, sd3 ~18 MB, flux and
flux_kontext ~10 MB, qwen_image(_edit) ~4 MB (a CLIP ``tokenizer.json`` alone is 3.6 MB).

One module over ~500 lines: the six builders share the tokenizers, text encoders and VAE built here, and each
builder is a short recipe over them; split per family they would import each other's parts.
"""

from __future__ import annotations

import math
import tempfile
from functools import lru_cache
from pathlib import Path

# Changing any knob below changes the weights: bump ZOO_VERSION.
SEED = 20251201
IMAGE_SIZE = 64
VAE_BLOCKS = (32, 64)  # 2 blocks -> vae_scale_factor 2 -> 32x32 latents for 64x64 images
VAE_NORM_GROUPS = 16
CLIP_HIDDEN = 16
CLIP_PROJECTION = 16
CLIP_VOCAB_SIZE = 49408

# Per-component seed offsets (each model inside a component adds its own small offset).
_SEEDS = {"sdxl": 100, "sd3": 200, "flux": 300, "flux_kontext": 400, "qwen_image": 500, "qwen_image_edit": 600}

# T5 (FLUX's second and SD3's third text encoder)
T5_PIECES = 1000  # Unigram pieces, incl. <pad> </s> <unk>
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_MAX_PIECE = 12
T5_EXTRA_IDS = 100
T5_MAX_LENGTH = 512
T5_HIDDEN = 32
VOCAB_PAD = 64  # embedding rows padded to a multiple of this (T5's 32100 tokens -> 32128 rows)

# FLUX transformer: head dim 16 = sum(axes_dims_rope); inner dim 2 x 16 = 32.
FLUX_HEAD_DIM = 16
FLUX_HEADS = 2
FLUX_AXES_ROPE = (4, 6, 6)
FLUX_LATENT_CHANNELS = 16

# Qwen-Image transformer: head dim 16 = sum(axes_dims_rope).
QWEN_HEAD_DIM = 16
QWEN_HEADS = 2
QWEN_AXES_ROPE = (4, 6, 6)
QWEN_LATENT_CHANNELS = 16

# Scheduler configs as the real checkpoints ship them (scheduler/scheduler_config.json).
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
QWEN_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
    shift_terminal=0.02, time_shift_type="exponential", invert_sigmas=False, stochastic_sampling=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
)


def _install_compat() -> None:
    from labelers import torch_compat

    torch_compat.install()


def _seed(component: str, offset: int) -> None:
    import torch

    torch.manual_seed(SEED + _SEEDS[component] + offset)


def _pad(n: int, multiple: int = VOCAB_PAD) -> int:
    return -(-n // multiple) * multiple


def _save(pipe, out_dir: Path) -> Path:
    from pipelines.zoo.diffusion import save_pipeline

    return save_pipeline(pipe, out_dir)


# --------------------------------------------------------------------------------------------- tokenizers
def _clip_tokenizer(pad_token: str | None = None):
    """The zoo's CLIP tokenizer; ``pad_token="!"`` gives the OpenCLIP-bigG variant (SDXL/SD3 ``tokenizer_2``)."""
    from pipelines.zoo.diffusion import build_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="prefmill-clip-bpe-") as tmp:
        tok = build_clip_tokenizer(Path(tmp))
    if pad_token is not None:
        tok.pad_token = pad_token
    return tok


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """A SentencePiece-style Unigram vocabulary (piece, log-probability), derived deterministically from the judge's
    corpus: ``<pad>``, ``</s>``, ``<unk>`` (ids 0, 1, 2 as in T5), every printable ASCII character and ``▁``, and
    multi-character pieces of ``▁``-prefixed words chosen the way SentencePiece's Unigram trainer does (frequent
    substrings as seed, Viterbi re-estimation, pruning of the least used), scored by log relative frequency of use
    and ordered by score.

    Not ``tokenizers``' ``UnigramTrainer``: its output (piece order, scores of equally likely pieces) changes from
    one process to the next, and the zoo must be byte-for-byte reproducible.
    """
    import string
    from collections import Counter

    from pipelines.zoo.judge import _corpus

    words: Counter[str] = Counter()
    for line in _corpus():
        for word in line.split():
            words["▁" + word] += 1
    counts: Counter[str] = Counter()
    for word, n in words.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + T5_MAX_PIECE) + 1):
                counts[word[i:j]] += n
    chars = set(string.ascii_letters + string.digits + string.punctuation) | {"▁"}
    chars |= {c for c in counts if len(c) == 1}
    target = T5_PIECES - len(T5_SPECIALS) - len(chars)
    # Seed: the most frequent words and substrings (count x length, as SentencePiece seeds), then hard-EM rounds
    # (Viterbi segmentation, re-score by use) that prune the least used pieces until ``target`` remain; a last round.
    whole = [w for w in sorted(words, key=lambda w: (-words[w], w)) if 1 < len(w) <= T5_MAX_PIECE][: 3 * target // 2]
    seeded = set(whole)
    parts = sorted((p for p in counts if len(p) > 1 and p not in seeded), key=lambda p: (-counts[p] * len(p), p))
    multi = whole + parts[: 3 * target - len(whole)]
    usage = {p: counts[p] for p in sorted(chars) + multi}
    while True:
        usage = _segment_counts(words, usage)
        if len(multi) <= target:
            break
        keep = max(target, int(len(multi) * 0.6))
        multi = sorted(multi, key=lambda p: (-usage[p], p))[:keep]
        usage = {p: usage[p] for p in sorted(chars) + multi}
    usage = _segment_counts(words, usage)
    total = sum(usage.values()) + len(usage)
    scored = sorted(((p, round(math.log((n + 1) / total), 6)) for p, n in usage.items()),
                    key=lambda ps: (-ps[1], ps[0]))
    return tuple((t, 0.0) for t in T5_SPECIALS) + tuple(scored)


def _segment_counts(words, usage: dict[str, int]) -> dict[str, int]:
    """One hard-EM step: score the pieces by ``usage`` (+1), segment every word, count the pieces used."""
    total = sum(usage.values()) + len(usage)
    scores = {p: math.log((n + 1) / total) for p, n in usage.items()}
    out = dict.fromkeys(usage, 0)
    for word, n in words.items():
        for piece in _viterbi(word, scores):
            out[piece] += n
    return out


def _viterbi(word: str, scores: dict[str, float]) -> list[str]:
    """Most likely segmentation of ``word`` into pieces of ``scores`` (every character of it must be a piece)."""
    best = [0.0] + [-math.inf] * len(word)
    back = [0] * (len(word) + 1)
    for end in range(1, len(word) + 1):
        for start in range(max(0, end - T5_MAX_PIECE), end):
            score = scores.get(word[start:end])
            if score is not None and best[start] + score > best[end]:
                best[end], back[end] = best[start] + score, start
    out, end = [], len(word)
    while end > 0:
        out.append(word[back[end]:end])
        end = back[end]
    return out[::-1]


def build_t5_tokenizer():
    """A ``transformers.T5Tokenizer`` laid out like T5's: pieces, then ``<extra_id_99>`` … ``<extra_id_0>``."""
    from transformers import T5Tokenizer

    pieces = list(_t5_pieces()) + [(f"<extra_id_{i}>", 0.0) for i in range(T5_EXTRA_IDS - 1, -1, -1)]
    tok = T5Tokenizer(vocab=pieces, extra_ids=T5_EXTRA_IDS, model_max_length=T5_MAX_LENGTH)
    if len(tok) != len(pieces) or tok.convert_tokens_to_ids("<extra_id_0>") != len(pieces) - 1:  # pragma: no cover
        raise RuntimeError(f"T5 tokenizer has {len(tok)} tokens, expected {len(pieces)}")
    if (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) != (0, 1, 2):  # pragma: no cover
        raise RuntimeError("T5 special token ids are not <pad>=0 </s>=1 <unk>=2")
    return tok


# --------------------------------------------------------------------------------------------- text encoders
def _clip_config(hidden_act: str, pad_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=2 * CLIP_HIDDEN,
        num_hidden_layers=2,  # SDXL / SD3 read the penultimate hidden state
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_PROJECTION,
        hidden_act=hidden_act,
        # Real ids (not the legacy eos_token_id=2): pooling picks the first <|endoftext|>.
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=pad_token_id,  # the tokenizer's: <|endoftext|> (CLIP-L) or "!" = 0 (bigG)
    )


def _clip_l(component: str, offset: int):
    """CLIP ViT-L/14's text tower (``CLIPTextModel``), tiny."""
    from transformers import CLIPTextModel

    _seed(component, offset)
    return CLIPTextModel(_clip_config("quick_gelu", pad_token_id=CLIP_VOCAB_SIZE - 1)).eval()


def _clip_with_projection(component: str, offset: int, hidden_act: str = "gelu", pad_token_id: int = 0):
    """``CLIPTextModelWithProjection`` (OpenCLIP bigG's text tower in SDXL/SD3; CLIP-L's in SD3), tiny."""
    from transformers import CLIPTextModelWithProjection

    _seed(component, offset)
    return CLIPTextModelWithProjection(_clip_config(hidden_act, pad_token_id)).eval()


def _t5_encoder(component: str, offset: int, vocab_rows: int):
    """T5 v1.1's encoder (gated-GELU), tiny."""
    from transformers import T5Config, T5EncoderModel

    _seed(component, offset)
    cfg = T5Config(
        vocab_size=vocab_rows,
        d_model=T5_HIDDEN,
        d_kv=8,
        d_ff=2 * T5_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


# --------------------------------------------------------------------------------------------- VAEs
def _autoencoder_kl(component: str, offset: int, latent_channels: int, scaling_factor: float,
                    shift_factor: float | None, quant_convs: bool, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    _seed(component, offset)
    return AutoencoderKL(**vae_config(latent_channels, scaling_factor, shift_factor, quant_convs,
                                      force_upcast)).eval()


def vae_config(latent_channels: int, scaling_factor: float, shift_factor: float | None = None,
               quant_convs: bool = True, force_upcast: bool = True) -> dict:
    """The zoo's tiny ``AutoencoderKL`` arguments (2 blocks: ``vae_scale_factor`` 2), shared by every family."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=VAE_NORM_GROUPS,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
        force_upcast=force_upcast,
    )


def _qwen_vae(component: str, offset: int):
    """``AutoencoderKLQwenImage`` (Wan-2.1-style causal 3D VAE, z_dim 16, Qwen-Image's latents mean/std), tiny:
    one spatial downsampling (``len(temperal_downsample) == len(dim_mult) - 1 == 1`` -> vae_scale_factor 2)."""
    from diffusers import AutoencoderKLQwenImage

    _seed(component, offset)
    return AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=QWEN_LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False],
        dropout=0.0,
    ).eval()


# --------------------------------------------------------------------------------------------- SDXL
def build_sdxl(out_dir: Path) -> Path:
    """Tiny ``StableDiffusionXLPipeline``: CLIP-L + bigG-style text encoders, ``text_time`` UNet, Euler."""
    _install_compat()
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    name = "sdxl"
    time_embed_dim = 8
    _seed(name, 3)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1),  # default size = sample_size * vae_scale_factor
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),  # SDXL's config names the head *count* attention_head_dim
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * CLIP_HIDDEN,  # penultimate states of both encoders, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled bigG projection + 6 micro-conditioning numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=CLIP_PROJECTION + 6 * time_embed_dim,
        norm_num_groups=16,
    ).eval()
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler_config.json
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_autoencoder_kl(name, 2, latent_channels=4, scaling_factor=0.13025, shift_factor=None, quant_convs=True),
        text_encoder=_clip_l(name, 0),
        text_encoder_2=_clip_with_projection(name, 1),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipe, out_dir)


# --------------------------------------------------------------------------------------------- SD3
def build_sd3(out_dir: Path) -> Path:
    """Tiny ``StableDiffusion3Pipeline``: CLIP-L + bigG-style (both with projection) + T5, MMDiT, 16-channel VAE.

    T5 is included although the pipeline can run without it: ``DiffusionPipeline.from_pretrained`` refuses a
    ``model_index.json`` with ``text_encoder_3: [null, null]`` unless the caller passes ``text_encoder_3=None``.
    """
    _install_compat()
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    name = "sd3"
    if T5_HIDDEN < 2 * CLIP_HIDDEN:  # pragma: no cover
        raise RuntimeError("SD3 pads the concatenated CLIP states to the T5 width: it must be at least as wide")
    tokenizer_3 = build_t5_tokenizer()
    _seed(name, 3)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2 ** (len(VAE_BLOCKS) - 1),
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_projection_dim=2 * 16,  # = inner dim, as SD3's 1536 = 24 x 64
        joint_attention_dim=T5_HIDDEN,  # T5 width; the two CLIP states (concatenated) are zero-padded to it
        pooled_projection_dim=2 * CLIP_PROJECTION,  # both pooled CLIP projections, concatenated
        pos_embed_max_size=64,  # latents up to 128x128 (256 px) with patch 2
        qk_norm=None,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_autoencoder_kl(name, 2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                            quant_convs=False),
        text_encoder=_clip_with_projection(name, 0, hidden_act="quick_gelu", pad_token_id=CLIP_VOCAB_SIZE - 1),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_with_projection(name, 1),
        tokenizer_2=_clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5_encoder(name, 4, vocab_rows=_pad(len(tokenizer_3))),
        tokenizer_3=tokenizer_3,
    )
    return _save(pipe, out_dir)


# --------------------------------------------------------------------------------------------- FLUX
def _flux_components(name: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    if sum(FLUX_AXES_ROPE) != FLUX_HEAD_DIM:  # pragma: no cover
        raise RuntimeError("axes_dims_rope must sum to the attention head dim")
    tokenizer_2 = build_t5_tokenizer()
    _seed(name, 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,  # latents are packed 2x2 -> 64 channels per token
        out_channels=None,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_HEADS,
        joint_attention_dim=T5_HIDDEN,
        pooled_projection_dim=CLIP_HIDDEN,  # CLIPTextModel's pooler_output
        guidance_embeds=False,
        axes_dims_rope=FLUX_AXES_ROPE,
    ).eval()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_autoencoder_kl(name, 2, latent_channels=FLUX_LATENT_CHANNELS, scaling_factor=0.3611,
                            shift_factor=0.1159, quant_convs=False),
        text_encoder=_clip_l(name, 0),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(name, 1, vocab_rows=_pad(len(tokenizer_2))),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_flux(out_dir: Path) -> Path:
    """Tiny ``FluxPipeline``: CLIP-L (pooled) + T5 (sequence), FLUX transformer, FLUX VAE (16 latent channels)."""
    _install_compat()
    from diffusers import FluxPipeline

    return _save(FluxPipeline(**_flux_components("flux")), out_dir)


def build_flux_kontext(out_dir: Path) -> Path:
    """Tiny ``FluxKontextPipeline`` (same architecture as ``flux``, its own seed)."""
    _install_compat()
    from diffusers import FluxKontextPipeline

    return _save(FluxKontextPipeline(**_flux_components("flux_kontext")), out_dir)


# --------------------------------------------------------------------------------------------- Qwen-Image
def _qwen_components(name: str) -> dict:
    """Transformer, VAE, scheduler, and the zoo judge's Qwen2.5-VL (model + tokenizer + processor)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

    from pipelines.zoo import judge

    if sum(QWEN_AXES_ROPE) != QWEN_HEAD_DIM:  # pragma: no cover
        raise RuntimeError("axes_dims_rope must sum to the attention head dim")
    tokenizer = judge.build_tokenizer()
    # The judge's processor is a Qwen2_5_VLProcessor; Qwen-Image-Edit ships (and the pipeline type-checks) a
    # Qwen2VLProcessor: same image processor, tokenizer and chat template.
    judge_processor = judge.build_processor(tokenizer)
    processor = Qwen2VLProcessor(
        image_processor=judge_processor.image_processor,
        tokenizer=tokenizer,
        video_processor=getattr(judge_processor, "video_processor", None),
        chat_template=judge.CHAT_TEMPLATE,
    )
    config = judge._model_config(tokenizer)
    torch.manual_seed(judge.SEED)  # the judge's weights
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    _seed(name, 3)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * QWEN_LATENT_CHANNELS,  # packed 2x2 latents
        out_channels=QWEN_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=QWEN_HEAD_DIM,
        num_attention_heads=QWEN_HEADS,
        joint_attention_dim=config.text_config.hidden_size,  # last hidden state of the Qwen2.5-VL
        guidance_embeds=False,
        axes_dims_rope=QWEN_AXES_ROPE,
    ).eval()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=_qwen_vae(name, 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def build_qwen_image(out_dir: Path) -> Path:
    """Tiny ``QwenImagePipeline``."""
    _install_compat()
    from diffusers import QwenImagePipeline

    parts = _qwen_components("qwen_image")
    parts.pop("processor")
    return _save(QwenImagePipeline(**parts), out_dir)


def build_qwen_image_edit(out_dir: Path) -> Path:
    """Tiny ``QwenImageEditPlusPipeline`` (several condition images; has a ``processor`` component)."""
    _install_compat()
    from diffusers import QwenImageEditPlusPipeline

    return _save(QwenImageEditPlusPipeline(**_qwen_components("qwen_image_edit")), out_dir)


def qwen_prompt_template_start_idx(pipe) -> int:
    """Tokens of a Qwen-Image pipeline's prompt template before the user's text, counted with its own tokenizer.

    The pipelines drop ``pipe.prompt_template_encode_start_idx`` leading positions of the text encoder's hidden
    states, hard-coded for Qwen's real tokenizer (34 in ``QwenImagePipeline``, 64 in ``QwenImageEditPlusPipeline``).
    The zoo's small BPE splits the system prompt into more tokens, so part of it would stay in the embeddings; set
    ``pipe.prompt_template_encode_start_idx = qwen_prompt_template_start_idx(pipe)`` to drop exactly the template.
    """
    prefix = pipe.prompt_template_encode.split("{}")[0]
    return len(pipe.tokenizer(prefix).input_ids)
