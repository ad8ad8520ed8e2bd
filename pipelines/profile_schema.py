"""The typed profile: every section and key a profile may hold, with its type, default and one-line doc.

``pipelines.profiles.load_profile`` validates a profile (after ``extends:``) against :class:`Profile`; an unknown
key, a wrong type, an unknown backend/strategy or a key the chosen backend does not use is a ``ProfileError``
listing each problem as ``path.to.key: problem`` (with ``did you mean 'x'?`` for a near miss). The loaded profile
stays a plain dict: :func:`resolve` returns the validated settings with the defaults below filled in, so the
consumers of a loaded profile need no defaults of their own. Two kinds of section are handed on as written instead (only the keys given):
the generator specs (``generation.generators.<task>``, defaults: ``pipelines.generation.ImageGenerator``) and the
trainer sections (``training.<trainer>``, defaults: the trainer's config dataclass, e.g. ``trainers.sft.SFTConfig``)
— their defaults are documented here (and tests keep them equal) but filled in by those classes, because the assets
derive some of them from elsewhere when absent (a trainer's ``resolution`` from the t2i generator's width, its
``tasks`` from ``training.tasks``). A key whose default is ``None`` ("absent") is left out when not given.

The reward defaults that the labelling stage and the trainers share (λ, DRS, the reward weights, the judge's
feedback length) live in :mod:`labelers.defaults` and DyRef's DAR weights in :mod:`trainers.losses`, the lowest
layers that use them; the fields below take them from there (and the names stay importable from here), so each
number is written once.

Imports pydantic, the standard library, :mod:`labelers.defaults` and :mod:`trainers.losses` (both import nothing
heavy at top level): no Dagster, no torch, no numpy, so ``python -m pipelines.cli check-profile`` and the trainers'
processes may use it.

One module over ~500 lines: it is the profile's schema, one model per section, and reads as the reference of every
key a profile may hold; the models nest into :class:`Profile` and share the validators and suggestions below.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_serializer, model_validator)

from labelers.defaults import (CLIP_WEIGHT, DEFAULT_LAMBDA, DEFAULT_LAMBDAS, DRS_K0, DRS_K1, DRS_TAU,
                               FEEDBACK_MAX_CHARS, JUDGE_WEIGHT)
from trainers.losses import DYREF_DAR_GAMMA, DYREF_DAR_W_MAX, DYREF_DAR_W_MIN

TASKS = ("t2i", "edit", "multi_ref")
Task = Literal["t2i", "edit", "multi_ref"]
DType = Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]
JUDGE_BACKENDS = ("transformers", "vllm", "openai", "verifier")
PAIR_MODES = ("pointwise", "pairwise")

# The reward defaults shared by labelling, GRPO and the evals (DyRef's released values) are imported above from
# labelers.defaults (DEFAULT_LAMBDAS, DEFAULT_LAMBDA, DRS_K0/K1/TAU, JUDGE_WEIGHT, CLIP_WEIGHT, FEEDBACK_MAX_CHARS)
# and trainers.losses (DYREF_DAR_*). This module's own, for the pipelines that read it:
#: new corpus samples that start training (``automation.min_new_samples``; ``pipelines.automation``)
DEFAULT_MIN_NEW_SAMPLES = 16

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    """A profile section: unknown keys and wrong types are errors (strict: ``"8"`` is not an int, ``1`` not a bool;
    an int is accepted where a float is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False, frozen=False)
    #: True: dump only the keys the profile gave (the consumer holds the defaults); False: fill the defaults in
    _pass_through: ClassVar[bool] = False
    #: unknown keys with a better explanation than "unknown key"
    _hints: ClassVar[dict[str, str]] = {}

    @model_serializer(mode="wrap")
    def _resolved(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        out = {}
        for name, field in type(self).model_fields.items():
            key = field.alias or name
            if key not in data:
                key = name
                if key not in data:
                    continue
            given = name in self.model_fields_set
            if given or (not self._pass_through and getattr(self, name) is not None):
                out[key] = data[key]
        for tag in ("backend", "mode"):  # a union member's tag first
            if tag in out:
                out = {tag: out.pop(tag), **out}
        return out


# ================================================================================================ generation
class GeneratorSpec(_Section):
    """One task's generator (``pipelines.generation.ImageGenerator``); keys not given take its defaults."""

    _pass_through: ClassVar[bool] = True
    _hints: ClassVar[dict[str, str]] = {
        "reference_grid": "obsolete: a single-image edit model always gets multi_ref's references as a grid; remove it",
        "reference_input": "set by the pipeline from the model (native for multi-image models, grid otherwise); "
                           "remove it",
    }

    model: str = Field(description="checkpoint: zoo:<name>, a local diffusers directory or a hub id")
    kind: Literal["t2i", "edit"] = Field("t2i", description="t2i: text only; edit: conditioned on input images")
    steps: PositiveInt = Field(8, description="sampler steps (not used by autoregressive models)")
    guidance_scale: float = Field(5.0, description="classifier-free guidance scale")
    image_guidance_scale: float = Field(1.5, description="image guidance of InstructPix2Pix-style edit pipelines")
    width: PositiveInt = Field(64, description="image width in pixels (also the trainers' default resolution)")
    height: PositiveInt = Field(64, description="image height in pixels")
    negative_prompt: str | None = Field(None, description="negative prompt (absent: the pipeline's)")
    device: str | None = Field(None, description="overrides the profile's device for this generator")
    dtype: DType | None = Field(None, description="overrides the profile's dtype for this generator")
    batch_size: PositiveInt | None = Field(None, description="overrides generation.batch_size for this generator")
    cpu_threads: PositiveInt | None = Field(None, description="overrides the profile's cpu_threads")


class Generators(_Section):
    """The generator of each task."""

    t2i: GeneratorSpec = Field(description="text-to-image generator")
    edit: GeneratorSpec = Field(description="single-source edit generator (kind: edit)")
    multi_ref: GeneratorSpec = Field(description="multi-reference generator (kind: edit; native or grid references)")

    @model_validator(mode="after")
    def _kinds(self) -> Generators:
        for task in ("edit", "multi_ref"):
            spec = getattr(self, task)
            if spec.kind != "edit":
                raise ValueError(f"{task}.kind: the {task} task conditions on images and needs kind 'edit', "
                                 f"got {spec.kind!r}")
        return self


class Generation(_Section):
    """Candidate generation: how many candidates per prompt and which generator per task."""

    seeds_per_prompt: PositiveInt = Field(description="K candidates per prompt")
    base_seed: int = Field(0, description="seed of a prompt's first candidate (the others follow)")
    batch_size: PositiveInt = Field(8, description="images per generator call (halved on out-of-memory)")
    shard_size: PositiveInt = Field(256, description="images per candidate shard (a crash resumes from the last "
                                                     "whole shard)")
    generators: Generators = Field(description="the generator of each task: t2i, edit, multi_ref")


# ================================================================================================ judge
class _JudgeCommon(_Section):
    rubric_dir: str | None = Field(None, description="directory of task rubrics (absent: labelers/rubrics)")
    max_retries: NonNegInt = Field(2, description="re-asks after an unparsable answer")
    feedback_max_chars: PositiveInt = Field(FEEDBACK_MAX_CHARS, description="feedback kept per dimension, chars")
    _hints: ClassVar[dict[str, str]] = {
        "api_key": "never in a profile: the endpoint's key comes from the PREFMILL_JUDGE_API_KEY environment variable",
    }


class _LlmJudge(_JudgeCommon):
    model: str = Field(description="the VLM: zoo:<name>, a local directory or a hub id (openai: the served name)")
    model_ref: str | None = Field(None, description="what the judge id hashes (absent: model)")
    max_new_tokens: PositiveInt = Field(512, description="tokens generated per answer")
    seed: int = Field(0, description="seed of sampled answers and retries")
    retry_temperature: Annotated[float, Field(ge=0.0)] = Field(1.0, description="sampling temperature of retries")


class TransformersJudge(_LlmJudge):
    """Local judge on transformers (``labelers.judge.TransformersJudge``)."""

    backend: Literal["transformers"] = Field(description="judge backend")
    batch_size: PositiveInt = Field(8, description="items per generate call")
    temperature: Annotated[float, Field(ge=0.0)] = Field(0.0, description="first-answer temperature (0: greedy)")
    prefix_cache: bool = Field(True, description="reuse the shared rubric prefix's keys/values across a batch")
    attn_implementation: str | None = Field(None, description="transformers attention implementation (absent: "
                                                              "its default)")
    device: str | None = Field(None, description="device of the judge (absent: the profile's device)")
    dtype: DType | None = Field(None, description="dtype of the judge (absent: the profile's dtype)")
    cpu_threads: PositiveInt | None = Field(None, description="torch threads while generating (absent: the "
                                                              "profile's cpu_threads)")


class VllmJudge(_LlmJudge):
    """Judge on vLLM's offline engine (``labelers.judge.VllmJudge``); decodes greedily (no ``temperature``)."""

    backend: Literal["vllm"] = Field(description="judge backend")
    batch_size: PositiveInt = Field(64, description="requests per engine call")
    tensor_parallel_size: PositiveInt = Field(1, description="GPUs per model replica")
    data_parallel_size: PositiveInt = Field(1, description="model replicas (needs a multi-process launch)")
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(0.85, description="share of GPU "
                                                                                             "memory vLLM takes")
    max_model_len: PositiveInt = Field(8192, description="context length")
    enable_prefix_caching: bool = Field(True, description="vLLM automatic prefix caching")
    max_images_per_prompt: PositiveInt = Field(8, description="images one request may carry")
    dtype: str = Field("auto", description="vLLM dtype (auto, bfloat16, float16, ...)")
    engine_kwargs: dict[str, Any] | None = Field(None, description="further vllm.LLM arguments")


class OpenAIJudge(_LlmJudge):
    """Judge on an OpenAI-compatible endpoint (``labelers.openai_judge.OpenAIJudge``)."""

    backend: Literal["openai"] = Field(description="judge backend")
    base_url: Annotated[str, Field(pattern=r"^https?://")] = Field(description="endpoint up to /chat/completions, "
                                                                               "e.g. http://host:8000/v1")
    batch_size: PositiveInt = Field(32, description="items per driver batch")
    max_concurrency: PositiveInt = Field(8, description="requests in flight")
    timeout_s: Annotated[float, Field(gt=0.0)] = Field(60.0, description="seconds per request")
    max_attempts: PositiveInt = Field(5, description="tries per request on 429/5xx/timeouts")
    temperature: Annotated[float, Field(ge=0.0)] = Field(0.0, description="first-answer temperature (0: greedy)")
    backoff_s: Annotated[float, Field(ge=0.0)] = Field(0.5, description="first retry backoff, doubled per try")
    max_backoff_s: Annotated[float, Field(ge=0.0)] = Field(30.0, description="longest backoff")


class VerifierJudge(_JudgeCommon):
    """The proving ground's fact checker (``labelers.verifier.VerifierJudge``): no model."""

    backend: Literal["verifier"] = Field(description="judge backend")
    model: str | None = Field(None, description="not used (the verifier has no model)")
    batch_size: PositiveInt = Field(64, description="items per batch")
    max_retries: NonNegInt = Field(0, description="re-asks (the verifier always parses)")


def _tag(key: str, default: str | None = None):
    def pick(value: Any) -> Any:
        if isinstance(value, dict):
            return value.get(key, default)
        return getattr(value, key, default)

    return pick


Judge = Annotated[Union[Annotated[TransformersJudge, Tag("transformers")], Annotated[VllmJudge, Tag("vllm")],
                        Annotated[OpenAIJudge, Tag("openai")], Annotated[VerifierJudge, Tag("verifier")]],
                  Discriminator(_tag("backend"))]


# ================================================================================================ clip
class Clip(_Section):
    """The CLIP scorer of the rewards (and the optional human-preference scorer)."""

    backend: Literal["open_clip", "transformers"] = Field("open_clip", description="CLIP implementation")
    model: str = Field(description="zoo:<name>, hf-hub:<id> (open_clip), a hub id or a local directory")
    batch_size: PositiveInt = Field(32, description="images per forward pass")
    preference_model: str | None = Field(None, description="a PickScore/HPS-style CLIP; stored as preference_score "
                                                           "(absent: none)")
    preference_backend: Literal["open_clip", "transformers"] = Field("transformers", description="backend of the "
                                                                                                 "preference model")


# ================================================================================================ rewards
class Drs(_Section):
    """DyRef's dynamic reference sharpening of multi_ref's per-reference similarities."""

    enabled: bool = Field(False, description="sharpen (labels and GRPO); absent section: off")
    k0: float = Field(DRS_K0, description="slope k = k0 + k1·(n_refs-2)")
    k1: float = Field(DRS_K1, description="slope increase per reference beyond two")
    tau: float = Field(DRS_TAU, description="similarity threshold τ of σ(k(s-τ))")


class Diversity(_Section):
    """The distribution-level (leave-one-out FID) reward, stored as its own ``diversity`` column."""

    enabled: bool = Field(False, description="compute it")
    ema_decay: Fraction = Field(0.9, description="EMA decay of the reference moments across partitions")


class Rewards(_Section):
    """How judge scores and CLIP similarities become one reward."""

    lambda_: dict[Task, Fraction] = Field(default_factory=lambda: dict(DEFAULT_LAMBDAS), alias="lambda",
                                          description="λ of the λ-Harmonic reward per task (missing tasks: 0.5)")
    drs: Drs = Field(default_factory=Drs, description="DyRef's reference-similarity sharpening")
    judge_weight: Annotated[float, Field(ge=0.0)] = Field(JUDGE_WEIGHT, description="weight of the mean judge "
                                                                                   "score")
    clip_weight: Annotated[float, Field(ge=0.0)] = Field(CLIP_WEIGHT, description="weight of the λ-Harmonic CLIP "
                                                                                 "reward")
    diversity: Diversity = Field(default_factory=Diversity, description="leave-one-out FID reward")


# ================================================================================================ pairs
class PointwisePairs(_Section):
    """Pairs ordered by the aggregate reward (``labelers.pairs.select_pairs``)."""

    mode: Literal["pointwise"] = Field("pointwise", description="pointwise (by reward) or pairwise (judge verdicts)")
    strategy: Literal["best_vs_worst", "all_pairs", "top_bottom_k", "pareto"] = Field(
        "best_vs_worst", description="which candidates of a prompt are paired")
    min_margin: Annotated[float, Field(ge=0.0)] = Field(0.0, description="drop pairs whose margin is below this")
    tau: Annotated[float, Field(gt=0.0)] = Field(0.1, description="Bradley-Terry temperature on the reward")
    tie_policy: Literal["drop", "keep"] = Field("drop", description="what happens to tied pairs")
    label_mode: Literal["deterministic", "sampled", "soft"] = Field("deterministic", description="how p_chosen "
                                                                                                "becomes a label")
    seed: int = Field(0, description="seed of sampled labels")
    max_pairs_per_prompt: PositiveInt | None = Field(None, description="largest-margin pairs kept per prompt "
                                                                       "(absent: all)")
    tie_margin: Annotated[float, Field(ge=0.0)] = Field(1e-9, description="rewards closer than this are a tie")
    top_k: PositiveInt = Field(1, description="top_bottom_k: best k against worst k")
    dimensions: list[str] | None = Field(None, description="pareto: the score columns a pair must dominate on")
    margin_on: Literal["reward", "probability"] = Field("reward", description="what min_margin is measured on")

    @model_validator(mode="after")
    def _strategy_keys(self) -> PointwisePairs:
        if self.top_k != 1 and self.strategy != "top_bottom_k":  # (1, the default, is harmless anywhere)
            raise ValueError(f"top_k: only used by strategy top_bottom_k, not {self.strategy!r}")
        if self.strategy == "pareto" and not self.dimensions:
            raise ValueError("dimensions: strategy pareto needs the score columns to compare")
        if self.dimensions is not None and self.strategy != "pareto":
            raise ValueError(f"dimensions: only used by strategy pareto, not {self.strategy!r}")
        if self.margin_on == "probability" and not self.min_margin < 0.5:
            raise ValueError(f"min_margin: with margin_on probability it is p_chosen - 0.5 and must be < 0.5, "
                             f"got {self.min_margin}")
        return self


class PairwisePairs(_Section):
    """Pairs from the judge comparing two candidates in both orders (``pipelines.pairwise_stage``)."""

    mode: Literal["pairwise"] = Field(description="pointwise (by reward) or pairwise (judge verdicts)")
    max_pairs_per_prompt: PositiveInt = Field(6, description="candidate pairs the judge compares per prompt")
    bt_prior: Annotated[float, Field(ge=0.0)] = Field(0.1, description="Bradley-Terry prior strength of the fit")
    tie_policy: Literal["drop", "keep"] = Field("drop", description="what happens to tied verdicts")


Pairs = Annotated[Union[Annotated[PointwisePairs, Tag("pointwise")], Annotated[PairwisePairs, Tag("pairwise")]],
                  Discriminator(_tag("mode", "pointwise"))]


# ================================================================================================ corpora, filters
class Corpora(_Section):
    """The versioned WebDataset corpora."""

    shard_max_samples: PositiveInt = Field(1000, description="samples per shard")
    shard_max_bytes: PositiveInt | None = Field(None, description="bytes per shard (absent: no byte limit)")
    seed: int = Field(0, description="seed of the preference corpus' jpg_0 alternation")
    sft_min_reward_quantile: Fraction = Field(0.0, description="SFT keeps candidates at or above this reward "
                                                               "quantile of their partition")


class Dedup(_Section):
    """Near-duplicate filtering (exact duplicates always drop)."""

    phash_max_distance: NonNegInt | None = Field(None, description="perceptual-hash Hamming distance (null: off)")
    clip_cosine: Fraction | None = Field(None, description="CLIP embedding cosine threshold (null: off)")
    exact: bool = Field(False, description="true: brute force O(N²); false: indexed lookups")


class Nsfw(_Section):
    """An image classifier with an ``nsfw`` label."""

    model: str = Field(description="hub id or local directory of the classifier")
    threshold: Fraction = Field(0.5, description="drop at or above this nsfw probability")


class Filters(_Section):
    """Filters on the way into the corpora; every drop is counted by reason."""

    min_image_side: NonNegInt = Field(0, description="undersized_image below this many pixels")
    dedup: Dedup = Field(default_factory=Dedup, description="near-duplicate filter")
    nsfw: Nsfw | None = Field(None, description="NSFW classifier (null: off)")


# ================================================================================================ training
class _Trainer(_Section):
    """What every LoRA trainer takes (``trainers.config.LoRATrainingConfig``); keys not given take the trainer's
    defaults (shown)."""

    _pass_through: ClassVar[bool] = True
    _hints: ClassVar[dict[str, str]] = {
        "pretrained_model": "set training.model instead",
        "output_dir": "set by the asset (runs/<trainer>/<run key>)",
        "corpus_dir": "set by the asset (the latest corpus version)",
        "prompt_pool": "set by the asset (the rl_prompt_pool)",
        "clip_model": "set from the clip section",
        "clip_backend": "set from the clip section",
        "lambdas": "set from rewards.lambda",
        "use_drs": "set from rewards.drs.enabled",
        "drs_k0": "set from rewards.drs.k0",
        "drs_k1": "set from rewards.drs.k1",
        "drs_tau": "set from rewards.drs.tau",
    }

    resolution: PositiveInt = Field(64, description="training resolution (absent: the t2i generator's width)")
    lora_rank: PositiveInt = Field(4, description="LoRA rank")
    lora_alpha: float | None = Field(None, description="LoRA alpha (absent: = lora_rank, scale 1)")
    lora_target_modules: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="module names the LoRA wraps, e.g. [to_q, to_k, to_v, to_out.0, "
                                        "ff.net.0.proj] (absent: the model family's attention projections)")
    learning_rate: Annotated[float, Field(gt=0.0)] = Field(1e-4, description="AdamW learning rate")
    lr_warmup_steps: NonNegInt = Field(0, description="linear warm-up steps")
    adam_weight_decay: Annotated[float, Field(ge=0.0)] = Field(0.0, description="AdamW weight decay")
    max_grad_norm: Annotated[float, Field(gt=0.0)] = Field(1.0, description="gradient clipping norm")
    seed: int = Field(0, description="training seed")
    checkpoint_every: PositiveInt = Field(10, description="steps between checkpoints")
    keep_checkpoints: PositiveInt = Field(2, description="checkpoints kept")
    resume: bool = Field(True, description="continue from the latest checkpoint (same config required)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision")
    device: str | None = Field(None, description="training device (absent: accelerate's choice)")
    num_threads: PositiveInt | None = Field(None, description="torch intra-op threads (absent: the profile's "
                                                              "cpu_threads)")
    tasks: list[Task] | None = Field(None, description="tasks trained on (absent: training.tasks, else all)")


