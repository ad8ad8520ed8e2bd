"""Config of the SFT trainer (``python -m trainers.sft --config FILE``); defaults sized for the tiny CPU demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.config import LoRATrainingConfig


def _t2i_dimensions() -> list[str]:
    """The t2i judge rubric's dimensions (``labelers/rubrics/t2i.yaml``): prompt_alignment, visual_quality, ..."""
    from labelers.rubrics import load_rubric

    return list(load_rubric("t2i").dimension_names)


@dataclass
class SFTConfig(LoRATrainingConfig):
    """Supervised LoRA fine-tuning of a text-to-image diffusion model on an SFT corpus (noise-prediction MSE)."""

    corpus_dir: str = ""  # an sft_corpus version dir: shards/*.tar (+ index.parquet, manifest.json)
    output_dir: str = "runs/sft"
    max_steps: int = 20
    batch_size: int = 4  # samples per optimizer step and process (before gradient accumulation)
    gradient_accumulation_steps: int = 1
    caption_dropout: float = 0.0  # probability of training on the empty caption (enables CFG)
    # Latents of the training images: a VAE posterior sample (True, what diffusers' training scripts do) or its mean
    # (False). Use False when the VAE's posterior std is not small, e.g. the zoo's VAEs (std ~1, never fitted): the
    # sample is then the image's latent plus unit noise, and SFT learns to draw that noise.
    sample_latents: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 256  # samples in each DataLoader worker's shuffle buffer
    # Data loading: each rank reads its own shards in `dataloader_num_workers` worker processes (0: in the training
    # process) that decode and collate while the step runs. The sample order depends on the worker count (and on
    # the number of processes), so a run resumes with the same ones.
    dataloader_num_workers: int = 1
    prefetch_factor: int = 2  # chunks of `batch_size` samples each worker keeps ready
    # Reward conditioning (multi-reward as condition): each dimension's judge score (0..reward_scale, read from the
    # sample's json) is embedded into reward_tokens_per_dimension extra cross-attention tokens (trainers/
    # conditioning.py); the module is trained with the LoRA and saved beside it (adapter/reward_embedding.*).
    # At inference trainers.conditioning.encode_prompts_with_rewards asks for any scores (e.g. all 5).
    reward_conditioning: bool = False
    reward_dimensions: list[str] = field(default_factory=_t2i_dimensions)
    reward_scale: float = 5.0  # the scores' maximum (the judge rubrics score 0-5)
    reward_tokens_per_dimension: int = 1
    reward_dropout: float = 0.1  # probability a sample trains without the reward tokens (the plain prompt)
    reward_dimension_dropout: float = 0.0  # probability each dimension's score is hidden (-> its "unknown" token)
