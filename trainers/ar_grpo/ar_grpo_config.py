"""Config of the AR GRPO trainer (``python -m trainers.ar_grpo --config FILE``); defaults sized for the tiny CPU demo
(``zoo:janus``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from labelers.defaults import DEFAULT_LAMBDAS
from trainers.config import LoRATrainingConfig


def _default_weights() -> dict[str, float]:
    # composite reward: CLIP_T + the preference scorer (when configured) + the distribution-level LOO-FID reward
    return {"clip_t": 1.0, "preference": 1.0, "loo_fid": 0.5}


@dataclass
class ARGRPOConfig(LoRATrainingConfig):
    """GRPO for an autoregressive VQ-token generator (Janus / Janus-Pro) with the leave-one-out FID reward and an
    adaptive entropy regulariser."""

    pretrained_model: str = "zoo:janus"  # a JanusForConditionalGeneration checkpoint (local dir, hub id, zoo:<name>)
    output_dir: str = "runs/ar_grpo"
    lora_rank: int = 8
    learning_rate: float = 1e-3
    prompt_pool: str = ""  # rl_prompt_pool parquet (t2i rows are used; other tasks are refused by the family)
    clip_model: str = "zoo:clip"  # CLIP_T reward and the LOO-FID features (labelers.clip_scorer.ClipScorer)
    clip_backend: str = "open_clip"
    clip_batch_size: int = 32
    # the human-preference scorer prefmill already has (a PickScore/HPS-style CLIP: ClipScorer's image-text
    # similarity, the labels' ``preference_score``); None: that component is absent (its weight must then be 0)
    preference_model: str | None = None
    preference_backend: str = "transformers"
    # sampling (the policy)
    group_size: int = 8  # G images per prompt
    prompts_per_step: int = 2
    num_steps: int = 20
    guidance_scale: float = 1.0  # 1 = sample without CFG; > 1: Janus's CFG in sampling and in the ratio alike
    temperature: float = 1.0
    # policy update
    clip_range: float = 0.2  # PPO ratio clip ε, per token
    adv_clip_max: float = 5.0
    kl_coef: float = 0.01  # exact per-token KL(π ‖ π_ref) over the codebook; reference = the LoRA off (or init_adapter)
    num_inner_epochs: int = 1
    train_micro_batch: int = 16
    # reward: each named component is standardised over the step's samples, then weighted and summed; advantages
    # are group-relative (GRPO). Components: "clip_t", "preference", "loo_fid", or whatever a custom reward_fn returns.
    reward_weights: dict[str, float] = field(default_factory=_default_weights)
    lambdas: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LAMBDAS))  # λ-Harmonic for selection (t2i: CLIP_T)
    # LOO-FID: each sample's leave-one-out effect on the CLIP-feature FID of the step's samples against reference
    # moments kept as an EMA. Reference: ``fid_reference_moments`` (a FeatureMoments safetensors file, e.g. the
    # labelling stage's) when given, else the moments of ``fid_warmup_batches`` batches of the *initial* policy's
    # samples; after every step the step's features are folded in with ``fid_ema_decay`` (1.0 = frozen reference).
    fid_ema_decay: float = 0.95
    fid_reference_moments: str | None = None
    fid_warmup_batches: int = 2
    # adaptive entropy regulariser: loss -= α·H(π) with log α ← log α + entropy_coef_lr·(H_target - H)
    entropy_coef: float = 0.01  # initial α (0 with adaptive_entropy off: no entropy term)
    adaptive_entropy: bool = True
    target_entropy: float | None = None  # nats per token; None: target_entropy_ratio × the initial policy's entropy
    target_entropy_ratio: float = 0.9
    entropy_coef_lr: float = 1.0
    entropy_coef_min: float = 1e-3
    entropy_coef_max: float = 1.0
    # model selection on held-out prompts (as the diffusion GRPO): the adapter with the best mean λ-Harmonic
    heldout_every: int = 5
    heldout_prompts: int = 4
    heldout_images_per_prompt: int = 2
    heldout_seed: int = 1234
    checkpoint_every: int = 10