class _CorpusTrainer(_Trainer):
    """Shared by the trainers on a corpus."""

    init_adapter: str | None = Field(None, description="a diffusers-format LoRA directory to start from")
    sample_latents: bool = Field(True, description="VAE posterior sample (true) or mean (false)")


class SftTrainer(_CorpusTrainer):
    """LoRA SFT on the SFT corpus (``trainers.sft.SFTConfig``)."""

    max_steps: PositiveInt = Field(20, description="optimizer steps")
    batch_size: PositiveInt = Field(4, description="samples per optimizer step and process")
    gradient_accumulation_steps: PositiveInt = Field(1, description="micro-batches per optimizer step")
    caption_dropout: Fraction = Field(0.0, description="probability of the empty caption (enables CFG)")
    shuffle: bool = Field(True, description="shuffle the samples")
    shuffle_buffer: PositiveInt = Field(256, description="samples in each loader worker's shuffle buffer")
    dataloader_num_workers: NonNegInt = Field(1, description="loader worker processes (0: in process)")
    prefetch_factor: PositiveInt = Field(2, description="batches each worker keeps ready")
    reward_conditioning: bool = Field(False, description="condition on the judge's per-dimension scores")
    reward_dimensions: list[str] = Field(default_factory=lambda: ["prompt_alignment", "visual_quality",
                                                                  "aesthetics"],
                                         description="dimensions embedded (default: the t2i rubric's)")
    reward_scale: Annotated[float, Field(gt=0.0)] = Field(5.0, description="the scores' maximum")
    reward_tokens_per_dimension: PositiveInt = Field(1, description="cross-attention tokens per dimension")
    reward_dropout: Fraction = Field(0.1, description="probability a sample trains without reward tokens")
    reward_dimension_dropout: Fraction = Field(0.0, description="probability a dimension's score is hidden")


