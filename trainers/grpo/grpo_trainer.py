"""Online GRPO for a diffusion policy (DDPO / Flow-GRPO style) with DyRef's DRS and DAR and RPO's model selection.

Each step:

1. pick ``prompts_per_step`` train prompts from the pool; sample ``group_size`` trajectories per prompt with the
   stochastic DDIM step (:func:`trainers.losses.ddim_step_with_log_prob`, ``eta > 0``), recording every latent and
   the log-probability of every transition under the current policy;
2. decode and score with :class:`labelers.clip_scorer.ClipScorer`: CLIP_T and per-reference CLIP_I; per-reference
   sims are DRS-sharpened (``use_drs``, using ``n_refs``) then averaged; reward = λ-Harmonic(CLIP_I, CLIP_T, λ_task)
   (t2i: no references, reward = CLIP_T);
3. advantages = group-normalised rewards; DAR weight per group from its easiness ``p_g`` = the group's mean *raw*
   similarity (mean un-sharpened per-reference CLIP_I; CLIP_T for prompts without references);
4. PPO clipped loss over the recorded timesteps (re-evaluating each recorded transition's log-prob with gradients),
   weighted per sample by DAR, plus ``kl_coef`` × KL between the policy's and the reference's step Gaussians
   (reference = the UNet with the LoRA off, or the frozen ``init_adapter`` when RL starts from SFT);
5. every ``heldout_every`` steps (and at the end): deterministic DDIM images for held-out pool prompts, mean
   un-sharpened λ-Harmonic; the best adapter so far is kept in ``best_adapter/`` (RPO's model selection).

The policy is conditioned on text only (a ``StableDiffusionPipeline``); references enter through the reward.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from trainers.grpo.grpo_config import GRPOConfig

RewardFn = Callable[[list, list[dict[str, Any]]], dict[str, list[float]]]


# --------------------------------------------------------------------------------------------- rewards
def sample_rewards(clip_t: float, per_ref: Sequence[float], task: str, cfg: GRPOConfig) -> dict[str, float]:
    """Reward pieces for one image (pure; ``labelers.rewards`` does the arithmetic).

    Returns ``reward`` (the training reward: λ-Harmonic of the DRS-sharpened CLIP_I when ``use_drs``),
    ``lambda_harmonic`` (un-sharpened: the model-selection metric), ``raw_sim`` (the DAR easiness input),
    ``clip_t`` and ``clip_i`` (raw mean, NaN without references).
    """
    import numpy as np

    from labelers.rewards import drs_sharpen, lambda_harmonic

    lam = float(cfg.lambdas.get(task, cfg.default_lambda))
    sims = [float(s) for s in per_ref]
    if sims:
        clip_i_raw = float(np.mean(sims))
        if cfg.use_drs:
            sharp = np.atleast_1d(drs_sharpen(sims, len(sims), k0=cfg.drs_k0, k1=cfg.drs_k1, tau=cfg.drs_tau))
            clip_i_reward = float(np.mean(sharp))
        else:
            clip_i_reward = clip_i_raw
        reward = float(lambda_harmonic(clip_i_reward, clip_t, lam))
        lh = float(lambda_harmonic(clip_i_raw, clip_t, lam))
        raw_sim = clip_i_raw
    else:
        clip_i_raw = math.nan
        reward = lh = float(lambda_harmonic(None, clip_t, lam))
        raw_sim = float(clip_t)
    return {"reward": reward, "lambda_harmonic": lh, "raw_sim": raw_sim, "clip_t": float(clip_t), "clip_i": clip_i_raw}


class ClipReward:
    """The default reward: :class:`labelers.clip_scorer.ClipScorer` + :func:`sample_rewards`."""

    def __init__(self, cfg: GRPOConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.scorer = None
        self._ref_cache: dict[str, Any] = {}

    def setup(self) -> ClipReward:
        from labelers.clip_scorer import ClipScorer

        from trainers.common import resolve_model_path

        self.scorer = ClipScorer(resolve_model_path(self.cfg.clip_model), backend=self.cfg.clip_backend,
                                 device=self.device, batch_size=self.cfg.clip_batch_size).setup()
        return self

    def _references(self, row: dict[str, Any]) -> list:
        from PIL import Image

        out = []
        for path in row.get("reference_images") or []:
            if path not in self._ref_cache:
                with Image.open(path) as im:
                    self._ref_cache[path] = im.convert("RGB")
            out.append(self._ref_cache[path])
        return out

    def __call__(self, images: list, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
        if self.scorer is None:
            self.setup()
        scores = self.scorer.score(images, [r["text"] for r in rows], [self._references(r) for r in rows])
        per = [sample_rewards(s.clip_t, list(s.clip_i_per_ref or []), r.get("task", "t2i"), self.cfg)
               for s, r in zip(scores, rows)]
        return {k: [p[k] for p in per] for k in per[0]} if per else {}


# --------------------------------------------------------------------------------------------- sampling
def _predict(unet, x, t, emb, uncond, guidance: float):
    """Noise prediction, with classifier-free guidance when ``guidance > 1``."""
    import torch

    if guidance > 1.0 and uncond is not None:
        out = unet(torch.cat([x, x]), t, torch.cat([uncond.expand_as(emb), emb])).sample
        u, c = out.chunk(2)
        return u + guidance * (c - u)
    return unet(x, t, emb).sample


def sample_trajectories(unet, scheduler, emb, uncond, x_T, cfg: GRPOConfig, generator, eta: float):
    """Run the stochastic DDIM sampler.

    Returns ``(latents (K+1, B, ...), log_probs (K, B), timesteps (K,), stds (list of K floats))``.
    """
    import torch

    from trainers.losses import ddim_mean_std, ddim_step_with_log_prob

    latents, logps, stds = [x_T], [], []
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = _predict(unet, scheduler.scale_model_input(x, t), t, emb, uncond, cfg.guidance_scale)
            _, std = ddim_mean_std(scheduler, out, t, x, eta)
            x, lp = ddim_step_with_log_prob(scheduler, out, t, x, eta, generator=generator,
                                            reduce=cfg.log_prob_reduce)
            latents.append(x)
            logps.append(lp)
            stds.append(float(std))
    return torch.stack(latents), torch.stack(logps), scheduler.timesteps.clone(), stds


# --------------------------------------------------------------------------------------------- training
def train(config: GRPOConfig | dict | str, reward_fn: RewardFn | None = None) -> dict[str, Any]:
    """Train, checkpoint, and write ``adapter/``, ``best_adapter/``, ``metrics.jsonl``, ``result.json``.

    ``reward_fn(images, rows) -> {"reward", "lambda_harmonic", "raw_sim", ...: list[float]}`` replaces the CLIP
    reward (tests, or other reward models).
    """
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    from trainers import common
    from trainers.data import load_prompt_pool
    from trainers.losses import (
        dar_weights,
        ddim_mean_std,
        gaussian_log_prob,
        group_advantages,
        kl_to_reference,
        ppo_clipped_loss,
    )

    cfg = common.coerce_config(GRPOConfig, config)
    if not cfg.prompt_pool:
        raise ValueError("GRPOConfig.prompt_pool is required")
    if cfg.eta <= 0:
        raise ValueError("GRPO needs a stochastic sampler: eta > 0")
    pool = load_prompt_pool(cfg.prompt_pool)
    if cfg.tasks:
        pool = [r for r in pool if r.get("task") in set(cfg.tasks)]
    train_rows = [r for r in pool if r.get("split", "train") == "train"]
    heldout_rows = [r for r in pool if r.get("split") == "heldout"][: cfg.heldout_prompts]
    if not train_rows:
        raise ValueError(f"no train prompts in {cfg.prompt_pool} (tasks={cfg.tasks})")

    s = common.prepare_training(cfg)
    acc, pipe, unet, opt = s.accelerator, s.pipe, s.unet, s.optimizer
    base = common.unwrap(s)
    device = acc.device
    if reward_fn is None:
        reward_fn = ClipReward(cfg, device=str(device)).setup()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.sample_steps, device=device)
    latent_hw = cfg.resolution // pipe.vae_scale_factor
    latent_shape = (base.config.in_channels, latent_hw, latent_hw)
    uncond = common.encode_prompts(pipe, [""], device) if cfg.guidance_scale > 1.0 else None
    best = {"score": s.extra.get("best_heldout"), "step": s.extra.get("best_step")}
    if not heldout_rows:
        s.logger.info("prompt pool has no heldout prompts: model selection is off, best_adapter = final adapter")

    def generate_images(rows: list[dict], seed_gen, eta: float):
        emb = common.encode_prompts(pipe, [r["text"] for r in rows], device)
        x_T = torch.randn((len(rows), *latent_shape), generator=seed_gen).to(device)
        traj, logps, ts, stds = sample_trajectories(unet, scheduler, emb, uncond, x_T, cfg, seed_gen, eta)
        with torch.no_grad():
            images = common.tensor_to_pil(common.latents_to_images(pipe.vae, traj[-1]))
        return emb, traj, logps, ts, stds, images

    def heldout_score() -> dict[str, float]:
        rows = [r for r in heldout_rows for _ in range(cfg.heldout_images_per_prompt)]
        unet.eval()
        *_, images = generate_images(rows, common.step_generator(cfg.heldout_seed, 0, salt=7), eta=0.0)
        unet.train()
        r = reward_fn(images, rows)
        return {"heldout_lambda_harmonic": float(np.mean(r["lambda_harmonic"])),
                "heldout_reward": float(np.mean(r["reward"]))}

    step = s.start_step
    last: dict[str, Any] = {}
    unet.train()
    while step < cfg.num_steps:
        t0 = time.perf_counter()
        lr = common.apply_lr(opt, cfg, step)
        gen = common.step_generator(cfg.seed, step, salt=acc.process_index)
        rng = random.Random(f"{cfg.seed}:{step}:{acc.process_index}")
        n_prompts = cfg.prompts_per_step
        chosen = (rng.sample(train_rows, n_prompts) if len(train_rows) >= n_prompts
                  else [rng.choice(train_rows) for _ in range(n_prompts)])
        rows = [r for r in chosen for _ in range(cfg.group_size)]
        group_ids = torch.arange(n_prompts).repeat_interleave(cfg.group_size)

        # 1. sample with the current policy (eval mode, no grad), recording the trajectory
        unet.eval()
        emb, traj, logp_old, timesteps, stds, images = generate_images(rows, gen, cfg.eta)
        unet.train()
        t_sample = time.perf_counter()

        # 2-3. rewards, advantages, DAR
        r = reward_fn(images, rows)
        rewards = torch.tensor(r["reward"], dtype=torch.float32)
        adv = group_advantages(rewards, group_ids).clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        raw = torch.tensor(r["raw_sim"], dtype=torch.float32)
        easiness = torch.zeros(n_prompts).index_add_(0, group_ids, raw) / cfg.group_size
        dar = dar_weights(easiness, cfg.dar_gamma, cfg.dar_w_min, cfg.dar_w_max) if cfg.use_dar \
            else torch.ones(n_prompts)
        sample_w = dar[group_ids].to(device)
        t_reward = time.perf_counter()

        # 4. policy update over the recorded transitions
        trainable = [j for j, sd in enumerate(stds) if sd > 1e-8]
        n_train_t = max(1, round(len(trainable) * cfg.train_timestep_fraction))
        B = len(rows)
        stats = {"ppo_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}
        n_terms = 0
        grad_norm = None
        for _epoch in range(cfg.num_inner_epochs):
            perm = torch.randperm(len(trainable), generator=gen)[:n_train_t].tolist()
            for j in sorted(trainable[k] for k in perm):
                t = timesteps[j]
                for c0 in range(0, B, cfg.train_micro_batch):
                    sl = slice(c0, min(B, c0 + cfg.train_micro_batch))
                    x_t, x_prev = traj[j][sl], traj[j + 1][sl]
                    with acc.autocast():
                        out = _predict(unet, scheduler.scale_model_input(x_t, t), t, emb[sl], uncond,
                                       cfg.guidance_scale)
                    mean, std = ddim_mean_std(scheduler, out.float(), t, x_t, cfg.eta)
                    logp = gaussian_log_prob(x_prev, mean, std, reduce=cfg.log_prob_reduce)
                    ppo, info = ppo_clipped_loss(logp, logp_old[j][sl], adv[sl], cfg.clip_range,
                                                 weights=sample_w[sl])
                    loss = ppo
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), common.reference_mode(base), acc.autocast():
                            out_ref = _predict(unet, scheduler.scale_model_input(x_t, t), t, emb[sl], uncond,
                                               cfg.guidance_scale)
                        mean_ref, _ = ddim_mean_std(scheduler, out_ref.float(), t, x_t, cfg.eta)
                        kl = kl_to_reference(mean, mean_ref, std, reduce=cfg.log_prob_reduce).mean()
                        loss = loss + cfg.kl_coef * kl
                        stats["kl"] += kl.item()
                    frac = (sl.stop - sl.start) / B
                    acc.backward(loss * frac / n_train_t)
                    stats["ppo_loss"] += ppo.item()
                    for key in ("clip_frac", "approx_kl", "ratio_mean"):
                        stats[key] += info[key].item()
                    n_terms += 1
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(s.params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        stats = {k: v / max(1, n_terms) for k, v in stats.items()}
        t_train = time.perf_counter()

        clip_i = [v for v in r.get("clip_i", []) if isinstance(v, float) and math.isfinite(v)]
        metrics: dict[str, Any] = {
            "loss": stats["ppo_loss"] + cfg.kl_coef * stats["kl"],
            **stats,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "lambda_harmonic_mean": float(np.mean(r["lambda_harmonic"])),
            "raw_sim_mean": float(raw.mean()),
            "clip_t_mean": float(np.mean(r["clip_t"])) if r.get("clip_t") else None,
            "adv_std": float(adv.std(unbiased=False)),
            "adv_abs_mean": float(adv.abs().mean()),
            "dar_weights": [round(float(w), 6) for w in dar],
            "group_easiness": [round(float(p), 6) for p in easiness],
            "dar_w_min": float(dar.min()),
            "dar_w_max": float(dar.max()),
            "lr": lr,
            "trained_timesteps": n_train_t,
            "prompt_ids": [str(c.get("prompt_id")) for c in chosen],
            "sample_time": t_sample - t0,
            "reward_time": t_reward - t_sample,
            "train_time": t_train - t_reward,
        }
        if clip_i:
            metrics["clip_i_mean"] = float(np.mean(clip_i))
        if metrics["clip_t_mean"] is None:
            metrics.pop("clip_t_mean")
        if grad_norm is not None:
            metrics["grad_norm"] = common.to_float(grad_norm)

        # 5. held-out model selection
        if heldout_rows and acc.is_main_process and (
            step == cfg.num_steps or (cfg.heldout_every > 0 and step % cfg.heldout_every == 0)
        ):
            h = heldout_score()
            metrics.update(h)
            if best["score"] is None or h["heldout_lambda_harmonic"] > best["score"]:
                best = {"score": h["heldout_lambda_harmonic"], "step": step}
                common.save_lora(base, s.output_dir / "best_adapter")
            metrics["best_heldout_lambda_harmonic"] = best["score"]
            metrics["best_step"] = best["step"]
        metrics["step_time"] = time.perf_counter() - t0
        last = s.logger.log(step, metrics)
        if acc.is_main_process and s.checkpoints.due(step, cfg.num_steps):
            s.checkpoints.save(step, base, opt, cfg, {"best_heldout": best["score"], "best_step": best["step"]})

    unet.eval()
    if acc.is_main_process and not heldout_rows:
        common.save_lora(base, s.output_dir / "best_adapter")
        best = {"score": None, "step": step}
    last = last or (s.logger.history[-1] if s.logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time") and not isinstance(v, list)}
    extra = {
        "best_adapter_path": str(s.output_dir / "best_adapter"),
        "best_heldout_lambda_harmonic": best["score"],
        "best_step": best["step"],
    }
    return common.finish_training(s, step, final, extra)
