"""Reward conditioning (multi-reward as a condition): per-dimension judge scores become extra cross-attention tokens.

Training (``SFTConfig.reward_conditioning``) teaches a LoRA'd UNet what each rubric dimension's score means by
showing it the sample's own scores; at inference the model can then be asked for top scores (every dimension 5).

:class:`RewardEmbedding` maps a score per dimension (0–``scale``, 5 for the judge rubrics) to ``tokens_per_dimension``
tokens of the text encoder's width: ``score / scale`` -> sinusoidal features -> a small MLP shared by the dimensions
\\+ a learned per-dimension embedding (which dimension this is). A dimension without a score (``None``/NaN/absent:
an edit sample has no t2i dimensions) gets a learned *unknown* token instead. The tokens are appended to the CLIP
hidden states, ``(B, 77 + D·K, width)``, so the UNet's cross-attention takes them unchanged.

Training without the condition (``reward_dropout``) masks the reward tokens out of the cross-attention
(``encoder_attention_mask``), which is exactly the plain 77-token prompt: the adapter also works with a plain
``pipe(prompt)``.

Saved beside the LoRA adapter as ``reward_embedding.safetensors`` (state dict, safetensors) +
``reward_embedding.json`` (what rebuilds the module); :func:`load_reward_embedding` reads them back, no pickle.

Inference::

    pipe.load_lora_weights(adapter_dir)
    emb = load_reward_embedding(adapter_dir)
    kwargs = reward_pipeline_kwargs(pipe, ["a red fox"], {d: 5.0 for d in emb.dimensions}, emb)
    image = pipe(**kwargs, num_inference_steps=30).images[0]

torch is imported at module import: only trainer processes and inference code import this module.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDING_NAME = "reward_embedding"
WEIGHTS_NAME = f"{EMBEDDING_NAME}.safetensors"
CONFIG_NAME = f"{EMBEDDING_NAME}.json"
FORMAT_VERSION = 1

Scores = Mapping[str, Any]


def default_reward_dimensions() -> list[str]:
    """The t2i rubric's dimensions (``labelers/rubrics/t2i.yaml``)."""
    from labelers.rubrics import load_rubric

    return list(load_rubric("t2i").dimension_names)