class DpoTrainer(_CorpusTrainer):
    """Diffusion-DPO on the preference corpus (``trainers.dpo.DPOConfig``)."""

    beta: Annotated[float, Field(gt=0.0)] = Field(2000.0, description="KL strength β")
    drop_ties: bool = Field(True, description="skip 0.5/0.5 pairs")
    max_steps: PositiveInt = Field(20, description="optimizer steps")
    batch_size: PositiveInt = Field(4, description="pairs per optimizer step and process")
    gradient_accumulation_steps: PositiveInt = Field(1, description="micro-batches per optimizer step")
    shuffle: bool = Field(True, description="shuffle the pairs")
    label_flip: Fraction = Field(0.0, description="share of pairs whose labels are swapped (controls)")


class _GroupTrainer(_Trainer):
    """Shared by the GRPO trainers."""

    clip_batch_size: PositiveInt = Field(32, description="images per CLIP forward pass")
    group_size: PositiveInt = Field(4, description="G images per prompt")
    prompts_per_step: PositiveInt = Field(2, description="prompts per optimizer step")
    num_steps: PositiveInt = Field(4, description="optimizer steps (each: sample, score, update)")
    guidance_scale: float = Field(1.0, description="classifier-free guidance while sampling and training (1: off)")
    clip_range: Annotated[float, Field(gt=0.0)] = Field(1e-2, description="PPO ratio clip ε")
    adv_clip_max: Annotated[float, Field(gt=0.0)] = Field(5.0, description="advantages clipped to ±this")
    kl_coef: Annotated[float, Field(ge=0.0)] = Field(0.01, description="weight of the KL to the reference policy")
    num_inner_epochs: PositiveInt = Field(1, description="passes over each collected batch")
    train_micro_batch: PositiveInt = Field(8, description="trajectories per forward/backward chunk")
    heldout_every: NonNegInt = Field(2, description="steps between held-out evaluations")
    heldout_prompts: NonNegInt = Field(4, description="held-out prompts for model selection (0: none)")
    heldout_images_per_prompt: PositiveInt = Field(2, description="images per held-out prompt")
    heldout_seed: int = Field(1234, description="seed of the held-out images")
    checkpoint_every: PositiveInt = Field(2, description="steps between checkpoints")


