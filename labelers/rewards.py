"""Instance rewards: λ-Harmonic (RPO), DRS sharpening (DyRef) and the configured aggregate. Pure numpy.

* ``lambda_harmonic(CLIP_I, CLIP_T, λ) = 1 / (λ / CLIP_I + (1 - λ) / CLIP_T)``. Cosine similarities can be ≤ 0
  (always possible with random models, occasionally with real ones), where the harmonic mean is undefined, so
  both are clamped to ``[eps, 1]`` first. ``λ = 0`` or a missing CLIP_I (a t2i prompt has no reference) gives
  CLIP_T; ``λ = 1`` gives CLIP_I. Only finite values are clamped: a NaN or infinite similarity is a broken
  score, not a perfect one, and makes the result NaN (the stage then marks the row ``reward_error``).
* ``drs_sharpen(s, n_refs) = σ(k · (s - τ))`` with ``k = k0 + k1 · (n_refs - 2)``, elementwise over the
  per-reference similarities; the caller averages the result into a sharpened CLIP_I. A non-finite similarity
  sharpens to NaN (not σ(±∞) = 1 or 0), so the mean is NaN too.
* ``aggregate_reward`` mixes the judge (mean of 0–5 scores, scaled to [0, 1]) and the CLIP term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from labelers.bradley_terry import stable_sigmoid
from labelers.defaults import CLIP_WEIGHT, DRS_K0, DRS_K1, DRS_TAU, JUDGE_WEIGHT

SCORE_MAX = 5.0


def _clamp(x: Any, eps: float) -> Any:
    """``x`` clamped to ``[eps, 1]``; a non-finite value becomes NaN instead (never clamped into range)."""
    arr = np.asarray(x, dtype=np.float64)
    arr = np.where(np.isfinite(arr), np.clip(arr, eps, 1.0), np.nan)
    return float(arr) if arr.ndim == 0 else arr


def lambda_harmonic(clip_i: Any | None, clip_t: Any, lam: float, eps: float = 1e-6) -> Any:
    """λ-weighted harmonic mean of image-reference (CLIP_I) and image-text (CLIP_T) similarity.

    Scalars give a float, arrays broadcast. ``clip_i=None`` (no references) returns the clamped CLIP_T. A NaN
    or infinite input (where it is used) gives NaN, never a value clamped into ``[eps, 1]``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    t = _clamp(clip_t, eps)
    if clip_i is None or lam == 0.0:
        return t
    i = _clamp(clip_i, eps)
    if lam == 1.0:
        return i
    out = 1.0 / (lam / np.asarray(i) + (1.0 - lam) / np.asarray(t))
    return float(out) if np.ndim(out) == 0 else out


def drs_k(n_refs: int, k0: float = DRS_K0, k1: float = DRS_K1) -> float:
    """DRS steepness: more references, sharper sigmoid."""
    return float(k0) + float(k1) * (int(n_refs) - 2)


def drs_sharpen(sims: Any, n_refs: int, k0: float = DRS_K0, k1: float = DRS_K1, tau: float = DRS_TAU) -> Any:
    """Dynamic reward sharpening ``σ(k · (s - τ))``, elementwise (float in, float out; sequences -> array).
    Defaults are DyRef's released code (:mod:`labelers.defaults`): ``k = 10 + 3·(n_refs - 2)``, ``τ = 0.65``."""
    k = drs_k(n_refs, k0, k1)
    sims = np.asarray(sims, dtype=np.float64)
    finite = np.isfinite(sims)
    out = stable_sigmoid(k * (np.where(finite, sims, tau) - tau))
    return np.where(finite, out, np.nan) if np.ndim(out) else (out if bool(finite) else float("nan"))


def drs_clip_i(per_ref: Any, k0: float = DRS_K0, k1: float = DRS_K1, tau: float = DRS_TAU) -> float | None:
    """Mean of the DRS-sharpened per-reference similarities (``None`` without references)."""
    sims = np.asarray(per_ref, dtype=np.float64).reshape(-1)
    if sims.size == 0:
        return None
    return float(np.mean(drs_sharpen(sims, sims.size, k0=k0, k1=k1, tau=tau)))


def judge_mean(judge_scores: Mapping[str, float] | None) -> float | None:
    """Mean judge score scaled to [0, 1] (``None`` when the judge gave nothing)."""
    if not judge_scores:
        return None
    values = [float(v) for v in judge_scores.values() if v is not None]
    if not values:
        return None
    return float(np.mean(values)) / SCORE_MAX


def aggregate_reward(
    judge_scores: Mapping[str, float] | None,
    lambda_harmonic: float,
    judge_weight: float = JUDGE_WEIGHT,
    clip_weight: float = CLIP_WEIGHT,
) -> float:
    """``judge_weight · mean(scores) / 5 + clip_weight · lambda_harmonic``.

    Without judge scores (``None``/empty: judge disabled for the run) the CLIP term carries the whole weight,
    i.e. ``(judge_weight + clip_weight) · lambda_harmonic`` — with the default 0.5/0.5 simply the λ-Harmonic
    reward — so rewards stay on the same scale. (Rows whose judgement *failed* get no reward at all; that is
    the stage's business, not this function's.)
    """
    if judge_weight < 0 or clip_weight < 0 or judge_weight + clip_weight <= 0:
        raise ValueError(f"weights must be >= 0 and not both 0, got {judge_weight}, {clip_weight}")
    j = judge_mean(judge_scores)
    lh = float(lambda_harmonic)
    if j is None:
        return (judge_weight + clip_weight) * lh
    return judge_weight * j + clip_weight * lh
