"""Config of the subject-driven RPO trainer (``python -m trainers.rpo --config FILE``); defaults sized for the tiny
CPU demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainers.config import LoRATrainingConfig


def _templates() -> list[str]:
    return ["a {subject} on a white background", "a {subject} on a grey background",
            "a {subject} on a black background", "a photo of a {subject}"]


def _validation() -> list[str]:
    return ["a {subject} in the middle on a white background", "a picture of a {subject}"]


def _heldout() -> list[str]:
    return ["an image of a {subject}", "a {subject} on a dark background"]


@dataclass
class RPOConfig(LoRATrainingConfig):
    """RPO (Miao et al.): a LoRA learns one subject from 3-5 reference images; per round, candidates of the current
    model are scored with λ-Harmonic against the references, paired with Bradley-Terry labels and trained on with
    the Diffusion-DPO loss plus the family's reconstruction loss on the references; validation λ-Harmonic selects
    the kept checkpoint (early stopping)."""

    output_dir: str = "runs/rpo"
    # the subject
    subject_dir: str = ""  # a directory of reference images (*.png, *.jpg, *.jpeg, *.webp; sorted by name)
    subject_images: list[str] | None = None  # or explicit paths (added after subject_dir's)
    class_noun: str = "object"  # e.g. "dog"; CLIP-T is scored against the prompt with the class noun alone
    identifier: str = "sks"  # the rare token bound to the subject: "{subject}" -> "<identifier> <class_noun>"
    # prompts: each holds "{subject}"
    instance_prompt: str = "a photo of {subject}"  # the caption of the reference images (reconstruction term)
    prompt_templates: list[str] = field(default_factory=_templates)  # candidates are generated for these
    validation_prompts: list[str] = field(default_factory=_validation)  # model selection / early stopping
    heldout_prompts: list[str] = field(default_factory=_heldout)  # the final base-vs-selected report only
    # rounds: generate -> score -> pairs -> train steps_per_round -> validate
    rounds: int = 3
    candidates_per_prompt: int = 4
    steps_per_round: int = 8
    pairs_per_step: int = 4  # preference pairs per optimizer step
    recon_batch_size: int = 4  # reference images per optimizer step (drawn with replacement when fewer exist)
    patience: int = 2  # stop after this many rounds without a better validation λ-Harmonic (0: never stop early)
    min_delta: float = 0.0  # an improvement must exceed this
    # reward and labels
    clip_model: str = "zoo:clip"
    clip_backend: str = "open_clip"
    clip_batch_size: int = 32
    lam: float = 0.5  # λ of λ-Harmonic = 1 / (λ/CLIP_I + (1-λ)/CLIP_T)
    bt_tau: float = 0.02  # Bradley-Terry temperature: P(i ≻ j) = σ((r_i - r_j)/τ)
    min_p_chosen: float = 0.55  # drop near-ties: pairs whose P(chosen ≻ rejected) is below this
    soft_labels: bool = True  # train toward P(chosen ≻ rejected) (False: hard label 1, plain Diffusion-DPO)
    max_pairs_per_prompt: int = 6  # the pairs of largest margin per prompt (0: all)
    # loss
    beta: float = 2000.0  # Diffusion-DPO β
    recon_weight: float = 1.0  # weight of the reconstruction term on the reference images
    sample_latents: bool = False  # reference latents: VAE posterior sample (True) or mean (False)
    # sampling (candidates, validation and held-out images)
    sample_steps: int = 6
    guidance_scale: float = 1.0
    generation_batch: int = 16
    validation_images_per_prompt: int = 2
    validation_seed: int = 1234
    learning_rate: float = 1e-4
    checkpoint_every: int = 1  # in rounds: a checkpoint after every round (resume continues with the next one)
