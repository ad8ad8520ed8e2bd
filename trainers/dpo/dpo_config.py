"""Config of the Diffusion-DPO trainer (``python -m trainers.dpo --config FILE``); defaults sized for the CPU demo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DPOConfig:
    """Diffusion-DPO (Wallace et al.) LoRA training on a Pick-a-Pic-style preference corpus."""

    pretrained_model: str = "zoo:t2i"  # diffusers StableDiffusionPipeline dir, or zoo:<name>
    corpus_dir: str = ""  # a preference_corpus version dir: shards/*.tar (+ index.parquet, manifest.json)
    output_dir: str = "runs/dpo"
    init_adapter: str | None = None  # e.g. the SFT adapter; the reference model is then this adapter, frozen
    beta: float = 2000.0  # KL strength β (the paper uses 2000-5000 for SD-sized models)
    drop_ties: bool = True  # skip 0.5/0.5 pairs (no preference to learn)
    resolution: int = 64
    lora_rank: int = 4
    lora_alpha: float | None = None  # None -> = lora_rank
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 20
    batch_size: int = 4  # pairs per optimizer step and process (before gradient accumulation)
    gradient_accumulation_steps: int = 1
    shuffle: bool = True
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True
    mixed_precision: str = "no"
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    num_threads: int | None = None  # torch intra-op threads (None: torch default; 1 is fastest for tiny CPU runs)
