"""Pure torch loss functions shared by the SFT, Diffusion-DPO and GRPO trainers.

Nothing here loads a model or touches the file system; every function is a formula on tensors, so each is unit
tested against hand-computed values (``tests/unit/test_losses.py``). torch is imported inside the functions only
so that importing this module stays cheap.

Notation: ``B`` is the batch, ``x`` a latent of shape ``(B, C, H, W)`` (any trailing shape works), ``ᾱ_t`` the
scheduler's ``alphas_cumprod[t]``.

One module (over ~500 lines) on purpose: the design keeps every pure loss in one place, so each trainer imports formulas, never another trainer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from labelers.defaults import DRS_TAU as DYREF_DRS_TAU  # noqa: F401 - re-exported: DyRef's τ, with the DRS defaults

if TYPE_CHECKING:  # pragma: no cover
    import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# DyRef's Difficulty-Aware Reweighting settings (see :func:`dar_weights`), the one place they live: GRPOConfig and
# the profile schema take their defaults from here. ``dar_weights`` keeps its own, looser defaults; these are the
# values DyRef reports. (DyRef's DRS τ, ``DYREF_DRS_TAU``, is ``labelers.defaults.DRS_TAU``.)
DYREF_DAR_W_MIN = 0.5
DYREF_DAR_W_MAX = 5.0
DYREF_DAR_GAMMA = 2.0


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

    As DyRef runs it, ``p_g`` is first clipped to ``[0, 1]``: a similarity above 1 counts as fully easy (``p = 1``)
    and a negative one as fully hard (``p = 0``), so ``(1 - p_g)^γ ∈ [0, 1]`` for ``γ > 0`` (with ``w_max ≥ 1``,
    as in DyRef's ``[0.5, 5]``, the upper clip then never binds). Note that the renormalisation can move a weight
    outside ``[w_min, w_max]``; the clip bounds the *ratio* between groups to ``w_max/w_min``. DyRef's values are
    the module constants ``DYREF_DAR_W_MIN``, ``DYREF_DAR_W_MAX`` and ``DYREF_DAR_GAMMA``.
    Returns ``(G,)`` weights; multiply each sample's policy loss by its group's weight.
    """
    import torch

    p = torch.as_tensor(group_easiness, dtype=torch.float32) if not torch.is_tensor(group_easiness) else group_easiness
    p = p.float().clamp(0.0, 1.0)
    w = (1.0 - p).clamp_min(0.0).pow(gamma).clamp(w_min, w_max)
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


# ---------------------------------------------------------------------------------------------------------------
# Flow matching (rectified flow): SDE sampling with log-probabilities (Flow-GRPO / DanceGRPO / CPS) and training
# ---------------------------------------------------------------------------------------------------------------
# Convention (SD3 / FLUX / diffusers' FlowMatchEulerDiscreteScheduler): σ runs from 1 (pure noise) to 0 (data),
#     x_σ = (1 - σ)·x_0 + σ·ε,      velocity v = dx_σ/dσ = ε - x_0 (what the transformer predicts),
# and the deterministic Euler step from σ to σ_next < σ is x_next = x + (σ_next - σ)·v.

FLOW_SDE_TYPES = ("flow_sde", "dance_sde", "cps", "ode")


def _sigma_like(sigma, ref):
    """``sigma`` (float, 0-d or ``(B,)`` tensor) as float32 on ``ref``'s device, broadcastable against ``ref``."""
    import torch

    if torch.is_tensor(sigma):
        s = sigma.to(device=ref.device, dtype=torch.float32)
    else:
        s = torch.as_tensor(float(sigma), dtype=torch.float32, device=ref.device)
    if s.ndim == 1:
        s = s.view(-1, *([1] * (ref.ndim - 1)))
    elif s.ndim > 1:
        raise ValueError(f"sigma must be a float, a 0-d or a (B,) tensor, got shape {tuple(s.shape)}")
    return s


