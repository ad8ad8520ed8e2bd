"""What every prefmill trainer's config shares (TRL-style: each ``<algo>_config.py`` extends it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRATrainingConfig:
    """The base pipeline, the LoRA adapter, the optimizer, checkpoints and devices."""

    pretrained_model: str = "zoo:t2i"  # a diffusers pipeline dir of any family (trainers.families), or zoo:<name>
    output_dir: str = "runs/train"
    init_adapter: str | None = None  # a diffusers-format LoRA dir to start from (e.g. the SFT adapter)
    resolution: int = 64
    lora_rank: int = 4
    lora_alpha: float | None = None  # None -> = lora_rank (scale 1)
    # module names the adapter wraps (peft's suffix match, e.g. "to_q" or "ff.net.0.proj"); None: the family's
    # attention projections. A name that matches nothing in the model is refused before training.
    lora_target_modules: list[str] | None = None
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in output_dir (same config required)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    device: str | None = None  # None: accelerate's choice; "cpu" forces CPU
    num_threads: int | None = None  # torch intra-op threads (None: torch default; 1 is fastest for tiny CPU runs)
    # Tasks to train on (None: every task in the data). Samples of other tasks are skipped; a listed task the
    # model family cannot condition on is refused at start (never trained as text-to-image).
    tasks: list[str] | None = None