class GrpoTrainer(_GroupTrainer):
    """Online Flow-GRPO/DDPO with λ-Harmonic CLIP rewards, DRS and DAR (``trainers.grpo.GRPOConfig``)."""

    _hints: ClassVar[dict[str, str]] = {**_Trainer._hints,
                                        "init_adapter": "set by the asset (the SFT adapter, or none)"}

    sample_steps: PositiveInt = Field(6, description="sampler steps per trajectory")
    eta: Annotated[float, Field(ge=0.0)] = Field(1.0, description="sampler stochasticity (DDIM η or SDE noise)")
    sde_type: Literal["ddim", "flow_sde", "dance_sde", "cps"] | None = Field(
        None, description="stochastic step (absent: the family's first)")
    sde_window_size: NonNegInt = Field(0, description="> 0: only this many consecutive steps are stochastic")
    sde_window_range: list[int] | None = Field(None, description="[lo, hi] of the SDE window's start")
    kl_type: Literal["latent", "velocity"] = Field("latent", description="KL between step Gaussians or velocity gap")
    advantage: Literal["grpo", "gdpo"] = Field("grpo", description="group-normalised reward or per-reward GDPO")
    gdpo_rewards: list[str] = Field(default_factory=lambda: ["clip_t", "clip_i_reward"],
                                    description="gdpo: rewards normalised per group")
    gdpo_weights: dict[str, float] = Field(default_factory=dict, description="gdpo: weight per reward (absent: 1)")
    log_prob_reduce: Literal["mean", "sum"] = Field("mean", description="per-dim mean or sum of log-probabilities")
    train_timestep_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(1.0, description="share of steps "
                                                                                             "trained per update")
    reward: Literal["clip", "verifier"] = Field("clip", description="λ-Harmonic CLIP or the proving ground's "
                                                                    "verifier")
    default_lambda: Fraction = Field(DEFAULT_LAMBDA, description="λ for tasks missing from rewards.lambda")
    use_dar: bool = Field(True, description="DyRef DAR focal group weights")
    dar_gamma: Annotated[float, Field(ge=0.0)] = Field(DYREF_DAR_GAMMA, description="DAR focal exponent γ")
    dar_w_min: Annotated[float, Field(ge=0.0)] = Field(DYREF_DAR_W_MIN, description="DAR weight lower clip")
    dar_w_max: Annotated[float, Field(gt=0.0)] = Field(DYREF_DAR_W_MAX, description="DAR weight upper clip")


