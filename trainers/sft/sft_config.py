"""Config of the SFT trainer (``python -m trainers.sft --config FILE``); defaults sized for the tiny CPU demo."""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import LoRATrainingConfig


@dataclass
class SFTConfig(LoRATrainingConfig):
    """Supervised LoRA fine-tuning of a text-to-image diffusion model on an SFT corpus (noise-prediction MSE)."""

    corpus_dir: str = ""  # an sft_corpus version dir: shards/*.tar (+ index.parquet, manifest.json)
    output_dir: str = "runs/sft"
    max_steps: int = 20
    batch_size: int = 4  # samples per optimizer step and process (before gradient accumulation)
    gradient_accumulation_steps: int = 1
    caption_dropout: float = 0.0  # probability of training on the empty caption (enables CFG)
    shuffle: bool = True
