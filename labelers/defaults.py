"""The reward defaults shared by labelling, GRPO, the evals and the profile schema: the one place each lives.

DyRef's released values. :mod:`labelers.rewards`, :mod:`labelers.stage`, :class:`trainers.grpo.GRPOConfig`,
:mod:`trainers.losses` and :mod:`pipelines.profile_schema` (which documents them as the profile's defaults) import
them from here instead of repeating the numbers. Imports nothing, so any layer may use it cheaply (the profile
schema loads without numpy, torch or Dagster).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

#: λ of the λ-Harmonic reward per task when a profile gives no ``rewards.lambda`` (t2i has no references: unused).
#: Read-only: copy it (``dict(DEFAULT_LAMBDAS)``) to change it.
DEFAULT_LAMBDAS: Mapping[str, float] = MappingProxyType({"t2i": 0.0, "edit": 0.5, "multi_ref": 0.5})
#: λ of a task missing from a GRPO run's ``lambdas`` (``GRPOConfig.default_lambda``)
DEFAULT_LAMBDA = 0.5

#: DyRef's dynamic reference sharpening σ(k(s-τ)) of per-reference similarities, k = k0 + k1·(n_refs-2)
DRS_K0 = 10.0
DRS_K1 = 3.0
DRS_TAU = 0.65

#: the aggregate reward: judge_weight · mean(judge scores)/5 + clip_weight · λ-Harmonic
JUDGE_WEIGHT = 0.5
CLIP_WEIGHT = 0.5

#: the judge's feedback is cut to this many characters per dimension. (``labelers.judge.protocol`` still spells
#: the number out; tests/unit/test_profile_schema.py keeps the two equal until it imports it from here.)
FEEDBACK_MAX_CHARS = 120
