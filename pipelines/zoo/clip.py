"""Tiny randomly initialised open_clip model in open_clip's HF-hub layout.

``build_clip(out_dir)`` writes ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, the
layout ``open_clip.push_to_hf_hub`` produces) and ``open_clip_model.safetensors``. It loads through open_clip's
own factory exactly like a downloaded hub model::

    open_clip.create_model_from_pretrained("local-dir:" + str(out_dir))
    open_clip.get_tokenizer("local-dir:" + str(out_dir))   # the bundled SimpleTokenizer, no download

A ViT with 64x64 input and 16x16 patches, 2 layers of width 64 in each tower (~3.3 M parameters, most of them
the 49408-token text embedding of open_clip's bundled BPE vocabulary).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

SEED = 4321

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 64,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}

# OpenAI CLIP normalisation, as the real checkpoints use.
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build_clip(out_dir: Path) -> None:
    """Write a tiny random open_clip model into ``out_dir`` (created if missing)."""
    from labelers import torch_compat

    torch_compat.install()
    import open_clip
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "open_clip_config.json"
    config_path.write_text(
        json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n", encoding="utf-8"
    )
    torch.manual_seed(SEED)
    # The class open_clip's factory instantiates for this config (a plain CLIP); the loader checks the state
    # dict strictly, so any mismatch would fail loudly at load time (tested).
    model = open_clip.model.CLIP(**copy.deepcopy(MODEL_CFG)).eval()
    _add_shared_offset(model, torch)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})


# Expected cosine between an unrelated image and text after the offset (real CLIP checkpoints give ~0.15-0.35).
TARGET_COSINE = 0.25


def _add_shared_offset(model, torch) -> None:
    """Give both towers' embeddings a shared component, as trained CLIP models have (their embeddings sit in a
    narrow cone, so image-text cosines are positive). Without it a random model's CLIP_T is as often negative as
    positive, and λ-Harmonic, which needs positive similarities, clamps it to ~0. The offset is written into the
    final LayerNorm biases (``ln_post`` / ``ln_final``) so the saved state dict keeps open_clip's exact layout."""
    generator = torch.Generator().manual_seed(SEED + 1)
    dim = MODEL_CFG["embed_dim"]
    direction = torch.randn(dim, generator=generator)
    direction /= direction.norm()
    with torch.no_grad():
        # Projected LayerNorm outputs have about unit variance per dimension, so norm ~ sqrt(dim); an offset of
        # norm s gives cosine ~ s^2 / (s^2 + dim) between unrelated embeddings.
        scale = (TARGET_COSINE * dim / (1.0 - TARGET_COSINE)) ** 0.5
        shared = direction * scale
        model.visual.ln_post.bias.copy_(shared @ torch.linalg.pinv(model.visual.proj))
        model.ln_final.bias.copy_(shared @ torch.linalg.pinv(model.text_projection))
