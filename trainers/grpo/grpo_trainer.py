"""Online GRPO for any model family (DDPO / Flow-GRPO / DanceGRPO style) with DyRef's DRS, DAR and GDPO, and RPO's
model selection.

Each step:

1. pick ``prompts_per_step`` train prompts from the pool; sample ``group_size`` trajectories per prompt with the
   family's stochastic sampler (:mod:`trainers.families`): DDIM-η for the UNet families; Flow-SDE
   (σ_t = η·√(σ/(1-σ)), Flow-GRPO), Dance-SDE (σ_t = η, DanceGRPO) or CPS for flow matching — optionally only
   inside a window of ``sde_window_size`` steps with ODE steps elsewhere (MixGRPO / TempFlow-GRPO) — recording every
   latent and the exact log-probability of every stochastic transition. The policy is conditioned on the prompt's
   text *and* its source / reference images (as DyRef's is), with classifier-free guidance when
   ``guidance_scale > 1``, under the training autocast;
2. decode and score with :class:`labelers.clip_scorer.ClipScorer`: CLIP_T and per-reference CLIP_I; per-reference
   sims are DRS-sharpened (``use_drs``, using ``n_refs``) then averaged; reward = λ-Harmonic(CLIP_I, CLIP_T, λ_task)
   (t2i: no references, reward = CLIP_T);
3. advantages: group-normalised aggregate reward (``advantage: grpo``) or GDPO (``advantage: gdpo``: each reward
   in ``gdpo_rewards`` normalised within its group, then combined and batch-standardised); DAR weight per group
   from its easiness ``p_g`` (clipped to [0, 1]) = the group's mean *raw* similarity;
4. PPO clipped loss over the recorded stochastic transitions (re-evaluating each one's log-prob with gradients,
   with the same guidance as sampling), weighted per sample by DAR, plus ``kl_coef`` × KL to the reference in latent
   space (between the step Gaussians) or velocity space (``kl_type``); reference = the denoiser with the LoRA off,
   or the frozen ``init_adapter`` when RL starts from SFT (DyRef's two stages);
5. every ``heldout_every`` steps (and at the end): deterministic (ODE / DDIM) images for held-out pool prompts, mean
   un-sharpened λ-Harmonic; the best adapter so far is kept in ``best_adapter/`` (RPO's model selection).
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
        clip_i_raw = clip_i_reward = math.nan
        reward = lh = float(lambda_harmonic(None, clip_t, lam))
        raw_sim = float(clip_t)
    return {"reward": reward, "lambda_harmonic": lh, "raw_sim": raw_sim, "clip_t": float(clip_t), "clip_i": clip_i_raw,
            "clip_i_reward": clip_i_reward}


class ClipReward:
    """The default reward: :class:`labelers.clip_scorer.ClipScorer` + :func:`sample_rewards`."""

    def __init__(self, cfg: GRPOConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.scorer = None
        self._ref_cache: dict[str, Any] = {}

    def setup(self) -> ClipReward:
        from labelers.clip_scorer import ClipScorer

        from pipelines.zoo import resolve_model

        self.scorer = ClipScorer(resolve_model(self.cfg.clip_model), backend=self.cfg.clip_backend,
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


class VerifierReward(ClipReward):
    """``reward``: the share of the prompt's facts that the proving ground's verifier finds true in the image
    (:mod:`labelers.verifier`); the CLIP pieces (``lambda_harmonic``, ``clip_t``, ...) are computed as
    :class:`ClipReward` does, so held-out selection and the logged curves mean the same as with the CLIP reward.
    ``raw_sim``, DAR's easiness input, is the verifier's share too: DyRef weights a group by how hard its prompt is
    under the reward being optimised, and CLIP's similarity says nothing about that here (it orders the
    generator's candidates at chance). CLIP's own raw similarity stays in ``clip_raw_sim``."""

    @staticmethod
    def check_rows(rows: list[dict[str, Any]]) -> None:
        """Refuse, before any model loads, prompts the verifier cannot read (it checks only the proving world's
        grammar): a pool of other prompts would otherwise fail at its first reward, minutes into the run. Every
        unreadable prompt is counted and the first few are named with the reason."""
        from labelers.verifier import PromptParseError, parse_prompt

        bad = []
        for row in rows:
            try:
                parse_prompt(str(row.get("task", "t2i")), str(row.get("text", "")),
                             len(row.get("reference_images") or []))
            except PromptParseError as exc:
                bad.append(f"{row.get('prompt_id', '?')} ({exc})")
        if bad:
            shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            raise ValueError(f"reward 'verifier' checks only the proving world's prompts, and {len(bad)} of "
                             f"{len(rows)} prompts in the pool are not in its grammar: {shown}")

    def __call__(self, images: list, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
        from PIL import Image

        from labelers.judge import JudgeItem
        from labelers.verifier import verify

        out = super().__call__(images, rows)
        shares = []
        for image, row in zip(images, rows):
            source = None
            if row.get("source_image"):
                with Image.open(row["source_image"]) as im:
                    source = im.convert("RGB")
            item = JudgeItem(key="", task=str(row.get("task", "t2i")), text=row["text"], image=image,
                             source_image=source, reference_images=self._references(row))
            shares.append(verify(item).fact_share)
        out["reward"] = shares
        out["verifier_facts"] = list(shares)
        if "raw_sim" in out:
            out["clip_raw_sim"] = out["raw_sim"]
        out["raw_sim"] = list(shares)
        return out


REWARDS = {"clip": ClipReward, "verifier": VerifierReward}


# --------------------------------------------------------------------------------------------- sampling
def sde_window(cfg: GRPOConfig, step: int) -> list[int] | None:
    """The sampler steps that are stochastic (and trained) at optimizer step ``step``: all of them, or a window of
    ``sde_window_size`` consecutive steps whose start is drawn per step (MixGRPO / TempFlow-GRPO: SDE inside the
    window, ODE elsewhere, so only 1-2 denoiser passes per trajectory need gradients)."""
    size = int(cfg.sde_window_size or 0)
    if size <= 0 or size >= cfg.sample_steps:
        return None
    lo, hi = cfg.sde_window_range if cfg.sde_window_range else (0, cfg.sample_steps - size)
    hi = min(int(hi), cfg.sample_steps - size)
    start = random.Random(f"{cfg.seed}:window:{step}").randint(int(lo), max(int(lo), hi))
    return list(range(start, start + size))


def transition_log_prob(family, schedule, j: int, x_t, x_next, cond, uncond, guidance: float, eta: float,
                        sde_type: str, reduce: str = "mean"):
    """Log-probability (with gradients) of the recorded transition ``x_t -> x_next`` at sampler step ``j`` under
    the current policy, with the same guidance as sampling: ``(log_prob (B,), prediction, mean, std)``."""
    from trainers.losses import gaussian_log_prob

    pred = family.guided_predict(x_t, schedule.timesteps[j], cond, uncond, guidance)
    mean, std = family.step_mean_std(pred, schedule, j, x_t, eta, sde_type)
    std_safe = std.clamp_min(1e-12) if hasattr(std, "clamp_min") else max(float(std), 1e-12)
    return gaussian_log_prob(x_next.float(), mean, std_safe, reduce=reduce), pred, mean, std


def combined_advantages(r: dict[str, list[float]], group_ids, cfg: GRPOConfig):
    """GRPO: the aggregate reward normalised within its group. GDPO: each reward in ``gdpo_rewards`` normalised
    within its group first (a missing value, e.g. CLIP_I of a prompt without references, counts as the group's
    mean), then combined with ``gdpo_weights`` and standardised over the batch."""
    import torch

    from trainers.losses import gdpo_advantages, group_advantages

    if cfg.advantage == "grpo":
        return group_advantages(torch.tensor(r["reward"], dtype=torch.float32), group_ids)
    if cfg.advantage != "gdpo":
        raise ValueError(f"advantage must be 'grpo' or 'gdpo', got {cfg.advantage!r}")
    parts = {}
    for name in cfg.gdpo_rewards:
        if name not in r:
            raise ValueError(f"gdpo_rewards names {name!r}, which the reward does not return (it has {sorted(r)})")
        values = torch.tensor(r[name], dtype=torch.float32)
        if torch.isnan(values).all():
            continue
        means = {int(g): float(values[(group_ids == g) & ~torch.isnan(values)].nan_to_num().mean())
                 if (~torch.isnan(values[group_ids == g])).any() else 0.0 for g in torch.unique(group_ids)}
        fill = torch.tensor([means[int(g)] for g in group_ids])
        parts[name] = torch.where(torch.isnan(values), fill, values)
    weights = {k: float(cfg.gdpo_weights.get(k, 1.0)) for k in parts}
    return gdpo_advantages(parts, group_ids, weights=weights)


# --------------------------------------------------------------------------------------------- training
def train(config: GRPOConfig | dict | str, reward_fn: RewardFn | None = None) -> dict[str, Any]:
    """Train, checkpoint, and write ``adapter/``, ``best_adapter/``, ``metrics.jsonl``, ``result.json``.

    ``reward_fn(images, rows) -> {"reward", "lambda_harmonic", "raw_sim", ...: list[float]}`` replaces the CLIP
    reward (tests, or other reward models).
    """
    import numpy as np
    import torch

    from trainers import common
    from trainers.data import load_prompt_pool
    from trainers.losses import dar_weights, kl_to_reference, kl_velocity, ppo_clipped_loss

    cfg = common.coerce_config(GRPOConfig, config)
    if not cfg.prompt_pool:
        raise ValueError("GRPOConfig.prompt_pool is required")
    if cfg.eta <= 0:
        raise ValueError("GRPO needs a stochastic sampler: eta > 0")
    if cfg.reward not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {cfg.reward!r}")
    if cfg.kl_type not in ("latent", "velocity"):
        raise ValueError(f"kl_type must be 'latent' or 'velocity', got {cfg.kl_type!r}")
    pool = load_prompt_pool(cfg.prompt_pool)
    if cfg.tasks:
        pool = [r for r in pool if r.get("task") in set(cfg.tasks)]
    train_rows = [r for r in pool if r.get("split", "train") == "train"]
    heldout_rows = [r for r in pool if r.get("split") == "heldout"][: cfg.heldout_prompts]
    if not train_rows:
        raise ValueError(f"no train prompts in {cfg.prompt_pool} (tasks={cfg.tasks})")
    if reward_fn is None and cfg.reward == "verifier":
        VerifierReward.check_rows(train_rows + heldout_rows)

    s = common.prepare_training(cfg)
    acc, unet, opt, family = s.accelerator, s.unet, s.optimizer, s.family
    base = common.unwrap(s)
    device = acc.device
    family._train_size = cfg.resolution
    sde_type = cfg.sde_type or family.sde_types[0]
    family.check_sde_type(sde_type)
    for task in sorted({str(r.get("task", "t2i")) for r in train_rows + heldout_rows}):
        family.check_task(task)  # refuse (naming task and family) before any sampling
    if reward_fn is None:
        reward_fn = REWARDS[cfg.reward](cfg, device=str(device)).setup()
    size = cfg.resolution
    best = {"score": s.extra.get("best_heldout"), "step": s.extra.get("best_step")}
    if not heldout_rows:
        s.logger.info("prompt pool has no heldout prompts: model selection is off, best_adapter = final adapter")
    image_cache: dict[str, Any] = {}

    def open_image(path):
        from PIL import Image

        if path not in image_cache:
            with Image.open(path) as im:
                image_cache[path] = im.convert("RGB")
        return image_cache[path]

    def encode_rows(rows: list[dict]):
        """The policy's conditions: text plus each row's source / reference images (DyRef conditions the policy
        on its references), and the unconditional branch (empty text, same images) for guidance."""
        images = []
        for r in rows:
            src = open_image(r["source_image"]) if r.get("source_image") else None
            refs = [open_image(p) for p in r.get("reference_images") or []]
            images.append(family.condition_images(str(r.get("task", "t2i")), src, refs, size))
        images_arg = images if any(images) else None
        cond = family.encode([r["text"] for r in rows], images_arg, size)
        uncond = family.encode([""] * len(rows), images_arg, size) if cfg.guidance_scale > 1.0 else None
        return cond, uncond

    def generate_images(rows: list[dict], seed_gen, eta: float, window=None):
        cond, uncond = encode_rows(rows)
        x_T = family.initial_noise(seed_gen, size, batch=len(rows))
        with acc.autocast():  # sampling runs under the training autocast (bf16/fp16 weights and activations)
            out = family.sample(cond, uncond, x_T, cfg.sample_steps, size, guidance=cfg.guidance_scale, eta=eta,
                                sde_type=sde_type, generator=seed_gen, reduce=cfg.log_prob_reduce, sde_steps=window)
            with torch.no_grad():
                images = common.tensor_to_pil(family.latents_to_images(out["latents"][-1], size).float())
        return cond, uncond, out, images

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
        window = sde_window(cfg, step)

        # 1. sample with the current policy (eval mode, no grad), recording the trajectory
        unet.eval()
        cond, uncond, out, images = generate_images(rows, gen, cfg.eta, window)
        traj, logp_old, stds, sched = out["latents"], out["log_probs"], out["stds"], out["schedule"]
        unet.train()
        t_sample = time.perf_counter()

        # 2-3. rewards, advantages (GRPO or GDPO), DAR
        r = reward_fn(images, rows)
        rewards = torch.tensor(r["reward"], dtype=torch.float32)
        adv = combined_advantages(r, group_ids, cfg).clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        raw = torch.tensor(r["raw_sim"], dtype=torch.float32)
        easiness = torch.zeros(n_prompts).index_add_(0, group_ids, raw) / cfg.group_size
        dar = dar_weights(easiness, cfg.dar_gamma, cfg.dar_w_min, cfg.dar_w_max) if cfg.use_dar \
            else torch.ones(n_prompts)
        sample_w = dar[group_ids].to(device)
        t_reward = time.perf_counter()

        # 4. policy update over the recorded stochastic transitions
        trainable = [j for j, sd in enumerate(stds) if sd > 1e-8]
        n_train_t = max(1, round(len(trainable) * cfg.train_timestep_fraction))
        B = len(rows)
        stats = {"ppo_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio_mean": 0.0}
        first_ratio_err = None
        n_terms = 0
        grad_norm = None
        for _epoch in range(cfg.num_inner_epochs):
            perm = torch.randperm(len(trainable), generator=gen)[:n_train_t].tolist()
            for j in sorted(trainable[k] for k in perm):
                t = sched.timesteps[j]
                for c0 in range(0, B, cfg.train_micro_batch):
                    idx = list(range(c0, min(B, c0 + cfg.train_micro_batch)))
                    sl = slice(idx[0], idx[-1] + 1)
                    x_t, x_prev = traj[j][sl], traj[j + 1][sl]
                    c_mb = cond.take(idx)
                    u_mb = uncond.take(idx) if uncond is not None else None
                    with acc.autocast():
                        logp, pred, mean, std = transition_log_prob(family, sched, j, x_t, x_prev, c_mb, u_mb,
                                                                    cfg.guidance_scale, cfg.eta, sde_type,
                                                                    cfg.log_prob_reduce)
                    if first_ratio_err is None:
                        first_ratio_err = float((logp.detach() - logp_old[j][sl]).abs().max())
                    ppo, info = ppo_clipped_loss(logp, logp_old[j][sl], adv[sl], cfg.clip_range,
                                                 weights=sample_w[sl])
                    loss = ppo
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), common.reference_mode(base), acc.autocast():
                            pred_ref = family.guided_predict(x_t, t, c_mb, u_mb, cfg.guidance_scale)
                        if cfg.kl_type == "velocity":
                            kl = kl_velocity(pred.float(), pred_ref.float(), reduce=cfg.log_prob_reduce).mean()
                        else:
                            mean_ref, _ = family.step_mean_std(pred_ref, sched, j, x_t, cfg.eta, sde_type)
                            kl = kl_to_reference(mean, mean_ref, std, reduce=cfg.log_prob_reduce).mean()
                        loss = loss + cfg.kl_coef * kl
                        stats["kl"] += kl.item()
                    frac = len(idx) / B
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
            "sde_window": window if window is not None else "all",
            "first_logp_abs_diff": first_ratio_err,
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
                common.save_lora(base, s.output_dir / "best_adapter", family=family)
            metrics["best_heldout_lambda_harmonic"] = best["score"]
            metrics["best_step"] = best["step"]
        metrics["step_time"] = time.perf_counter() - t0
        last = s.logger.log(step, metrics)
        if acc.is_main_process and s.checkpoints.due(step, cfg.num_steps):
            s.checkpoints.save(step, base, opt, cfg, {"best_heldout": best["score"], "best_step": best["step"]})

    unet.eval()
    if acc.is_main_process and not heldout_rows:
        common.save_lora(base, s.output_dir / "best_adapter", family=family)
        best = {"score": None, "step": step}
    last = last or (s.logger.history[-1] if s.logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time") and not isinstance(v, list)}
    extra = {
        "best_adapter_path": str(s.output_dir / "best_adapter"),
        "best_heldout_lambda_harmonic": best["score"],
        "best_step": best["step"],
    }
    return common.finish_training(s, step, final, extra)
