"""Config of the Diffusion-DPO trainer (``python -m trainers.dpo --config FILE``); defaults sized for the CPU demo."""

from __future__ import annotations

from dataclasses import dataclass

from trainers.config import LoRATrainingConfig


@dataclass
class DPOConfig(LoRATrainingConfig):
    """Diffusion-DPO (Wallace et al.) LoRA training on a Pick-a-Pic-style preference corpus."""

    corpus_dir: str = ""  # a preference_corpus version dir: shards/*.tar (+ index.parquet, manifest.json)
    output_dir: str = "runs/dpo"
    init_adapter: str | None = None  # e.g. the SFT adapter; the reference model is then this adapter, frozen
    beta: float = 2000.0  # KL strength β (the paper uses 2000-5000 for SD-sized models)
    drop_ties: bool = True  # skip 0.5/0.5 pairs (no preference to learn)
    # Latents of both images: a VAE posterior sample (True, as Diffusion-DPO's reference code) or the posterior mean
    # (False: each pair's latents are deterministic). Use False when the VAE's posterior std is not small against
    # the w/l difference, e.g. the random zoo VAE (posterior std ~0.95 vs ~0.19 between a bright and a dark version
    # of one image, unscaled): the independent posterior noise of w and l then drowns the preference.
    sample_latents: bool = True
    max_steps: int = 20
    batch_size: int = 4  # pairs per optimizer step and process (before gradient accumulation)
    gradient_accumulation_steps: int = 1
    shuffle: bool = True
    # Share of pairs whose labels are swapped (seeded per pair): 0 trains on the corpus as labelled, 0.5 is the
    # proving ground's shuffled-label control (no preference left to learn), 1 trains on flipped labels.
    label_flip: float = 0.0