def flow_sde_mean_std(model_output, sigma, sigma_next, sample, eta: float, sde_type: str = "flow_sde",
                      sigma_max: float = 0.9999):
    """Mean and std of the Gaussian transition ``p(x_{σ_next} | x_σ)`` of a flow-matching sampler.

    ``model_output`` is the predicted velocity ``v`` and ``sample`` the current ``x = x_σ``, both ``(B, ...)``;
    ``sigma`` / ``sigma_next`` (``0 < σ ≤ 1``, ``σ_next < σ``) are floats or ``(B,)`` tensors. Everything is computed
    in float32. With ``dt = σ_next - σ < 0``:

    ``"flow_sde"`` (Flow-GRPO, Liu et al. 2025; the SDE with the ODE's marginals)::

        σ_t  = η·√( σ / (1 - min(σ, sigma_max)) )
        mean = x·(1 + σ_t²/(2σ)·dt) + v·(1 + σ_t²·(1-σ)/(2σ))·dt
        std  = σ_t·√(-dt)

      ``1 - σ`` vanishes at ``σ = 1``; Flow-GRPO substitutes the schedule's largest ``σ < 1`` (``sigmas[1]``) in
      the denominator there. Here the denominator is ``1 - min(σ, sigma_max)`` with ``sigma_max = 0.9999`` by
      default (finite but large noise at ``σ = 1``: ``σ_t = 100·η``); pass ``sigma_max=float(scheduler.sigmas[1])``
      to reproduce Flow-GRPO exactly (every other σ of a decreasing schedule is ``≤ sigmas[1]``, so only the
      ``σ = 1`` step is affected). The numerator and the mean always use the raw σ.

    ``"dance_sde"`` (DanceGRPO; Dance-SDE with ``σ_t = η`` constant)::

        x̂_0   = x - σ·v
        score = -(x - (1-σ)·x̂_0) / σ²
        mean  = x + dt·v + (-½·η²·score)·dt
        std   = η·√(-dt)

    ``"cps"`` (Coefficients-Preserving Sampling, Wang et al. 2025)::

        std  = σ_next·sin(η·π/2)
        x̂_0 = x - σ·v ,   x̂_1 = x + (1-σ)·v
        mean = (1-σ_next)·x̂_0 + √(σ_next² - std²)·x̂_1          (√ = σ_next·cos(η·π/2), clamped at 0)

    ``"ode"``: ``mean = x + dt·v`` (diffusers' Euler step), ``std = 0``.

    ``η = 0`` gives the ODE mean and ``std = 0`` for every type. Returns ``(mean, std)``: ``mean`` ``(B, ...)``
    float32 and ``std`` a float32 tensor broadcastable against it (0-d for float σ's, ``(B, 1, …)`` for
    ``(B,)`` σ's).
    """
    import torch

    v = model_output.float()
    x = sample.float()
    s = _sigma_like(sigma, x)
    s_next = _sigma_like(sigma_next, x)
    dt = s_next - s
    neg_dt = (-dt).clamp_min(0.0)

    if sde_type == "flow_sde":
        std_t = eta * torch.sqrt(s / (1.0 - s.clamp_max(sigma_max)))
        mean = x * (1.0 + std_t**2 / (2.0 * s) * dt) + v * (1.0 + std_t**2 * (1.0 - s) / (2.0 * s)) * dt
        std = std_t * torch.sqrt(neg_dt)
    elif sde_type == "dance_sde":
        x0_hat = x - s * v
        score = -(x - x0_hat * (1.0 - s)) / s**2
        mean = x + dt * v + (-0.5 * eta**2 * score) * dt
        std = eta * torch.sqrt(neg_dt)
    elif sde_type == "cps":
        std = s_next * math.sin(eta * math.pi / 2.0)
        x0_hat = x - s * v
        x1_hat = x + (1.0 - s) * v
        mean = x0_hat * (1.0 - s_next) + x1_hat * torch.sqrt((s_next**2 - std**2).clamp_min(0.0))
    elif sde_type == "ode":
        mean = x + dt * v
        std = torch.zeros_like(s)
    else:
        raise ValueError(f"sde_type must be one of {FLOW_SDE_TYPES}, got {sde_type!r}")
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    return mean, std


