"""Bradley-Terry preference probabilities: ``P(i ≻ j) = σ((r_i - r_j) / τ)`` (RPO, Pick-a-Pic style labels).

Pure numpy; scalars in give a float out, arrays broadcast elementwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stable_sigmoid(x: Any) -> Any:
    """σ(x) without overflow for large |x| (float in, float out; arrays elementwise)."""
    arr = np.asarray(x, dtype=np.float64)
    out = np.empty_like(arr)
    pos = arr >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-arr[pos]))
    e = np.exp(arr[~pos])
    out[~pos] = e / (1.0 + e)
    return float(out) if out.ndim == 0 else out


def bt_probability(r_i: Any, r_j: Any, tau: float = 1.0) -> Any:
    """Probability that ``i`` is preferred over ``j`` given rewards ``r_i``, ``r_j`` and temperature ``tau > 0``."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    diff = (np.asarray(r_i, dtype=np.float64) - np.asarray(r_j, dtype=np.float64)) / float(tau)
    return stable_sigmoid(diff)