def score_value(value: Any) -> float:
    """A score as a float, NaN when it is missing (``None``, NaN, not a number, a bool)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


class RewardEmbedding(nn.Module):
    """Per-dimension scores ``(B, D)`` (NaN = unknown) -> reward tokens ``(B, D·K, hidden_size)``."""

    def __init__(self, dimensions: Sequence[str], hidden_size: int, *, tokens_per_dimension: int = 1,
                 scale: float = 5.0, num_frequencies: int = 6, mlp_width: int | None = None, seed: int = 0):
        super().__init__()
        dims = [str(d) for d in dimensions]
        if not dims:
            raise ValueError("RewardEmbedding needs at least one dimension")
        if len(set(dims)) != len(dims):
            raise ValueError(f"duplicate reward dimensions: {dims}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.dimensions = tuple(dims)
        self.hidden_size = int(hidden_size)
        self.tokens_per_dimension = int(tokens_per_dimension)
        self.scale = float(scale)
        self.num_frequencies = int(num_frequencies)
        self.mlp_width = int(mlp_width or 4 * self.hidden_size)
        self.seed = int(seed)
        n_dim, k, h = len(dims), self.tokens_per_dimension, self.hidden_size
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * self.num_frequencies, self.mlp_width), nn.SiLU(),
                                 nn.Linear(self.mlp_width, k * h))
        self.dimension_embedding = nn.Parameter(torch.zeros(n_dim, k, h))
        self.unknown_embedding = nn.Parameter(torch.zeros(n_dim, k, h))
        # frequencies π·2^i: the features of x = score/scale in [0, 1] separate every half-point of a 0–5 score
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(self.num_frequencies, dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Seeded init (a private generator: the global RNG is left alone, so the run's other draws are unchanged)."""
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen))
                layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=gen))
            self.dimension_embedding.copy_(torch.randn(self.dimension_embedding.shape, generator=gen) * 0.02)
            self.unknown_embedding.copy_(torch.randn(self.unknown_embedding.shape, generator=gen) * 0.02)

    @property
    def num_tokens(self) -> int:
        return len(self.dimensions) * self.tokens_per_dimension

    def config_dict(self) -> dict[str, Any]:
        """What rebuilds the module (``reward_embedding.json``)."""
        return {"format_version": FORMAT_VERSION, "class": type(self).__name__, "dimensions": list(self.dimensions),
                "hidden_size": self.hidden_size, "tokens_per_dimension": self.tokens_per_dimension,
                "scale": self.scale, "num_frequencies": self.num_frequencies, "mlp_width": self.mlp_width,
                "seed": self.seed}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RewardEmbedding:
        version = int(config.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(f"reward embedding format {version} is newer than this code's ({FORMAT_VERSION})")
        return cls(config["dimensions"], int(config["hidden_size"]),
                   tokens_per_dimension=int(config.get("tokens_per_dimension", 1)),
                   scale=float(config.get("scale", 5.0)), num_frequencies=int(config.get("num_frequencies", 6)),
                   mlp_width=config.get("mlp_width"), seed=int(config.get("seed", 0)))

    def scores_tensor(self, scores: Sequence[Scores | None], *, strict: bool = False) -> torch.Tensor:
        """One mapping per sample (a sample's json, or ``{dimension: score}``) -> ``(B, D)`` float, NaN where a
        dimension has no score. ``strict``: a key that is not one of the dimensions is an error (catches typos in
        requested scores; a corpus sample's json carries many other fields)."""
        rows = []
        for item in scores:
            item = item or {}
            if strict:
                unknown = sorted(set(item) - set(self.dimensions))
                if unknown:
                    raise ValueError(f"unknown reward dimension(s) {unknown}; this embedding knows "
                                     f"{list(self.dimensions)}")
            rows.append([score_value(item.get(d)) for d in self.dimensions])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.dimensions))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any shape, score/scale) -> ``(..., 1 + 2F)``: ``[x, sin(π2^i x), cos(π2^i x)]``."""
        angles = x[..., None] * self.frequencies
        return torch.cat([x[..., None], torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores (B, D)`` in score units (NaN = unknown) -> ``(B, D·K, hidden_size)``."""
        if scores.ndim != 2 or scores.shape[1] != len(self.dimensions):
            raise ValueError(f"scores must be (batch, {len(self.dimensions)}), got {tuple(scores.shape)}")
        param = self.dimension_embedding
        scores = scores.to(device=param.device, dtype=torch.float32)
        known = torch.isfinite(scores)
        x = torch.where(known, scores, torch.zeros_like(scores)) / self.scale
        b, n_dim = scores.shape
        k, h = self.tokens_per_dimension, self.hidden_size
        tokens = self.mlp(self.features(x).to(self.mlp[0].weight.dtype)).view(b, n_dim, k, h)
        tokens = tokens + self.dimension_embedding
        tokens = torch.where(known[:, :, None, None], tokens, self.unknown_embedding.expand(b, n_dim, k, h))
        return tokens.reshape(b, n_dim * k, h)


# ============================================================================================ save / load
def save_reward_embedding(module: RewardEmbedding, directory: str | os.PathLike) -> Path:
    """``directory/reward_embedding.safetensors`` + ``reward_embedding.json`` (what the trainer writes beside
    ``pytorch_lora_weights.safetensors``)."""
    from trainers.common import save_module

    return save_module(module, directory, EMBEDDING_NAME)


def has_reward_embedding(directory: str | os.PathLike) -> bool:
    return (Path(directory) / WEIGHTS_NAME).is_file()