def flow_sde_step_with_log_prob(
    model_output,
    sigma,
    sigma_next,
    sample,
    eta: float,
    sde_type: str = "flow_sde",
    prev_sample=None,
    generator=None,
    reduce: str = "mean",
    min_std: float = 1e-12,
    sigma_max: float = 0.9999,
):
    """One stochastic flow-matching step ``x_σ → x_{σ_next}`` and its log-probability (Flow-GRPO style).

    ``x_{σ_next} ~ N(mean, std²·I)`` with ``(mean, std)`` from :func:`flow_sde_mean_std`. When ``prev_sample`` is
    ``None`` it is sampled as ``mean + std·z`` with ``z = torch.randn(shape, generator=generator)`` drawn on the
    generator's device (CPU without one) and moved to the sample's device; otherwise the given ``prev_sample`` is
    scored (the policy re-evaluating a recorded trajectory). ``log_prob`` is :func:`gaussian_log_prob` of the
    detached ``prev_sample`` — the true Gaussian log-density with its constants, for every ``sde_type`` (Flow-GRPO's
    CPS branch drops the constants; they cancel in PPO ratios only when σ is unchanged, so they are kept here) —
    reduced over the non-batch dims with ``reduce`` (``"mean"``, Flow-GRPO's convention, or ``"sum"``). It is a
    function of ``model_output`` so gradients flow to the model. Where ``std = 0`` (``"ode"``, ``η = 0``, or
    ``"cps"`` at ``σ_next = 0``) the density is degenerate: std is floored at ``min_std`` so the value stays finite,
    but such steps carry no useful policy gradient and trainers should not use them.

    Returns ``(prev_sample, log_prob)``: float32 ``(B, ...)`` and ``(B,)``.
    """
    import torch

    mean, std = flow_sde_mean_std(model_output, sigma, sigma_next, sample, eta, sde_type, sigma_max=sigma_max)
    if prev_sample is None:
        noise = torch.randn(
            mean.shape, generator=generator, device="cpu" if generator is None else generator.device,
            dtype=torch.float32,
        ).to(mean.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    log_prob = gaussian_log_prob(prev_sample, mean, std.clamp_min(min_std), reduce=reduce)
    return prev_sample, log_prob


def flow_matching_time_shift(sigma, shift: float):
    """SD3's resolution-dependent time shift ``σ' = shift·σ / (1 + (shift - 1)·σ)`` (identity for ``shift = 1``;
    ``shift > 1`` moves mass towards noise). Monotone, maps ``[0, 1]`` onto itself."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_matching_sigmas(batch: int, generator=None, weighting: str = "logit_normal", logit_mean: float = 0.0,
                         logit_std: float = 1.0, shift: float = 1.0, device=None):
    """Training noise levels ``σ`` for flow matching, shape ``(B,)`` float32, strictly inside ``(0, 1)``.

    ``weighting="uniform"``: ``u ~ U[0, 1)``; ``"logit_normal"`` (SD3, Esser et al. 2024): ``u = sigmoid(n)``,
    ``n ~ N(logit_mean, logit_std²)``. Then ``σ = flow_matching_time_shift(u, shift)``. Draws come from
    ``generator`` on its device (CPU without one) and are moved to ``device`` (default: that same device). The
    arithmetic is done in float64 and the result clamped to ``[1e-6, 1 - 1e-6]`` so that neither endpoint can occur
    after rounding to float32 (``U[0,1)`` can return 0; a sigmoid of a large normal rounds to 1).
    """
    import torch

    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    gen_device = "cpu" if generator is None else generator.device
    if weighting == "uniform":
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float32).double()
    elif weighting == "logit_normal":
        n = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float32).double()
        u = torch.sigmoid(logit_mean + logit_std * n)
    else:
        raise ValueError(f"weighting must be 'uniform' or 'logit_normal', got {weighting!r}")
    sig = flow_matching_time_shift(u, float(shift)).clamp(1e-6, 1.0 - 1e-6).float()
    return sig.to(device) if device is not None else sig


def flow_matching_target(x0, noise):
    """The flow-matching regression target, the velocity ``v = ε - x_0``."""
    return noise - x0


def flow_matching_noisy(x0, noise, sigma):
    """``x_σ = (1 - σ)·x_0 + σ·ε`` with ``σ`` a float or ``(B,)`` tensor (cast to ``x0``'s dtype, broadcast)."""
    import torch

    if torch.is_tensor(sigma):
        s = sigma.to(device=x0.device, dtype=x0.dtype)
        if s.ndim == 1:
            s = s.view(-1, *([1] * (x0.ndim - 1)))
    else:
        s = float(sigma)
    return (1.0 - s) * x0 + s * noise


# ---------------------------------------------------------------------------------------------------------------
# Multi-reward advantages and velocity-space KL
# ---------------------------------------------------------------------------------------------------------------
def gdpo_advantages(rewards, group_ids, weights=None, eps: float = 1e-6, batch_normalize: bool = True):
    """GDPO (group reward-decoupled normalisation) advantages for several rewards.

    ``rewards`` maps a name to an ``(N,)`` tensor. Each reward is normalised within its group on its own
    (:func:`group_advantages`), the results are combined, then standardised over the whole batch::

        A_k = group_advantages(r_k, group_ids, eps)
        a   = Σ_k w_k·A_k                                   (w_k = weights[k], default 1)
        A   = (a - mean(a)) / (std(a) + eps)                (population std; only if batch_normalize)

    Unlike :func:`group_advantages` of the summed reward, a reward with a large scale or spread cannot drown the
    others, and two samples that each win on one reward get equal advantages. A key in ``weights`` that is not a
    reward raises ``KeyError`` (catches typos). Returns ``(N,)`` float32.
    """
    import torch

    if not rewards:
        raise ValueError("gdpo_advantages needs at least one reward")
    weights = dict(weights or {})
    unknown = set(weights) - set(rewards)
    if unknown:
        raise KeyError(f"weights for unknown rewards: {sorted(unknown)}")
    combined = None
    for name, r in rewards.items():
        r = torch.as_tensor(r, dtype=torch.float32) if not torch.is_tensor(r) else r.float()
        a = group_advantages(r, group_ids, eps=eps).to(torch.float64) * float(weights.get(name, 1.0))
        combined = a if combined is None else combined + a
    if batch_normalize:
        combined = (combined - combined.mean()) / (combined.std(unbiased=False) + eps)
    return combined.float()


def kl_velocity(v_new, v_ref, reduce: str = "mean"):
    """KL to the reference in velocity space, as Flow-GRPO logs it: ``‖v_θ - v_ref‖²`` per sample, averaged
    (``reduce="mean"``) or summed over the non-batch dims, in float32. Returns ``(B,)``.

    For ``flow_sde`` steps with a shared σ this is proportional to :func:`kl_to_reference` of the step means (the
    means differ by a σ-dependent multiple of the velocities); :func:`kl_to_reference` stays the latent-space KL.
    """
    return _reduce_nonbatch((v_new.float() - v_ref.float()) ** 2, reduce)


# ============================================================================================ AR GRPO (token policies)
def categorical_entropy(logits):
    """Entropy ``H = -Σ_v p_v log p_v`` (nats) of the categorical ``softmax(logits)`` over the last dim; shape
    ``logits.shape[:-1]``. Differentiable (AR GRPO's entropy bonus)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def categorical_kl(logits, ref_logits):
    """Exact ``KL(π ‖ π_ref) = Σ_v π_v (log π_v - log π_ref,v)`` between ``softmax(logits)`` and
    ``softmax(ref_logits)`` over the last dim (the whole vocabulary, no sampled estimator); shape
    ``logits.shape[:-1]``, ≥ 0."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def entropy_coef_update(log_coef: float, entropy: float, target: float, lr: float,
                        coef_min: float = 0.0, coef_max: float = 1.0) -> float:
    """One step of the adaptive entropy regulariser (SAC's automatic temperature, on the token entropy)::

        log α' = log α + lr · (H_target - H)        then α' clipped to [coef_min, coef_max]

    i.e. gradient descent on ``-log α · (H - H_target)``: the bonus ``α·H`` grows while the policy's entropy is
    below its target and shrinks above it. Returns the new ``log α`` (pure; floats)."""
    new = float(log_coef) + float(lr) * (float(target) - float(entropy))
    lo = math.log(coef_min) if coef_min > 0 else -math.inf
    hi = math.log(coef_max) if coef_max > 0 else -math.inf
    return min(max(new, lo), hi)


def mean_pairwise_distance(features) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of ``features`` (N, D); 0 for N < 2. The per-step
    diversity figure of AR GRPO (on L2-normalised CLIP features: ``sqrt(2 - 2 cos)``)."""
    import numpy as np

    x = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return 0.0
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    iu = np.triu_indices(n, k=1)
    return float(np.sqrt(d2[iu]).mean())


def standardize(values, eps: float = 1e-8):
    """``(x - mean) / (std + eps)`` over a 1-D array (population std); all-equal values give zeros. How AR GRPO puts
    reward components of different units on one scale before weighting them."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    return (x - x.mean()) / (x.std() + eps)
