"""Diffusion-DPO on a preference corpus (frozen reference = the UNet with the LoRA off). ``python -m trainers.dpo``."""

from trainers.dpo.dpo_config import DPOConfig
from trainers.dpo.dpo_trainer import train

__all__ = ["DPOConfig", "train"]