class ArGrpo(_GroupTrainer):
    """GRPO of an autoregressive VQ-token generator, e.g. Janus (``trainers.ar_grpo.ARGRPOConfig``; asset
    ``ar_grpo_run``, which runs only when a profile has this top-level section)."""

    _hints: ClassVar[dict[str, str]] = {**_Trainer._hints,
                                        "pretrained_model": "set ar_grpo.model instead",
                                        "lambdas": "set from rewards.lambda.t2i",
                                        "preference_model": "set from clip.preference_model",
                                        "preference_backend": "set from clip.preference_backend"}

    model: str | None = Field(None, description="the autoregressive checkpoint (absent: the t2i generator's model)")
    init_adapter: str | None = Field(None, description="a PEFT LoRA directory to start from")
    lora_rank: PositiveInt = Field(8, description="LoRA rank")
    learning_rate: Annotated[float, Field(gt=0.0)] = Field(1e-3, description="AdamW learning rate")
    group_size: PositiveInt = Field(8, description="G images per prompt")
    num_steps: PositiveInt = Field(20, description="optimizer steps")
    temperature: Annotated[float, Field(gt=0.0)] = Field(1.0, description="token sampling temperature")
    clip_range: Annotated[float, Field(gt=0.0)] = Field(0.2, description="PPO ratio clip ε, per token")
    train_micro_batch: PositiveInt = Field(16, description="samples per forward/backward chunk")
    reward_weights: dict[str, float] = Field(default_factory=lambda: {"clip_t": 1.0, "preference": 1.0,
                                                                      "loo_fid": 0.5},
                                             description="weight of each standardised reward component")
    fid_ema_decay: Fraction = Field(0.95, description="EMA decay of the LOO-FID reference moments")
    fid_reference_moments: str | None = Field(None, description="FeatureMoments file (absent: the labelling "
                                                                "stage's, else warm-up batches)")
    fid_warmup_batches: PositiveInt = Field(2, description="initial-policy batches forming the reference")
    entropy_coef: Annotated[float, Field(ge=0.0)] = Field(0.01, description="initial entropy weight α")
    adaptive_entropy: bool = Field(True, description="adapt α toward the target entropy")
    target_entropy: float | None = Field(None, description="nats per token (absent: ratio × initial entropy)")
    target_entropy_ratio: Annotated[float, Field(gt=0.0)] = Field(0.9, description="target / initial entropy")
    entropy_coef_lr: Annotated[float, Field(ge=0.0)] = Field(1.0, description="step size of log α")
    entropy_coef_min: Annotated[float, Field(ge=0.0)] = Field(1e-3, description="α lower clip")
    entropy_coef_max: Annotated[float, Field(gt=0.0)] = Field(1.0, description="α upper clip")
    heldout_every: NonNegInt = Field(5, description="steps between held-out evaluations")
    checkpoint_every: PositiveInt = Field(10, description="steps between checkpoints")


