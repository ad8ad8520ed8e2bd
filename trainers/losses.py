"""Pure torch loss functions shared by the SFT, Diffusion-DPO and GRPO trainers.

Nothing here loads a model or touches the file system; every function is a formula on tensors, so each is unit
tested against hand-computed values (``tests/unit/test_losses.py``). torch is imported inside the functions only
so that importing this module stays cheap.

Notation: ``B`` is the batch, ``x`` a latent of shape ``(B, C, H, W)`` (any trailing shape works), ``ᾱ_t`` the
scheduler's ``alphas_cumprod[t]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _reduce_nonbatch(x: "torch.Tensor", reduce: str) -> "torch.Tensor":
    """Sum (or mean) over every dim but the first; a 1-D tensor is returned as is."""
    if x.ndim <= 1:
        return x
    dims = tuple(range(1, x.ndim))
    if reduce == "sum":
        return x.sum(dim=dims)
    if reduce == "mean":
        return x.mean(dim=dims)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ---------------------------------------------------------------------------------------------------------------
def diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float):
    """Diffusion-DPO loss (Wallace et al., 2023, eq. 14 with the ``T·ω(λ_t)`` constant folded into ``beta``).

    Each ``*_err_*`` is the per-sample noise-prediction error ``‖ε - ε_θ(x_t^{w|l}, t)‖²`` (mean over pixels),
    shape ``(B,)``, for the preferred (``w``) and dispreferred (``l``) image under the trained model and the
    frozen reference, computed with the *same* noise and timestep for ``w`` and ``l``::

        inside = -½·β·((m_w - m_l) - (r_w - r_l))
        loss   = mean_b( -log σ(inside) )
        implicit_acc = mean_b( 1[inside > 0] )            # the model moved towards w more than the reference
        margin       = mean_b( inside )

    When the model equals the reference, ``inside = 0`` and ``loss = log 2``.

    Returns ``(loss, implicit_acc, margin)``: a differentiable scalar and two detached scalars.
    """
    import torch.nn.functional as F

    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    implicit_acc = (inside > 0).float().mean().detach()
    margin = inside.mean().detach()
    return loss, implicit_acc, margin


# ---------------------------------------------------------------------------------------------------------------
# GRPO pieces
# ---------------------------------------------------------------------------------------------------------------
def group_advantages(rewards, group_ids, eps: float = 1e-6):
    """GRPO group-relative advantages: ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` with ``g = group_ids[i]``.

    ``std_g`` is the population standard deviation (``unbiased=False``) of the group's rewards, so a group of
    identical rewards gets advantages of exactly 0. ``rewards`` ``(N,)`` float, ``group_ids`` ``(N,)`` int (any
    labels; groups need not be contiguous). Returns ``(N,)``.
    """
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float32) if not torch.is_tensor(rewards) else rewards
    group_ids = torch.as_tensor(group_ids)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    r = rewards.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = (sq / count).sqrt()
    adv = (r - mean[inverse]) / (std[inverse] + eps)
    return adv.to(rewards.dtype)


def dar_weights(group_easiness, gamma: float = 2.0, w_min: float = 0.25, w_max: float = 4.0):
    """DyRef's Difficulty-Aware Reweighting (focal weight per group).

    ``p_g`` (``group_easiness``, shape ``(G,)``) is the group's mean raw similarity::

        w̃_g = clip((1 - p_g)^γ, w_min, w_max)
        w_g = w̃_g / mean_g(w̃_g)                          # renormalised to mean 1 over groups

    ``1 - p_g`` is clamped at 0 first (a similarity above 1 counts as fully easy). Note that the renormalisation
    can move a weight outside ``[w_min, w_max]``; the clip bounds the *ratio* between groups to ``w_max/w_min``.
    Returns ``(G,)`` weights; multiply each sample's policy loss by its group's weight.
    """
    import torch

    p = torch.as_tensor(group_easiness, dtype=torch.float32) if not torch.is_tensor(group_easiness) else group_easiness
    w = (1.0 - p.float()).clamp_min(0.0).pow(gamma).clamp(w_min, w_max)
    return w / w.mean()


def ppo_clipped_loss(logp_new, logp_old, advantages, clip_range: float, weights=None):
    """PPO clipped surrogate (as in DDPO / Flow-GRPO), averaged over samples.

    With ``ρ = exp(logp_new - logp_old)``::

        L_i = max( -A_i·ρ_i , -A_i·clip(ρ_i, 1-ε, 1+ε) )
        loss = mean_i( w_i · L_i )                       # w_i = 1 without weights (DAR passes per-sample w)

    Returns ``(loss, info)`` where ``info`` holds detached diagnostics: ``clip_frac`` (fraction with
    ``|ρ-1| > ε``), ``approx_kl`` (``½·mean((logp_new - logp_old)²)``) and ``ratio_mean``.
    """
    import torch

    log_ratio = logp_new - logp_old
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample.mean()
    info = {
        "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "approx_kl": (0.5 * log_ratio.pow(2).mean()).detach(),
        "ratio_mean": ratio.mean().detach(),
    }
    return loss, info


def gaussian_log_prob(x, mean, std, reduce: str = "sum"):
    """Log density of an isotropic Gaussian, summed over the non-batch dims::

        log N(x; μ, σ²) = Σ_d [ -(x_d - μ_d)² / (2σ²) - log σ - ½·log 2π ]

    ``std`` broadcasts against ``x`` (a scalar, or ``(B, 1, 1, 1)`` for a per-sample σ). ``reduce="mean"`` divides
    by the number of dims instead of summing (DDPO's convention; keeps ratios O(1) for large latents).
    Returns ``(B,)`` (or the elementwise density for a 1-D ``x``).
    """
    import torch

    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    log_p = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return _reduce_nonbatch(log_p, reduce)


def _gather_alpha(alphas_cumprod, t, ref):
    """``alphas_cumprod[t]`` for an int or ``(B,)`` tensor ``t``, broadcastable against ``ref`` ``(B, ...)``."""
    import torch

    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    a = alphas_cumprod[t]
    a = a.to(device=ref.device, dtype=ref.dtype)
    if a.ndim == 1:
        a = a.view(-1, *([1] * (ref.ndim - 1)))
    return a


def ddim_mean_std(scheduler, model_output, timestep, sample, eta: float):
    """Mean and std of the DDIM transition ``p(x_{t-1} | x_t)`` for ``eta ≥ 0`` (Song et al., eq. 12).

    With ``t' = t - T_train / n_steps`` (``ᾱ_{t'} = final_alpha_cumprod`` when ``t' < 0``), ε-prediction::

        x̂_0   = (x_t - √(1-ᾱ_t)·ε) / √ᾱ_t                  (clipped when the scheduler clips samples)
        σ_t   = η · √( (1-ᾱ_{t'})/(1-ᾱ_t) · (1 - ᾱ_t/ᾱ_{t'}) )
        μ     = √ᾱ_{t'}·x̂_0 + √(1-ᾱ_{t'}-σ_t²)·ε

    ``v_prediction`` and ``sample`` prediction types are converted to ``(x̂_0, ε)`` as diffusers does.
    ``timestep`` is an int (``std`` is then 0-d) or a ``(B,)`` tensor (``std`` shaped ``(B, 1, …)``).
    """
    import torch

    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(n) before stepping")
    cfg = scheduler.config
    t = torch.as_tensor(timestep, device=scheduler.alphas_cumprod.device).long()
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    acp = scheduler.alphas_cumprod
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=acp.dtype, device=acp.device)
    alpha_t = _gather_alpha(acp, t, sample)
    alpha_prev = torch.where(prev_t >= 0, acp[prev_t.clamp_min(0)], final)
    alpha_prev = alpha_prev.to(device=sample.device, dtype=sample.dtype)
    if alpha_prev.ndim == 1:
        alpha_prev = alpha_prev.view(-1, *([1] * (sample.ndim - 1)))
    beta_t = 1.0 - alpha_t

    if cfg.prediction_type == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        eps = model_output
    elif cfg.prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if getattr(cfg, "thresholding", False):
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    variance = (1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev)
    std = eta * variance.clamp_min(0.0).sqrt()
    mean = alpha_prev.sqrt() * x0 + (1.0 - alpha_prev - std**2).clamp_min(0.0).sqrt() * eps
    return mean, std


def ddim_step_with_log_prob(
    scheduler,
    model_output,
    timestep,
    sample,
    eta: float,
    prev_sample=None,
    generator=None,
    reduce: str = "sum",
    min_std: float = 1e-12,
):
    """One stochastic DDIM step that also returns the log-probability of the step (DDPO / Flow-GRPO style).

    ``x_{t-1} ~ N(μ, σ_t²·I)`` with ``(μ, σ_t)`` from :func:`ddim_mean_std`; when ``prev_sample`` is ``None`` it is
    sampled as ``μ + σ_t·z`` (``z ~ N(0, I)`` from ``generator``), otherwise the given ``prev_sample`` is scored
    (this is how the policy re-evaluates a recorded trajectory with gradients). ``log_prob`` is
    :func:`gaussian_log_prob` of the (detached) ``prev_sample`` under ``N(μ, σ_t²)``, shape ``(B,)``; it is a
    function of ``model_output`` so gradients flow to the model. With ``eta=0`` the step equals
    ``DDIMScheduler.step(...).prev_sample`` and the density is degenerate: σ is floored at ``min_std`` so the value
    stays finite, but such steps carry no policy gradient and trainers should not use them.

    Returns ``(prev_sample, log_prob)``.
    """
    import torch

    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = torch.randn(
            model_output.shape, generator=generator, device="cpu" if generator is None else generator.device,
            dtype=model_output.dtype,
        ).to(model_output.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach()
    std_safe = std.clamp_min(min_std) if torch.is_tensor(std) else max(float(std), min_std)
    log_prob = gaussian_log_prob(prev_sample, mean, std_safe, reduce=reduce)
    return prev_sample, log_prob


def kl_to_reference(mean_new, mean_ref, std, reduce: str = "sum"):
    """Per-sample KL between the policy's and the reference's step Gaussians with a shared σ::

        KL( N(μ_new, σ²I) ‖ N(μ_ref, σ²I) ) = Σ_d (μ_new,d - μ_ref,d)² / (2σ²)

    ``reduce="mean"`` averages over dims instead (matches :func:`gaussian_log_prob` with the same argument).
    Returns ``(B,)``.
    """
    import torch

    std = torch.as_tensor(std, dtype=mean_new.dtype, device=mean_new.device)
    kl = (mean_new - mean_ref) ** 2 / (2.0 * std**2)
    return _reduce_nonbatch(kl, reduce)


def noise_prediction_target(scheduler, latents, noise, timesteps) -> Any:
    """The regression target of the denoiser: ``ε`` for ε-prediction, ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0`` for v."""
    ptype = scheduler.config.prediction_type
    if ptype == "epsilon":
        return noise
    if ptype == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if ptype == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {ptype!r}")


def per_sample_mse(pred, target):
    """``mean over non-batch dims of (pred - target)²`` in float32, shape ``(B,)`` (Diffusion-DPO's errors)."""
    return _reduce_nonbatch((pred.float() - target.float()) ** 2, "mean")