def load_reward_embedding(directory: str | os.PathLike, device=None, dtype=None) -> RewardEmbedding:
    """Rebuild the module from ``reward_embedding.json`` and load its safetensors weights (strict), in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no reward embedding in {directory} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    module = RewardEmbedding.from_config(json.loads(config_path.read_text()))
    module.load_state_dict(load_file(str(weights_path)), strict=True)
    module.requires_grad_(False)
    module.eval()
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module


# ============================================================================================ conditioning
def append_reward_tokens(prompt_embeds: torch.Tensor, reward_tokens: torch.Tensor) -> torch.Tensor:
    """``(B, L, W)`` text hidden states + ``(B, T, W)`` reward tokens -> ``(B, L + T, W)``."""
    return torch.cat([prompt_embeds, reward_tokens.to(dtype=prompt_embeds.dtype, device=prompt_embeds.device)],
                     dim=1)


def reward_token_mask(batch: int, text_tokens: int, reward_tokens: int, keep, device=None) -> torch.Tensor:
    """Cross-attention mask ``(B, L + T)``: 1 on the text tokens, ``keep[b]`` on sample ``b``'s reward tokens
    (0 drops them: the UNet then sees exactly the plain prompt)."""
    mask = torch.ones(batch, text_tokens + reward_tokens, device=device)
    mask[:, text_tokens:] = keep.to(device=mask.device, dtype=mask.dtype)[:, None]
    return mask


def _per_text(scores: Scores | Sequence[Scores | None], n: int) -> list[Scores | None]:
    if isinstance(scores, Mapping):
        return [scores] * n
    items = list(scores)
    if len(items) != n:
        raise ValueError(f"{len(items)} score mappings for {n} prompts")
    return items


def encode_prompts_with_rewards(pipe, texts: str | Sequence[str], scores: Scores | Sequence[Scores | None] | None,
                                embedding: RewardEmbedding | None, device=None) -> torch.Tensor:
    """``prompt_embeds`` for ``pipe(prompt_embeds=...)``: the CLIP hidden states of ``texts`` with the reward tokens
    for ``scores`` appended, ``(B, 77 + D·K, width)``.

    ``scores``: ``{dimension: score}`` for every prompt, or one mapping per prompt; a dimension left out (or
    ``None``) is *unknown* (the learned unknown token, as for training samples without that score); a name that
    is not one of ``embedding.dimensions`` is an error. ``scores=None`` (or no embedding) gives the plain
    ``(B, 77, width)`` embeddings: the unconditioned model (what ``reward_dropout`` trains).
    For classifier-free guidance ``negative_prompt_embeds`` must have the same shape: build them with this
    function too (see :func:`reward_pipeline_kwargs`).
    """
    from trainers.common import encode_prompts

    texts = [texts] if isinstance(texts, str) else list(texts)
    device = device or pipe.text_encoder.device
    prompt_embeds = encode_prompts(pipe, texts, device)
    if scores is None or embedding is None:
        return prompt_embeds
    table = embedding.scores_tensor(_per_text(scores, len(texts)), strict=True)
    with torch.no_grad():
        tokens = embedding(table.to(next(embedding.parameters()).device))
    return append_reward_tokens(prompt_embeds, tokens)


def reward_pipeline_kwargs(pipe, prompts: str | Sequence[str], scores: Scores | Sequence[Scores | None] | None,
                           embedding: RewardEmbedding | None, *, negative_prompt: str | Sequence[str] = "",
                           negative_scores: Scores | Sequence[Scores | None] | None = None,
                           device=None) -> dict[str, torch.Tensor]:
    """``{"prompt_embeds", "negative_prompt_embeds"}`` for ``pipe(**kwargs, ...)``.

    ``negative_scores`` default: every dimension unknown (``{}``), the same number of tokens as the positive
    side (CFG needs equal shapes); pass e.g. ``{d: 0 for d in embedding.dimensions}`` to steer away from low
    scores. With ``scores=None`` both sides are the plain prompt embeddings.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    positive = encode_prompts_with_rewards(pipe, prompts, scores, embedding, device)
    neg_scores = None if scores is None or embedding is None else (
        {} if negative_scores is None else negative_scores)
    negative = encode_prompts_with_rewards(pipe, negatives, neg_scores, embedding, device)
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def family_condition_with_rewards(family, texts: str | Sequence[str], images, scores, embedding: RewardEmbedding | None,
                                  size: int):
    """The conditioning of any model family (:mod:`trainers.families`) with reward tokens appended — how a
    reward-conditioned adapter of a flow-matching or edit family is asked for scores at inference::

        cond = family_condition_with_rewards(family, ["make it red"], [[source]], {"visual_quality": 5}, emb, 512)
        out = family.sample(cond, uncond, family.initial_noise(gens, 512), steps, 512, guidance=4.0)

    ``images``: per prompt, the input images (as :meth:`ModelFamily.encode` takes them) or None."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    with torch.no_grad():
        cond = family.encode(texts, images, size)
        if scores is None or embedding is None:
            return cond
        table = embedding.scores_tensor(_per_text(scores, len(texts)), strict=True)
        tokens = embedding(table.to(next(embedding.parameters()).device))
    return family.append_tokens(cond, tokens)


__all__ = [
    "family_condition_with_rewards",
    "CONFIG_NAME", "EMBEDDING_NAME", "WEIGHTS_NAME", "RewardEmbedding", "append_reward_tokens",
    "default_reward_dimensions", "encode_prompts_with_rewards", "has_reward_embedding", "load_reward_embedding",
    "reward_pipeline_kwargs", "reward_token_mask", "save_reward_embedding", "score_value",
]
