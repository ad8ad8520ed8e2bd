"""SFT: LoRA fine-tuning on an SFT corpus with the standard noise-prediction loss, optionally reward-conditioned
(``reward_conditioning``: see :mod:`trainers.conditioning`). ``python -m trainers.sft``."""

from trainers.sft.sft_config import SFTConfig
from trainers.sft.sft_trainer import train

__all__ = ["SFTConfig", "train"]