class Training(_Section):
    """The trainers and what they fine-tune."""

    model: str | None = Field(None, description="checkpoint fine-tuned (absent: the multi_ref generator's model "
                                                "when it takes several images, else t2i's)")
    tasks: list[Task] | None = Field(None, description="tasks the trained model learns (absent: all)")
    sft: SftTrainer = Field(default_factory=SftTrainer, description="LoRA SFT (sft_run)")
    dpo: DpoTrainer = Field(default_factory=DpoTrainer, description="Diffusion-DPO (dpo_run)")
    grpo: GrpoTrainer = Field(default_factory=GrpoTrainer, description="Flow-GRPO from the SFT adapter (grpo_run)")


# ================================================================================================ the rest
class Eval(_Section):
    """The evals of the trained adapters on held-out prompts."""

    seeds_per_prompt: PositiveInt = Field(description="images per held-out prompt")
    max_prompts: PositiveInt = Field(description="held-out prompts evaluated")


class Checks(_Section):
    """Thresholds of the asset checks."""

    max_parse_error_rate: Fraction = Field(0.2, description="reward_labels blocks above this parse-failure share")
    min_judge_clip_agreement: Fraction | None = Field(None, description="warn below this judge/CLIP agreement "
                                                                        "(null: report only)")
    verifier_agreement: bool = Field(False, description="report agreement with the proving ground's verifier")


