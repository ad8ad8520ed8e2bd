"""Distribution-level diversity reward: each sample's leave-one-out effect on FID (GRPO with leave-one-out FID).

A GRPO group of ``N`` images (same prompt or same batch) is compared, as a Gaussian in feature space, against
reference moments ``(μ_r, Σ_r)`` kept as an exponential moving average (:class:`FeatureMoments`). Sample ``i``'s
reward is ``FID(group without i, ref) - FID(group, ref)`` (:func:`loo_fid_diversity`): positive when dropping
``i`` moves the group's distribution *away* from the reference, i.e. ``i`` contributes coverage/diversity; a
near-duplicate scores about 0 or below. It is meant to be mixed with instance rewards (CLIP, judge scores) and
normalised per group like any GRPO reward.

Features are CLIP image embeddings (``ClipScorer.embed_images(images)``, L2-normalised, e.g. 512–1024-d), so this
is a **CLIP-feature FID**, not the Inception-v3 FID of the literature: numbers are not comparable to published FIDs
(and are on a much smaller scale, since unit-norm embeddings have a total variance below 1), but the Fréchet
distance and its leave-one-out differences are computed exactly as for Inception features.

Pure numpy (no scipy): matrix square roots come from ``eigh`` of symmetric positive semi-definite matrices.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MOMENTS_FORMAT = "prefmill.feature_moments"
MOMENTS_VERSION = "1"


def _as_features(features: Any) -> np.ndarray:
    """(N, D) float64 array from a numpy array, a CPU torch tensor or nested lists."""
    if hasattr(features, "detach"):  # torch tensor, without importing torch
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf")
    return x


def _batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and covariance (ddof=1, as ``np.cov`` and the usual FID code; zeros for a single sample)."""
    mu = x.mean(axis=0)
    d = x - mu
    cov = d.T @ d / (x.shape[0] - 1) if x.shape[0] > 1 else np.zeros((x.shape[1], x.shape[1]))
    return mu, cov


