"""Config of the GRPO trainer (``python -m trainers.grpo --config FILE``); defaults sized for the tiny CPU demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from labelers.defaults import DEFAULT_LAMBDA, DEFAULT_LAMBDAS, DRS_K0, DRS_K1, DRS_TAU
from trainers.config import LoRATrainingConfig
from trainers.losses import DYREF_DAR_GAMMA, DYREF_DAR_W_MAX, DYREF_DAR_W_MIN


def _default_lambdas() -> dict[str, float]:
    # λ of the λ-Harmonic reward per task: t2i has no references (λ unused: reward = CLIP_T).
    return dict(DEFAULT_LAMBDAS)


@dataclass
class GRPOConfig(LoRATrainingConfig):
    """Online GRPO (DDPO/Flow-GRPO-style stochastic DDIM policy) with λ-Harmonic CLIP rewards, DRS and DAR."""

    init_adapter: str | None = None  # the SFT adapter dir (DyRef stage 1); also the frozen KL reference
    prompt_pool: str = ""  # rl_prompt_pool parquet: prompt_id, task, text, reference_images, ..., split
    clip_model: str = "zoo:clip"  # reward model for labelers.clip_scorer.ClipScorer
    clip_backend: str = "open_clip"
    clip_batch_size: int = 32
    output_dir: str = "runs/grpo"
    # sampling (the policy)
    group_size: int = 4  # G images per prompt
    prompts_per_step: int = 2
    num_steps: int = 4  # optimizer steps (each: sample, score, update)
    sample_steps: int = 6  # sampler steps per trajectory
    eta: float = 1.0  # sampler stochasticity (> 0 needed for a log-probability): DDIM η, or the flow SDE's noise level
    # The stochastic step: None picks the family's first ("ddim" for sd/sdxl, "flow_sde" for flow matching);
    # flow families also take "dance_sde" (σ_t = η), "cps" (coefficients-preserving) and "ode" (not for training).
    sde_type: str | None = None
    # SDE window (MixGRPO / TempFlow-GRPO): > 0 makes only this many consecutive sampler steps stochastic (and
    # trained), with ODE steps elsewhere; the window's start is drawn per step within sde_window_range [lo, hi].
    sde_window_size: int = 0
    sde_window_range: list[int] | None = None
    guidance_scale: float = 1.0  # classifier-free guidance during sampling and training (1 = off)
    # policy update
    clip_range: float = 1e-2  # PPO ratio clip ε
    adv_clip_max: float = 5.0
    kl_coef: float = 0.01  # weight of the per-step KL to the reference policy
    kl_type: str = "latent"  # "latent": KL between the step Gaussians; "velocity": mean squared prediction gap
    # Advantages: "grpo" (the aggregate reward normalised per group) or "gdpo" (each reward in gdpo_rewards
    # normalised per group, then combined with gdpo_weights and standardised over the batch)
    advantage: str = "grpo"
    gdpo_rewards: list[str] = field(default_factory=lambda: ["clip_t", "clip_i_reward"])
    gdpo_weights: dict[str, float] = field(default_factory=dict)
    log_prob_reduce: str = "mean"  # "mean" (DDPO/Flow-GRPO: per-dim average) or "sum" (true log-density)
    train_timestep_fraction: float = 1.0  # fraction of the recorded DDIM steps trained on per update
    num_inner_epochs: int = 1  # passes over each collected batch (>1 makes the PPO clip matter)
    train_micro_batch: int = 8  # trajectories per forward/backward chunk
    # reward: "clip" (λ-Harmonic of CLIP similarities, below) or "verifier" (the proving ground's fact checker,
    # labelers.verifier: the share of the prompt's facts the image satisfies; an upper bound on label quality)
    reward: str = "clip"
    lambdas: dict[str, float] = field(default_factory=_default_lambdas)
    default_lambda: float = DEFAULT_LAMBDA  # for tasks missing from ``lambdas``
    use_drs: bool = True  # DyRef DRS: sharpen per-reference sims σ(k(s-τ)), k = k0 + k1(n_refs-2)
    drs_k0: float = DRS_K0  # DyRef's released code (labelers.defaults)
    drs_k1: float = DRS_K1
    drs_tau: float = DRS_TAU
    use_dar: bool = True  # DyRef DAR: per-group focal weight clip((1-p_g)^γ) renormalised to mean 1
    dar_gamma: float = DYREF_DAR_GAMMA  # DyRef's values (trainers.losses)
    dar_w_min: float = DYREF_DAR_W_MIN  # DyRef: weights clipped to [0.5, 5], easiness p clipped to [0, 1]
    dar_w_max: float = DYREF_DAR_W_MAX
    # model selection on held-out prompts (RPO): keep the adapter with the best mean λ-Harmonic
    heldout_every: int = 2
    heldout_prompts: int = 4
    heldout_images_per_prompt: int = 2
    heldout_seed: int = 1234
    checkpoint_every: int = 2