class Automation(_Section):
    """The daemon's sensors."""

    min_new_samples: PositiveInt = Field(DEFAULT_MIN_NEW_SAMPLES, description="new corpus samples that start "
                                                                               "training")


class Inputs(_Section):
    """What one prompt batch may bring in (``pipelines.profiles.InputLimits``)."""

    max_pixels: PositiveInt = Field(16_777_216, description="source/reference width × height (4096²)")
    min_image_side: PositiveInt = Field(16, description="shorter side of a source/reference image, pixels")
    max_image_bytes: PositiveInt = Field(32 << 20, description="a larger image file is not read")
    max_line_bytes: PositiveInt = Field(256 << 10, description="one JSONL line, UTF-8 bytes")
    max_json_depth: PositiveInt = Field(32, description="nesting of arrays/objects in one row")
    max_text_chars: PositiveInt = Field(2000, description="prompt text after normalisation")


class Profile(_Section):
    """A whole profile (after ``extends:``)."""

    name: str | None = Field(None, description="the profile's name")
    device: str = Field("cpu", description="torch device of the models (cpu, cuda, cuda:1, ...)")
    dtype: DType = Field("float32", description="model dtype")
    cpu_threads: PositiveInt | None = Field(None, description="torch threads per process (absent: torch's default)")
    samples: Literal["bundled", "world"] = Field(
        "bundled", description="what `cli seed-inbox` puts in the inbox: the bundled sample batches, or batches of "
                               "the procedural world's prompts (for the models trained on it)")
    generation: Generation = Field(description="candidate generation")
    judge: Judge = Field(description="the VLM judge; backend: transformers | vllm | openai | verifier")
    clip: Clip = Field(description="the CLIP scorer")
    rewards: Rewards = Field(description="reward aggregation")
    pairs: Pairs = Field(description="preference pairs; mode: pointwise | pairwise")
    corpora: Corpora = Field(description="the corpora's shards")
    training: Training = Field(description="the trainers")
    eval: Eval = Field(description="held-out evaluation")
    filters: Filters = Field(default_factory=Filters, description="corpus filters")
    checks: Checks = Field(default_factory=Checks, description="asset check thresholds")
    automation: Automation = Field(default_factory=Automation, description="sensor thresholds")
    inputs: Inputs = Field(default_factory=Inputs, description="prompt batch limits")
    ar_grpo: ArGrpo | None = Field(None, description="GRPO of an autoregressive t2i generator (absent: "
                                                     "ar_grpo_run skips)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?|auto", value):
            raise ValueError(f"not a torch device: {value!r} (cpu, cuda, cuda:<n>, mps)")
        return value