def sqrtm_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via ``eigh``; eigenvalues below 0
    (round-off on a singular covariance) are clamped to 0."""
    cov = np.asarray(cov, dtype=np.float64)
    vals, vecs = np.linalg.eigh(0.5 * (cov + cov.T))
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


@dataclass(eq=False)
class FeatureMoments:
    """Mean ``(D,)``, covariance ``(D, D)`` and a sample ``count`` of a feature distribution (float64)."""

    mean: np.ndarray
    cov: np.ndarray
    count: float = 0.0
    _sqrt_cov: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.cov = np.asarray(self.cov, dtype=np.float64)
        if self.mean.ndim != 1 or self.cov.shape != (self.mean.size, self.mean.size):
            raise ValueError(f"mean {self.mean.shape} and cov {self.cov.shape} do not match as (D,) and (D, D)")
        self.count = float(self.count)

    @classmethod
    def empty(cls, dim: int) -> FeatureMoments:
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0.0)

    @classmethod
    def from_features(cls, features: Any) -> FeatureMoments:
        x = _as_features(features)
        if x.shape[0] == 0:
            raise ValueError("no features")
        mu, cov = _batch_moments(x)
        return cls(mu, cov, float(x.shape[0]))

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    def sqrt_cov(self) -> np.ndarray:
        """``sqrtm_psd(cov)``, cached until the next update."""
        if self._sqrt_cov is None:
            self._sqrt_cov = sqrtm_psd(self.cov)
        return self._sqrt_cov

    def ema_update(self, features: Any, decay: float = 0.99) -> FeatureMoments:
        """Fold a batch of features into the moments in place (and return ``self``).

        The first batch (``count == 0``) sets the moments. Afterwards, with batch mean ``μ_b`` and covariance
        ``Σ_b`` (ddof=1; zero for a single feature)::

            μ' = d·μ + (1-d)·μ_b
            Σ' = d·Σ + (1-d)·Σ_b + d·(1-d)·(μ - μ_b)(μ - μ_b)ᵀ
            count' = count + N

        i.e. the moments of the mixture ``d·old + (1-d)·batch`` — identical to an EMA of the raw first and second
        moments, so a shifting mean also widens the covariance (and a stream of single features still builds one).
        """
        d = float(decay)
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        x = _as_features(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, moments {self.dim}")
        if x.shape[0] == 0:
            return self
        mu_b, cov_b = _batch_moments(x)
        if self.count <= 0:
            self.mean, self.cov = mu_b, cov_b
        else:
            delta = self.mean - mu_b
            self.mean = d * self.mean + (1.0 - d) * mu_b
            self.cov = d * self.cov + (1.0 - d) * cov_b + d * (1.0 - d) * np.outer(delta, delta)
        self.count += x.shape[0]
        self._sqrt_cov = None
        return self

    # -- persistence (safetensors, no pickle) ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {"mean": np.ascontiguousarray(self.mean), "cov": np.ascontiguousarray(self.cov),
                   "count": np.array([self.count], dtype=np.float64)}
        return save(tensors, metadata={"format": MOMENTS_FORMAT, "version": MOMENTS_VERSION, "dim": str(self.dim)})

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureMoments:
        from safetensors.numpy import load

        t = load(data)
        missing = [k for k in ("mean", "cov", "count") if k not in t]
        if missing:
            raise ValueError(f"not a FeatureMoments file: missing tensor(s) {missing}")
        return cls(t["mean"], t["cov"], float(t["count"].reshape(-1)[0]))

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (``mean``, ``cov``, ``count``, float64). Local paths are written atomically
        (temporary sibling, fsync, rename); URLs (``s3://...``) go through fsspec."""
        data = self.to_bytes()
        path_s = os.fspath(path)
        if "://" in path_s:
            import fsspec

            with fsspec.open(path_s, "wb") as f:
                f.write(data)
            return
        target = Path(path_s)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureMoments:
        path_s = os.fspath(path)
        if "://" in path_s:
            import fsspec

            with fsspec.open(path_s, "rb") as f:
                return cls.from_bytes(f.read())
        return cls.from_bytes(Path(path_s).read_bytes())


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``::

        ‖μ1 - μ2‖² + tr Σ1 + tr Σ2 - 2 tr (Σ1 Σ2)^{1/2}

    Without scipy's ``sqrtm``: ``Σ1 Σ2 = S (S Σ2 S) S⁻¹`` with ``S = Σ1^{1/2}`` (symmetric, from ``eigh``), so
    ``Σ1 Σ2`` is similar to the symmetric PSD matrix ``S Σ2 S`` and ``tr (Σ1 Σ2)^{1/2}`` is the sum of the square
    roots of ``S Σ2 S``'s eigenvalues (``eigvalsh``; by continuity also for singular ``Σ1``). On singular
    covariances (few samples in many dimensions) round-off turns exact zero eigenvalues into tiny ± values:
    negatives are clamped to 0 in ``sqrtm_psd``, and eigenvalues below ``D · eps · λ_max`` count as 0 in the sum;
    a tiny negative total is clamped to 0. Cost: two symmetric eigendecompositions of ``D × D``.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    cov1, cov2 = np.asarray(cov1, dtype=np.float64), np.asarray(cov2, dtype=np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    s = sqrtm_psd(cov1)
    tr_sqrt = float(_sum_sqrt_eigs((s @ cov2 @ s)[None])[0])
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt))


def _sum_sqrt_eigs(stack: np.ndarray) -> np.ndarray:
    """Σ sqrt(λ) over the eigenvalues of each symmetric PSD matrix of a ``(B, m, m)`` stack. Eigenvalues below
    ``m · eps · λ_max`` are round-off of exact zeros (rank-deficient covariances) and count as 0: their square
    roots (~1e-8 · sqrt(λ_max) each) would otherwise add up to visible noise."""
    eig = np.linalg.eigvalsh(0.5 * (stack + np.swapaxes(stack, -1, -2)))
    floor = stack.shape[-1] * np.finfo(np.float64).eps * np.abs(eig).max(axis=-1, keepdims=True)
    return np.sqrt(np.where(eig > floor, eig, 0.0)).sum(axis=-1)


