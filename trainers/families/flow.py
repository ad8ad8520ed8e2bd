"""What the flow-matching families (SD3, FLUX, Qwen-Image) share: the rectified-flow objective and sampler.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_σ = (1-σ)·x0 + σ·ε`` with σ from 1 (noise) to 0
(data); the transformer predicts the velocity ``v = ε - x0``; the Euler step is ``x_next = x + (σ_next - σ)·v``; the
denoiser's time input is ``t = σ·1000`` (the scheduler's ``timesteps``). Training σ is logit-normal (SD3's default
weighting) pushed through the family's shift: SD3's fixed ``shift`` or, for FLUX / Qwen-Image, ``exp(mu)`` of the
resolution-dependent dynamic shift, so training sees the noise levels sampling visits.
"""

from __future__ import annotations

from typing import Any

from trainers.families.base import ModelFamily, Schedule, dynamic_shift_mu

NUM_TRAIN_TIMESTEPS = 1000


class FlowMatchingFamily(ModelFamily):
    objective = "flow"
    sde_types = ("flow_sde", "dance_sde", "cps", "ode")
    logit_mean: float = 0.0
    logit_std: float = 1.0

    # ------------------------------------------------------------------ schedule
    def image_seq_len(self, size: int) -> int:
        """Image tokens of a ``size`` x ``size`` output (FLUX / Qwen-Image pack 2x2 latent patches)."""
        side = size // self.vae_scale_factor // 2
        return side * side

    def shift(self, size: int) -> float:
        import math

        cfg = self.pipe.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            return math.exp(dynamic_shift_mu(cfg, self.image_seq_len(size)))
        return float(cfg.get("shift", 1.0))

    def schedule(self, steps: int, size: int) -> Schedule:
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        if scheduler.config.get("use_dynamic_shifting", False):
            mu = dynamic_shift_mu(scheduler.config, self.image_seq_len(size))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=self.device)
        else:
            scheduler.set_timesteps(steps, device=self.device)
        return Schedule(timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone(), scheduler=scheduler)

    def step_mean_std(self, model_output, schedule: Schedule, i: int, x, eta: float, sde_type: str):
        from trainers.losses import flow_sde_mean_std

        sigma = float(schedule.sigmas[i])
        sigma_next = float(schedule.sigmas[i + 1])
        if eta <= 0:
            sde_type = "ode"
        # Flow-GRPO: at σ = 1 the Flow-SDE std uses the next-largest σ in its denominator
        sigma_max = float(schedule.sigmas[1]) if len(schedule.sigmas) > 1 else 0.9999
        return flow_sde_mean_std(model_output.float(), sigma, sigma_next, x.float(), eta, sde_type,
                                 sigma_max=min(sigma_max, 0.9999))

    # ------------------------------------------------------------------ training objective
    def draw_training_time(self, batch: int, generator: Any, size: int | None = None):
        from trainers.losses import flow_matching_sigmas

        size = size or getattr(self, "_train_size", 64)
        sigmas = flow_matching_sigmas(batch, generator, weighting="logit_normal", logit_mean=self.logit_mean,
                                      logit_std=self.logit_std, shift=self.shift(size))
        return sigmas * NUM_TRAIN_TIMESTEPS

    def training_sample(self, x0, generator, noise=None, t=None):
        import torch

        if noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        if t is None:
            t = self.draw_training_time(x0.shape[0], generator)
        t = torch.as_tensor(t, dtype=torch.float32).to(x0.device)
        sigma = (t / NUM_TRAIN_TIMESTEPS).view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1.0 - sigma) * x0 + sigma * noise
        return x_t, t, noise - x0

    # ------------------------------------------------------------------ packing (FLUX, Qwen-Image)
    @staticmethod
    def pack(latents):
        """``(B,C,H,W)`` -> ``(B, H/2·W/2, 4C)`` (2x2 patches), as FLUX / Qwen-Image pipelines pack."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(latents, side: int):
        """Inverse of :meth:`pack` for a square ``side`` x ``side`` latent (``side`` in latent pixels)."""
        b, n, d = latents.shape
        c = d // 4
        x = latents.view(b, side // 2, side // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, side, side)
