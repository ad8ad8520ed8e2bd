"""The stage objects the assets use, each built by one small factory from its validated profile section.

A loaded profile is a plain dict that already passed the schema (``pipelines.profiles.load_profile``, defaults
filled in). The factories here read a section once, as its typed model from :mod:`pipelines.profile_schema`
(a typed section is taken as is, a section dict is validated into one), so every key and default is the schema's
and no asset reads ``section.get("key", default)`` inline:

* :func:`judge_from_profile`: the judge backend named by ``judge.backend`` (``JudgeResource`` owns and sets it up);
  :func:`judge_section` the typed ``judge`` section (e.g. its ``batch_size``);
* :func:`pair_selector_from_profile`: ``pairs`` -> a :class:`PointwiseSelector` (``labelers.pairs.select_pairs``)
  or a :class:`PairwiseSelector` (the judge compares candidates in both orders, ``pipelines.pairwise_stage``);
* :func:`labeling_stage_from_profile`: ``rewards`` -> ``labelers.stage.LabelingStage``, with
  :func:`drs_from_profile` (the stage's DRS parameters, or None) and :func:`grpo_rewards_from_profile` (GRPOConfig's
  reward keys, for ``grpo_run``);
* :func:`rewards_section`, :func:`checks_section`: the typed sections.

No Dagster and no heavy import at module load; the models' modules load inside the factories.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, TypeAdapter

from pipelines import profile_schema as schema

JudgeSection = Union[schema.TransformersJudge, schema.VllmJudge, schema.OpenAIJudge, schema.VerifierJudge]
PairsSection = Union[schema.PointwisePairs, schema.PairwisePairs]

_JUDGE = TypeAdapter(schema.Judge)
_PAIRS = TypeAdapter(schema.Pairs)


def _typed(section: Any, types: tuple[type[BaseModel], ...], validate: Callable[[Any], Any]) -> Any:
    if isinstance(section, types):
        return section
    if not isinstance(section, Mapping):
        raise TypeError(f"expected a profile section (a mapping or one of {[t.__name__ for t in types]}), "
                        f"got {type(section).__name__}")
    return validate(dict(section))


def _section(settings: Any, name: str) -> Any:
    """The ``name`` section of a whole profile (dict or typed); a section (dict or typed) is returned as is. (No
    section holds a key named like itself, so a mapping with a ``name`` section in it is a whole profile.)"""
    if isinstance(settings, schema.Profile):
        return getattr(settings, name)
    if isinstance(settings, Mapping) and isinstance(settings.get(name), (Mapping, BaseModel)):
        return settings[name]
    return settings


# ------------------------------------------------------------------------------------------------ typed sections
def judge_section(section: Any) -> JudgeSection:
    """The typed ``judge`` section (a profile dict, the section's dict, or the typed section)."""
    return _typed(_section(section, "judge"), JudgeSection.__args__, _JUDGE.validate_python)


def pairs_section(section: Any) -> PairsSection:
    """The typed ``pairs`` section (a profile dict, the section's dict, or the typed section)."""
    return _typed(_section(section, "pairs"), PairsSection.__args__, _PAIRS.validate_python)


def rewards_section(section: Any) -> schema.Rewards:
    """The typed ``rewards`` section (a profile dict, the section's dict, or the typed section)."""
    return _typed(_section(section, "rewards"), (schema.Rewards,), schema.Rewards.model_validate)


def checks_section(settings: Mapping[str, Any]) -> schema.Checks:
    """The typed ``checks`` section of a profile dict (the defaults when it has none)."""
    section = settings.get("checks") if isinstance(settings, Mapping) else settings
    return _typed(section if section is not None else {}, (schema.Checks,), schema.Checks.model_validate)


# ------------------------------------------------------------------------------------------------ judge
def _init_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def judge_from_profile(settings: Mapping[str, Any], device: str | None = None, api_key: str | None = None):
    """The judge backend of a profile (not yet ``setup()``: its owner does that). ``device`` overrides the profile's
    device (transformers only); ``api_key`` is the endpoint's key (openai only; never in a profile). Device, dtype
    and cpu threads the section leaves out come from the profile's top level."""
    section = judge_section(settings["judge"])
    spec = section.model_dump(mode="python")
    backend = spec.pop("backend")
    if settings.get("cpu_threads"):
        spec.setdefault("cpu_threads", settings["cpu_threads"])
    if backend == "transformers":
        from labelers.judge import TransformersJudge as cls

        spec.setdefault("device", device or settings.get("device", "cpu"))
        spec.setdefault("dtype", settings.get("dtype", "float32"))
    elif backend == "openai":
        from labelers.openai_judge import OpenAIJudge as cls
    elif backend == "vllm":
        from labelers.judge import VllmJudge as cls
    elif backend == "verifier":  # the proving ground's fact checker (labelers/verifier.py), no model
        from labelers.verifier import VerifierJudge as cls
    else:  # pragma: no cover - the schema allows only the backends above
        raise ValueError(f"unknown judge backend {backend!r}")
    spec = {k: v for k, v in spec.items() if k in _init_params(cls)}
    return cls(api_key=api_key, **spec) if backend == "openai" else cls(**spec)


# ------------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PointwiseSelector:
    """``pairs.mode: pointwise``: pairs ordered by the aggregate reward (``labelers.pairs.select_pairs``)."""

    kwargs: dict[str, Any] = field(default_factory=dict)  # select_pairs' arguments, from the section
    mode: str = "pointwise"

    def __call__(self, labels: Any) -> tuple[Any, dict[str, int]]:
        """(pairs, drops by reason) of a labels frame."""
        from labelers.pairs import select_pairs

        return select_pairs(labels, **self.kwargs)


@dataclass(frozen=True)
class PairwiseSelector:
    """``pairs.mode: pairwise``: the judge compares each candidate pair in both orders and Bradley-Terry strengths
    are fitted to the verdicts (``pipelines.pairwise_stage.pairwise_partition``)."""

    # max_pairs_per_prompt, bt_prior, tie_policy: the profile's, else the schema's defaults (their one home)
    settings: dict[str, Any] = field(default_factory=lambda: _selector_settings(schema.PairwisePairs(mode="pairwise")))
    mode: str = "pairwise"

    def __call__(self, labels: Any, *, judge: Any, prompts: Any, images: dict, out_dir: Path, batch_size: int,
                 log: Callable[[str], None] = print) -> tuple[Any, dict[str, int], Any]:
        """(pairs, drops by reason, verdicts table); the verdicts are also written to ``out_dir``."""
        from labelers.pairwise import PairwiseJudge
        from pipelines.pairwise_stage import pairwise_partition

        return pairwise_partition(PairwiseJudge(judge), labels, prompts, images, out_dir, dict(self.settings),
                                  batch_size, log)


def _selector_settings(pairs: Any) -> dict[str, Any]:
    """A validated ``pairs`` section's settings (defaults filled in), without its ``mode``."""
    settings = pairs.model_dump(mode="python")
    settings.pop("mode", None)
    return settings


def pair_selector_from_profile(section: Any) -> PointwiseSelector | PairwiseSelector:
    """The pair selector of a profile's ``pairs`` section (or of the profile dict)."""
    pairs = pairs_section(section)
    settings = _selector_settings(pairs)
    if isinstance(pairs, schema.PairwisePairs):
        return PairwiseSelector(settings=settings)
    return PointwiseSelector(kwargs=settings)


# ------------------------------------------------------------------------------------------------ rewards
def drs_from_profile(section: Any) -> dict[str, float] | None:
    """The labelling stage's DRS parameters ``{k0, k1, tau}`` when ``rewards.drs.enabled``, else None."""
    drs = rewards_section(section).drs
    return {"k0": drs.k0, "k1": drs.k1, "tau": drs.tau} if drs.enabled else None


def labeling_stage_from_profile(section: Any, *, judge: Any | None, scorer: Any | None,
                                preference_scorer: Any | None = None, **kwargs: Any):
    """``labelers.stage.LabelingStage`` with a profile's ``rewards`` (λ per task, DRS, the judge/CLIP weights)
    around the given models; ``kwargs`` go to the stage as they are (e.g. ``dimensions``)."""
    from labelers.stage import LabelingStage

    rewards = rewards_section(section)
    return LabelingStage(judge=judge, scorer=scorer, lambdas=dict(rewards.lambda_), drs=drs_from_profile(rewards),
                         judge_weight=rewards.judge_weight, clip_weight=rewards.clip_weight,
                         preference_scorer=preference_scorer, **kwargs)


def grpo_rewards_from_profile(section: Any) -> dict[str, Any]:
    """GRPOConfig's reward keys from a profile's ``rewards``: ``lambdas``, ``use_drs``, ``drs_k0/k1/tau``."""
    rewards = rewards_section(section)
    drs = rewards.drs
    return {"lambdas": dict(rewards.lambda_), "use_drs": bool(drs.enabled), "drs_k0": drs.k0, "drs_k1": drs.k1,
            "drs_tau": drs.tau}
