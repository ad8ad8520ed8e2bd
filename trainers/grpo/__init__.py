"""Online GRPO with λ-Harmonic CLIP rewards, DRS and DAR (DyRef stage 2, from the SFT adapter).
``python -m trainers.grpo``."""

from trainers.grpo.grpo_config import GRPOConfig
from trainers.grpo.grpo_trainer import train

__all__ = ["GRPOConfig", "train"]
