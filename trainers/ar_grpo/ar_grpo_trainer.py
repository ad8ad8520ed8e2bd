"""GRPO for autoregressive VQ-token image generators (Janus / Janus-Pro) with the leave-one-out FID reward
(GRPO with LOO-FID for AR image models) and an adaptive entropy regulariser.

Each step:

1. pick ``prompts_per_step`` train prompts; sample ``group_size`` token sequences per prompt from the policy
   (:meth:`trainers.families.janus.JanusFamily.sample`: one seeded generator per sample, CFG when
   ``guidance_scale > 1``, none otherwise), recording each token's exact log-probability and the entropy of the
   distribution it was drawn from; decode with the checkpoint's VQ-VAE;
2. rewards: the instance components (``clip_t``: CLIP image-text similarity; ``preference``: the preference scorer's,
   when configured) and the distribution-level ``loo_fid``: each sample's leave-one-out effect on the CLIP-feature
   FID of the step's samples against the EMA reference moments (:func:`labelers.diversity.loo_fid_diversity`);
   each component is standardised over the step's samples, weighted by ``reward_weights`` and summed; the step's
   features are then folded into the moments (so a step is never scored against itself);
3. group-relative advantages (GRPO), clipped to ``adv_clip_max``;
4. per-token PPO clipped loss on the log-probabilities recomputed with gradients in one teacher-forced forward
   (same guidance and temperature as sampling: the ratio is exactly 1 at the first update), plus ``kl_coef`` × the
   exact per-token KL to the reference (the LoRA off, or the frozen ``init_adapter``), minus ``α`` × the token
   entropy; ``α`` is tuned towards ``target_entropy`` after every step (:func:`trainers.losses.entropy_coef_update`);
5. every ``heldout_every`` steps and at the end: fixed-seed samples on held-out prompts, mean λ-Harmonic (t2i:
   CLIP_T); the best adapter so far is kept in ``best_adapter/`` (as the diffusion GRPO selects).

Metrics per step (``metrics.jsonl``): each reward part (``reward_<name>_mean``), ``loo_fid_mean`` / ``loo_fid_std``,
``fid_to_reference``, ``token_entropy``, ``kl``, ``entropy_coef`` / ``target_entropy``, ``diversity`` (mean pairwise
distance of the step's CLIP features) and ``diversity_within_group``, PPO diagnostics and timings.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainers.ar_grpo.ar_grpo_config import ARGRPOConfig

RewardFn = Callable[[list, list[dict[str, Any]]], dict[str, list[float]]]
FeatureFn = Callable[[list], Any]


class InstanceReward:
    """The composite instance reward: ``clip_t`` (:class:`labelers.clip_scorer.ClipScorer`), ``preference`` (a
    PickScore/HPS-style CLIP's image-text similarity, when ``preference_model`` is set) and ``lambda_harmonic``
    (λ-Harmonic with the task's λ; t2i has no references, so it is CLIP_T). :meth:`features` gives the LOO-FID
    features (the same CLIP's L2-normalised image embeddings)."""

    def __init__(self, cfg: ARGRPOConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = device
        self.clip = None
        self.preference = None

    def setup(self) -> InstanceReward:
        from labelers.clip_scorer import ClipScorer

        from pipelines.zoo import resolve_model

        self.clip = ClipScorer(resolve_model(self.cfg.clip_model), backend=self.cfg.clip_backend,
                               device=self.device, batch_size=self.cfg.clip_batch_size).setup()
        if self.cfg.preference_model:
            self.preference = ClipScorer(resolve_model(self.cfg.preference_model),
                                         backend=self.cfg.preference_backend, device=self.device,
                                         batch_size=self.cfg.clip_batch_size).setup()
        return self

    def features(self, images: list):
        if self.clip is None:
            self.setup()
        return self.clip.embed_images(images)

    def __call__(self, images: list, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
        from labelers.rewards import lambda_harmonic

        if self.clip is None:
            self.setup()
        texts = [r["text"] for r in rows]
        clip_t = [float(s.clip_t) for s in self.clip.score(images, texts)]
        out = {"clip_t": clip_t,
               "lambda_harmonic": [float(lambda_harmonic(None, c, float(self.cfg.lambdas.get(r.get("task", "t2i"), 0.0))))
                                   for c, r in zip(clip_t, rows)]}
        if self.preference is not None:
            out["preference"] = [float(s.clip_t) for s in self.preference.score(images, texts)]
        return out


def composite_reward(parts: dict[str, list[float]], weights: dict[str, float]):
    """``Σ_k w_k · standardize(parts[k])`` over the components with a non-zero weight (numpy (N,)). A weighted
    component missing from ``parts`` is an error (never silently dropped)."""
    import numpy as np

    from trainers.losses import standardize

    active = {k: float(w) for k, w in weights.items() if float(w) != 0.0}
    missing = sorted(k for k in active if k not in parts)
    if missing:
        raise ValueError(f"reward_weights name {missing}, which the reward does not provide (it has {sorted(parts)})")
    if not active:
        raise ValueError("reward_weights has no non-zero weight")
    n = len(next(iter(parts.values())))
    total = np.zeros(n)
    for k, w in active.items():
        total += w * standardize(parts[k])
    return total


def _within_group_diversity(features, group_ids) -> float:
    import numpy as np

    from trainers.losses import mean_pairwise_distance

    g = np.asarray(group_ids)
    return float(np.mean([mean_pairwise_distance(features[g == k]) for k in np.unique(g)]))


def train(config: ARGRPOConfig | dict | str, reward_fn: RewardFn | None = None,
          feature_fn: FeatureFn | None = None) -> dict[str, Any]:
    """Train and write ``adapter/`` (PEFT), ``best_adapter/``, ``metrics.jsonl``, ``result.json``.

    ``reward_fn(images, rows) -> {component: list[float]}`` replaces the instance reward (tests, other scorers);
    each row is the prompt-pool row plus ``image_tokens`` (the sample's VQ token ids), for token-level rewards;
    ``feature_fn(images) -> (N, D)`` replaces the CLIP features of LOO-FID and the diversity figure.
    """
    import numpy as np
    import torch

    from labelers.diversity import FeatureMoments, frechet_distance, loo_fid_diversity
    from pipelines.zoo import resolve_model
    from trainers import common
    from trainers.data import load_prompt_pool
    from trainers.families import AR_FAMILIES, load_family
    from trainers.losses import (categorical_entropy, categorical_kl, entropy_coef_update, group_advantages,
                                 mean_pairwise_distance, ppo_clipped_loss)

    cfg = common.coerce_config(ARGRPOConfig, config)
    if not cfg.prompt_pool:
        raise ValueError("ARGRPOConfig.prompt_pool is required")
    if cfg.temperature <= 0:
        raise ValueError("AR GRPO samples from the policy: temperature must be > 0")
    if cfg.group_size < 2 or cfg.group_size * cfg.prompts_per_step < 3:
        raise ValueError("group_size >= 2 and at least 3 samples per step (leave-one-out FID) are required")
    if not 0.0 <= cfg.fid_ema_decay <= 1.0:
        raise ValueError(f"fid_ema_decay must be in [0, 1], got {cfg.fid_ema_decay}")
    if reward_fn is None and float(cfg.reward_weights.get("preference", 0.0)) != 0.0 and not cfg.preference_model:
        raise ValueError("reward_weights gives 'preference' a weight but no preference_model is configured "
                         "(set preference_model, or its weight to 0)")
    pool = load_prompt_pool(cfg.prompt_pool)
    tasks = set(cfg.tasks or ["t2i"])
    pool = [r for r in pool if r.get("task", "t2i") in tasks]
    train_rows = [r for r in pool if r.get("split", "train") == "train"]
    heldout_rows = [r for r in pool if r.get("split") == "heldout"][: cfg.heldout_prompts]
    if not train_rows:
        raise ValueError(f"no train prompts in {cfg.prompt_pool} (tasks={sorted(tasks)})")

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.remove_stale_training_temps(out_dir)
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    common.set_seed(cfg.seed)
    acc = common.make_accelerator(cfg.mixed_precision, cfg.device)
    device = acc.device
    family = load_family(resolve_model(cfg.pretrained_model))
    if family.name not in AR_FAMILIES:
        raise ValueError(f"{cfg.pretrained_model}: family {family.name!r} is not autoregressive; "
                         "diffusion checkpoints train with trainers.grpo")
    for task in sorted(tasks):
        family.check_task(task)  # refuse (naming task and family) before any sampling
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision)
    family.to(device, weight_dtype)
    model = family.denoiser
    lora = common.setup_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.init_adapter, cfg.seed,
                             target_modules=common.lora_targets(cfg, family), family=family)
    params = common.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    moments_holder = _MomentsHolder()
    checkpoints = common.CheckpointManager(out_dir, cfg.checkpoint_every, cfg.keep_checkpoints,
                                           modules={"fid_moments": moments_holder}, family=family)
    start_step, extra, resumed_from = checkpoints.start(cfg.resume, model, opt, cfg)
    logger = common.MetricsLogger(out_dir, resume_step=start_step, enabled=acc.is_main_process)
    common.write_json(out_dir / "config.json", common.config_to_dict(cfg))
    if start_step:
        logger.info(f"resumed from {resumed_from} at step {start_step}")

    scorer = None
    if reward_fn is None or feature_fn is None:
        scorer = InstanceReward(cfg, device=str(device)).setup()
    reward_fn = reward_fn or scorer
    feature_fn = feature_fn or scorer.features
    weights = {k: float(v) for k, v in cfg.reward_weights.items()}
    G, P = cfg.group_size, cfg.prompts_per_step

    def features_of(images):
        f = feature_fn(images)
        return np.asarray(f.detach().cpu().numpy() if hasattr(f, "detach") else f, dtype=np.float64)

    def sample(rows, seeds):
        prompts = family.encode([r["text"] for r in rows], cfg.guidance_scale)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        model.eval()
        with acc.autocast():
            out = family.sample(prompts, gens, cfg.guidance_scale, cfg.temperature)
        model.train()
        return prompts, out, family.decode_pil(out["tokens"])

    def seeds_for(step: int, salt: int, n: int) -> list[int]:
        rng = random.Random(f"{cfg.seed}:{step}:{salt}:{acc.process_index}")
        return [rng.randrange(2**62) for _ in range(n)]

    def pick_rows(rng: random.Random) -> list[dict]:
        chosen = rng.sample(train_rows, P) if len(train_rows) >= P else [rng.choice(train_rows) for _ in range(P)]
        return chosen

    # ---- reference moments and the entropy target, from the initial policy (restored on resume)
    if start_step:
        moments = moments_holder.to_moments()
        log_coef = float(extra["log_entropy_coef"])
        target_entropy = float(extra["target_entropy"])
    else:
        warm_feats, warm_entropy = [], []
        for b in range(max(1, cfg.fid_warmup_batches)):
            rows = [r for r in pick_rows(random.Random(f"{cfg.seed}:warmup:{b}")) for _ in range(G)]
            _, out, images = sample(rows, seeds_for(-1 - b, 11, len(rows)))
            warm_feats.append(features_of(images))
            warm_entropy.append(float(out["entropy"].mean()))
        if cfg.fid_reference_moments:
            moments = FeatureMoments.load(cfg.fid_reference_moments)
            if moments.dim != warm_feats[0].shape[1]:
                raise ValueError(f"fid_reference_moments has dimension {moments.dim}, the LOO-FID features "
                                 f"{warm_feats[0].shape[1]}")
        else:
            moments = FeatureMoments.from_features(np.concatenate(warm_feats))
        initial_entropy = float(np.mean(warm_entropy))
        target_entropy = (float(cfg.target_entropy) if cfg.target_entropy is not None
                          else cfg.target_entropy_ratio * initial_entropy)
        log_coef = math.log(cfg.entropy_coef) if cfg.entropy_coef > 0 else -math.inf
        extra = {"initial_entropy": initial_entropy}
    best = {"score": extra.get("best_heldout"), "step": extra.get("best_step")}
    if not heldout_rows:
        logger.info("prompt pool has no heldout prompts: model selection is off, best_adapter = final adapter")

    def heldout_score() -> float:
        rows = [r for r in heldout_rows for _ in range(cfg.heldout_images_per_prompt)]
        rng = random.Random(f"{cfg.heldout_seed}")
        _, out, images = sample(rows, [rng.randrange(2**62) for _ in rows])
        r = reward_fn(images, [{**row, "image_tokens": t} for row, t in zip(rows, out["tokens"].tolist())])
        if "lambda_harmonic" not in r:
            raise ValueError("held-out selection needs the reward to return 'lambda_harmonic'")
        return float(np.mean(r["lambda_harmonic"]))

    def save_best(step: int) -> None:
        common.save_lora(model, out_dir / "best_adapter", family=family)

    step = start_step
    last: dict[str, Any] = {}
    model.train()
    while step < cfg.num_steps:
        t0 = time.perf_counter()
        lr = common.apply_lr(opt, cfg, step)
        chosen = pick_rows(random.Random(f"{cfg.seed}:{step}:{acc.process_index}"))
        rows = [r for r in chosen for _ in range(G)]
        group_ids = np.repeat(np.arange(P), G)

        # 1. sample from the current policy
        prompts, out, images = sample(rows, seeds_for(step, 0, len(rows)))
        tokens, logp_old = out["tokens"], out["log_probs"]
        token_entropy = float(out["entropy"].mean())
        t_sample = time.perf_counter()

        # 2. rewards: instance parts + LOO-FID against the EMA moments (then fold the step's features in)
        reward_rows = [{**r, "image_tokens": t} for r, t in zip(rows, tokens.tolist())]
        parts = {k: [float(x) for x in v] for k, v in reward_fn(images, reward_rows).items()}
        feats = features_of(images)
        loo = loo_fid_diversity(feats, moments)
        parts["loo_fid"] = [float(x) for x in loo]
        fid_ref = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), moments.mean, moments.cov)
        moments.ema_update(feats, cfg.fid_ema_decay)
        reward = composite_reward(parts, weights)
        adv = group_advantages(torch.tensor(reward, dtype=torch.float32), torch.as_tensor(group_ids))
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        t_reward = time.perf_counter()

        # 3-4. policy update: per-token PPO on recomputed log-probs, KL to the reference, entropy bonus
        coef = math.exp(log_coef) if math.isfinite(log_coef) else 0.0
        B = len(rows)
        stats = {"ppo_loss": 0.0, "kl": 0.0, "entropy_train": 0.0, "clip_frac": 0.0, "approx_kl": 0.0,
                 "ratio_mean": 0.0}
        first_diff, n_terms, grad_norm = None, 0, None
        for _epoch in range(cfg.num_inner_epochs):
            for c0 in range(0, B, cfg.train_micro_batch):
                sl = slice(c0, min(B, c0 + cfg.train_micro_batch))
                p_mb = prompts.take(sl)
                with acc.autocast():
                    logits = family.token_logits(p_mb, tokens[sl], cfg.guidance_scale, cfg.temperature)
                logp_all = torch.log_softmax(logits, dim=-1)
                logp = logp_all.gather(-1, tokens[sl].unsqueeze(-1)).squeeze(-1)
                if first_diff is None:
                    first_diff = float((logp.detach() - logp_old[sl]).abs().max())
                ppo, info = ppo_clipped_loss(logp, logp_old[sl], adv[sl, None], cfg.clip_range)
                ent = categorical_entropy(logits).mean()
                loss = ppo - coef * ent
                if cfg.kl_coef > 0:
                    with torch.no_grad(), common.reference_mode(model), acc.autocast():
                        ref_logits = family.token_logits(p_mb, tokens[sl], cfg.guidance_scale, cfg.temperature)
                    kl = categorical_kl(logits, ref_logits).mean()
                    loss = loss + cfg.kl_coef * kl
                    stats["kl"] += kl.item()
                acc.backward(loss * (sl.stop - sl.start) / B)
                stats["ppo_loss"] += ppo.item()
                stats["entropy_train"] += ent.item()
                for key in ("clip_frac", "approx_kl", "ratio_mean"):
                    stats[key] += info[key].item()
                n_terms += 1
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        stats = {k: v / max(1, n_terms) for k, v in stats.items()}
        if cfg.adaptive_entropy and math.isfinite(log_coef):
            log_coef = entropy_coef_update(log_coef, token_entropy, target_entropy, cfg.entropy_coef_lr,
                                           cfg.entropy_coef_min, cfg.entropy_coef_max)
        t_train = time.perf_counter()

        metrics: dict[str, Any] = {
            "loss": stats["ppo_loss"] + cfg.kl_coef * stats["kl"] - coef * stats["entropy_train"],
            **stats,
            "reward_mean": float(np.mean(reward)),
            **{f"reward_{k}_mean": float(np.mean(v)) for k, v in parts.items()},
            "loo_fid_mean": float(np.mean(loo)),
            "loo_fid_std": float(np.std(loo)),
            "fid_to_reference": float(fid_ref),
            "token_entropy": token_entropy,
            "entropy_coef": coef,
            "entropy_coef_next": math.exp(log_coef) if math.isfinite(log_coef) else 0.0,
            "target_entropy": target_entropy,
            "diversity": mean_pairwise_distance(feats),
            "diversity_within_group": _within_group_diversity(feats, group_ids),
            "unique_sequences": len({tuple(t) for t in tokens.tolist()}),
            "adv_abs_mean": float(adv.abs().mean()),
            "first_logp_abs_diff": first_diff,
            "lr": lr,
            "prompt_ids": [str(c.get("prompt_id")) for c in chosen],
            "sample_time": t_sample - t0,
            "reward_time": t_reward - t_sample,
            "train_time": t_train - t_reward,
        }
        if "lambda_harmonic" in parts:
            metrics["lambda_harmonic_mean"] = float(np.mean(parts["lambda_harmonic"]))
        if grad_norm is not None:
            metrics["grad_norm"] = common.to_float(grad_norm)

        # 5. held-out model selection
        if heldout_rows and acc.is_main_process and (
            step == cfg.num_steps or (cfg.heldout_every > 0 and step % cfg.heldout_every == 0)
        ):
            h = heldout_score()
            metrics["heldout_lambda_harmonic"] = h
            if best["score"] is None or h > best["score"]:
                best = {"score": h, "step": step}
                save_best(step)
            metrics["best_heldout_lambda_harmonic"] = best["score"]
            metrics["best_step"] = best["step"]
        metrics["step_time"] = time.perf_counter() - t0
        last = logger.log(step, metrics)
        if acc.is_main_process and checkpoints.due(step, cfg.num_steps):
            moments_holder.set(moments)
            checkpoints.save(step, model, opt, cfg, {**extra, "best_heldout": best["score"], "best_step": best["step"],
                                                     "log_entropy_coef": log_coef, "target_entropy": target_entropy})

    model.eval()
    if acc.is_main_process and not heldout_rows:
        save_best(step)
        best = {"score": None, "step": step}
    last = last or (logger.history[-1] if logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time") and not isinstance(v, list)}
    if not acc.is_main_process:
        return {}
    adapter_dir = common.save_lora(model, out_dir / "adapter", family=family)
    return common.write_training_result(
        out_dir, step, adapter_dir, checkpoints, logger, final,
        {**lora, "family": family.name, "pipeline_class": family.pipeline_class}, family, cfg, start_step,
        {"best_adapter_path": str(out_dir / "best_adapter"), "best_heldout_lambda_harmonic": best["score"],
         "best_step": best["step"], "initial_entropy": extra.get("initial_entropy"),
         "target_entropy": target_entropy})


def _MomentsHolder():
    """The EMA reference moments as an ``nn.Module`` of buffers, so :class:`trainers.common.CheckpointManager`
    saves them (safetensors) with every checkpoint and restores them on resume."""
    import torch

    class MomentsHolder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("mean", "cov", "count"):
                self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

        def set(self, moments) -> None:
            self.mean = torch.from_numpy(moments.mean.copy())
            self.cov = torch.from_numpy(moments.cov.copy())
            self.count = torch.tensor([moments.count], dtype=torch.float64)

        def load_state_dict(self, state, strict: bool = True, assign: bool = False):
            for name in ("mean", "cov", "count"):  # shapes come from the file (the buffers start empty)
                setattr(self, name, state[name].clone())
            return super().load_state_dict(state, strict=strict, assign=assign)

        def to_moments(self):
            from labelers.diversity import FeatureMoments

            return FeatureMoments(self.mean.numpy(), self.cov.numpy(), float(self.count.reshape(-1)[0]))

    return MomentsHolder()