def loo_fid_diversity(features: Any, reference: FeatureMoments, max_batch_bytes: int = 256 << 20) -> np.ndarray:
    """Leave-one-out FID diversity of each of ``N >= 3`` samples: ``FID(X \\ {i}, ref) - FID(X, ref)``, shape (N,).

    ``features`` are ``(N, D)`` CLIP image embeddings (``ClipScorer.embed_images``; CLIP-feature FID, not
    Inception); ``reference`` the EMA moments. Positive: removing ``i`` makes the set's distribution worse, so ``i``
    adds coverage; a near-duplicate of another sample scores about 0 or below. Set moments use ddof=1 (as
    :func:`frechet_distance` callers usually do), which is why ``N >= 3`` (a leave-one-out set needs 2 samples).

    No per-sample recomputation of the moments: with ``d_i = x_i - μ`` and scatter ``C = Σ d_i d_iᵀ``,
    ``μ₋ᵢ = μ - d_i/(N-1)`` and ``C₋ᵢ = C - N/(N-1)·d_i d_iᵀ`` (rank-one downdate), ``Σ₋ᵢ = C₋ᵢ/(N-2)``; norms and
    traces follow in O(N·D). The square-root term ``tr (Σ₋ᵢ Σ_r)^{1/2}`` needs eigenvalues, computed in the
    smaller of two spaces:

    * ``N - 1 <= D`` (the usual GRPO group of 8–64 images against 512–1024-d CLIP features): the non-zero
      eigenvalues of ``Σ_r^{1/2} Y₋ᵢᵀ Y₋ᵢ Σ_r^{1/2}`` equal those of the Gram matrix ``Y₋ᵢ Σ_r Y₋ᵢᵀ`` (rows of
      ``Y₋ᵢ``: ``x_j - μ₋ᵢ``), itself a rank-one update of ``G = D Σ_r Dᵀ``. Cost O(N·D²) for ``G`` plus ``N``
      eigendecompositions of ``N × N``: about a millisecond for N=16, D=1024 — no ``D × D`` eigh at all.
    * ``N - 1 > D``: ``N`` eigendecompositions of the ``D × D`` matrices ``Σ_r^{1/2} C₋ᵢ Σ_r^{1/2} / (N-2)``
      (rank-one downdates of one precomputed matrix), stacked in batches of at most ``max_batch_bytes``;
      O(N·D³) — e.g. N=2048 at D=64 is a fraction of a second.
    """
    x = _as_features(features)
    n, dim = x.shape
    if n < 3:
        raise ValueError(f"leave-one-out FID needs at least 3 samples, got {n}")
    if dim != reference.dim:
        raise ValueError(f"features have dimension {dim}, reference moments {reference.dim}")
    if reference.count <= 0:
        raise ValueError("reference moments are empty (count 0): ema_update them first")
    mu_r, cov_r = reference.mean, reference.cov

    mu = x.mean(axis=0)
    d = x - mu
    sq = np.einsum("ij,ij->i", d, d)  # |d_i|²
    tr_c = float(sq.sum())
    delta = mu - mu_r
    dist_full = float(delta @ delta)
    c = n / (n - 1.0)

    # ‖μ₋ᵢ - μ_r‖² and tr Σ₋ᵢ by the rank-one formulas
    dist_loo = dist_full - 2.0 * (d @ delta) / (n - 1.0) + sq / (n - 1.0) ** 2
    tr_loo = (tr_c - c * sq) / (n - 2.0)
    tr_full = tr_c / (n - 1.0)
    tr_r = float(np.trace(cov_r))

    if n - 1 <= dim:
        g = d @ cov_r @ d.T  # (N, N) Gram matrix in the reference metric
        g = 0.5 * (g + g.T)
        sqrt_full = float(_sum_sqrt_eigs((g / (n - 1.0))[None])[0])
        # Y₋ᵢ rows (j ≠ i): x_j - μ₋ᵢ = d_j + d_i/(N-1)  ⇒  G⁽ⁱ⁾_jk = G_jk + (G_ji + G_ik)/(N-1) + G_ii/(N-1)²;
        # row/column i are zeroed (a zero eigenvalue adds nothing to the sum of square roots).
        sqrt_loo = np.empty(n)
        per = max(1, int(max_batch_bytes // (8 * n * n)))
        for start in range(0, n, per):
            idx = np.arange(start, min(n, start + per))
            gi = g[:, idx].T  # (b, N): G_{·i}
            stack = (g[None] + (gi[:, :, None] + gi[:, None, :]) / (n - 1.0)
                     + g[idx, idx][:, None, None] / (n - 1.0) ** 2)
            keep = np.ones((idx.size, n))
            keep[np.arange(idx.size), idx] = 0.0
            stack *= keep[:, :, None] * keep[:, None, :]
            sqrt_loo[idx] = _sum_sqrt_eigs(stack / (n - 2.0))
    else:
        s_r = reference.sqrt_cov()
        v = d @ s_r  # rows: Σ_r^{1/2} d_i (Σ_r^{1/2} symmetric)
        a = v.T @ v  # Σ_r^{1/2} C Σ_r^{1/2}
        sqrt_full = float(_sum_sqrt_eigs((a / (n - 1.0))[None])[0])
        sqrt_loo = np.empty(n)
        per = max(1, int(max_batch_bytes // (8 * dim * dim)))
        for start in range(0, n, per):
            vi = v[start : start + per]
            stack = (a[None] - c * vi[:, :, None] * vi[:, None, :]) / (n - 2.0)
            sqrt_loo[start : start + per] = _sum_sqrt_eigs(stack)

    fid_full = dist_full + tr_full + tr_r - 2.0 * sqrt_full
    fid_loo = dist_loo + tr_loo + tr_r - 2.0 * sqrt_loo
    return fid_loo - fid_full
