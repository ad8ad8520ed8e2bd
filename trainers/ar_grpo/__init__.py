"""GRPO for autoregressive VQ-token image models (Janus / Janus-Pro) with the leave-one-out FID reward and an
adaptive entropy regulariser. ``python -m trainers.ar_grpo``."""

from trainers.ar_grpo.ar_grpo_config import ARGRPOConfig
from trainers.ar_grpo.ar_grpo_trainer import train

__all__ = ["ARGRPOConfig", "train"]
