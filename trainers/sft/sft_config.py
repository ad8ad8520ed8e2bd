"""Config of the SFT trainer (``python -m trainers.sft --config FILE``); defaults sized for the tiny CPU demo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SFTConfig:
    """Supervised LoRA fine-tuning of a text-to-image diffusion model on an SFT corpus (noise-prediction MSE)."""

    pretrained_model: str = "zoo:t2i"  # diffusers StableDiffusionPipeline dir, or zoo:<name>
    corpus_dir: str = ""  # an sft_corpus version dir: shards/*.tar (+ index.parquet, manifest.json)
    output_dir: str = "runs/sft"
    init_adapter: str | None = None  # optional diffusers-format LoRA dir to start from
    resolution: int = 64
    lora_rank: int = 4
    lora_alpha: float | None = None  # None -> = lora_rank (scale 1)
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 20
    batch_size: int = 4  # samples per optimizer step and process (before gradient accumulation)
    gradient_accumulation_steps: int = 1
    caption_dropout: float = 0.0  # probability of training on the empty caption (enables CFG)
    shuffle: bool = True
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir (same config required)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    num_threads: int | None = None  # torch intra-op threads (None: torch default; 1 is fastest for tiny CPU runs)
