"""Subject-driven RPO (λ-Harmonic preference fine-tuning from a few reference images). ``python -m trainers.rpo``."""

from trainers.rpo.rpo_config import RPOConfig
from trainers.rpo.rpo_trainer import train

__all__ = ["RPOConfig", "train"]