# ================================================================================================ validation
class ProfileProblems(ValueError):  # noqa: N818 - a list of problems
    """The problems of a profile, one ``path.to.key: problem`` per entry of ``problems``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


#: the discriminated unions: field -> (tag key, {tag: class})
_UNIONS: dict[str, tuple[str, dict[str, type[BaseModel]]]] = {
    "judge": ("backend", {"transformers": TransformersJudge, "vllm": VllmJudge, "openai": OpenAIJudge,
                          "verifier": VerifierJudge}),
    "pairs": ("mode", {"pointwise": PointwisePairs, "pairwise": PairwisePairs}),
}


def _keys(cls: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in cls.model_fields.items()]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes an annotation may hold (through Optional, Union, Annotated; not inside dict/list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (dict, list):
        return []
    out: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        out += _models_in(arg)
    return out


def _walk(loc: tuple, data: Any) -> tuple[list[str], type[BaseModel] | None]:
    """The loc as a key path (without pydantic's union tags and ``[key]`` markers) and the model class holding its
    last key (None where the path leaves the models, e.g. inside a dict)."""
    cls: type[BaseModel] | None = Profile
    holder: type[BaseModel] | None = None
    path: list[str] = []
    parts = [p for p in loc if p != "[key]"]
    i = 0
    while i < len(parts):
        part = parts[i]
        i += 1
        path.append(str(part))
        holder = cls
        if cls is None:
            continue
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        if part not in fields:
            cls = None
            continue
        classes = _models_in(fields[part].annotation)
        union = _UNIONS.get(str(part)) if cls is Profile else None
        if union and i < len(parts) and parts[i] in union[1]:
            cls = union[1][parts[i]]  # pydantic puts the union member's tag into the loc
            i += 1
        else:
            cls = classes[0] if len(classes) == 1 else None
    return path, holder


def _suggest(word: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(error: dict[str, Any], data: Any) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        path, _ = _walk(loc, data)
        tag_key, members = _UNIONS.get(path[-1] if path else "", ("backend", _UNIONS["judge"][1]))
        where = ".".join(path + [tag_key])
        tags = list(members)
        if kind == "union_tag_not_found":
            return f"{where}: missing (required); one of {', '.join(tags)}"
        value = error.get("ctx", {}).get("tag")
        return f"{where}: unknown {tag_key} {value!r}; one of {', '.join(tags)}{_suggest(value, tags)}"
    path, holder = _walk(loc, data)
    where = ".".join(path) or "(profile)"
    if kind == "extra_forbidden":
        key = path[-1]
        allowed = _keys(holder) if holder is not None else []
        hint = holder._hints.get(key) if holder is not None and issubclass(holder, _Section) else None
        if hint:
            return f"{where}: {hint}"
        for tag_key, members in _UNIONS.values():
            if holder in members.values():  # a key of another backend / mode, or a near miss of one
                tag = get_args(holder.model_fields[tag_key].annotation)[0]
                every = sorted({k for cls in members.values() for k in _keys(cls)})
                close = difflib.get_close_matches(key, every, n=1, cutoff=0.6)
                target = key if key in every else (close[0] if close else None)
                if target is not None and target not in allowed:
                    users = [t for t, cls in members.items() if target in _keys(cls)]
                    users_said = f"only {', '.join(users)} {'use' if len(users) > 1 else 'uses'} it"
                    if target == key:
                        return f"{where}: not used by the {tag} {tag_key} ({users_said})"
                    return (f"{where}: unknown key; did you mean {target!r}? (not used by the {tag} {tag_key} "
                            f"either: {users_said})")
        suggestion = _suggest(key, allowed)
        return f"{where}: unknown key" + (suggestion or (f" (known: {', '.join(allowed)})" if allowed else ""))
    if kind == "missing":
        return f"{where}: missing (required)"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        what = (f"unknown task (one of {expected})" if loc and loc[-1] == "[key]"
                else f"{error['input']!r} is not one of {expected}")
        return f"{where}: {what}{_suggest(error['input'], choices)}"
    if kind in ("value_error", "assertion_error"):
        message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        match = re.match(r"([A-Za-z_][\w.]*): (.*)", message, re.S)
        if match:  # a model validator naming the key: "key: problem"
            prefix = f"{where}." if path else ""
            return f"{prefix}{match.group(1)}: {match.group(2)}"
        return f"{where}: {message}"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"
    field = holder.model_fields.get(path[-1]) if holder is not None and path else None
    if field is not None and kind in ("int_type", "int_parsing", "int_from_float", "greater_than_equal") and any(
            getattr(m, "ge", None) == 1 for m in field.metadata):
        return f"{where}: must be a positive integer, got {shown}"
    return f"{where}: {error['msg'][0].lower() + error['msg'][1:]}, got {shown}"


def validate(data: dict[str, Any]) -> Profile:
    """The typed profile of a merged profile dict; :class:`ProfileProblems` lists every problem."""
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            text = _describe(error, data)
            if text not in problems:
                problems.append(text)
        raise ProfileProblems(problems) from None


def resolve(data: dict[str, Any]) -> dict[str, Any]:
    """The validated profile as a plain dict, defaults filled in (see the module docstring for what is not)."""
    return validate(data).model_dump(mode="python", by_alias=True)
