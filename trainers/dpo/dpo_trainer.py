"""Diffusion-DPO trainer (Wallace et al., 2023) with a LoRA policy.

Per pair ``(x_w, x_l, c)``: the same noise ``ε`` and timestep ``t`` are used for both images; the per-sample
errors of the model family's prediction (``‖ε - ε_θ(x_t, t, c)‖²`` for the UNet families, the velocity error
``‖(ε - x0) - v_θ(x_σ, σ, c)‖²`` for flow matching, as flow_grpo's SD3 DPO script does; ``c`` includes an edit /
multi_ref pair's source / reference images) of the policy (LoRA on) and the frozen reference (LoRA off, or the frozen init
adapter) enter :func:`trainers.losses.diffusion_dpo_loss`. Logs ``loss``, ``implicit_acc`` and ``margin`` per step,
and the implicit rewards of the preferred and the dispreferred images, ``reward_w`` / ``reward_l`` =
``mean(-½·β·(err_θ - err_ref))`` (``margin = reward_w - reward_l``): both falling while the margin grows means the
policy got worse at denoising the preferred images too, only less so (likelihood displacement).
"""

from __future__ import annotations

import time
from typing import Any

from trainers.dpo.dpo_config import DPOConfig


def _flipped(pair: tuple, seed: int, share: float) -> bool:
    """Whether ``pair``'s labels are swapped under ``label_flip = share``: a hash of the seed and the pair's images'
    caption and ids, so the same pairs flip in every epoch, process and resume."""
    import hashlib

    meta = pair[5] if len(pair) > 5 and isinstance(pair[5], dict) else {}
    ident = meta.get("pair_id") or meta.get("__key__") or pair[2]
    digest = hashlib.sha256(f"{seed}:{ident}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def train(config: DPOConfig | dict | str) -> dict[str, Any]:
    """Train, checkpoint, and write ``adapter/``, ``metrics.jsonl``, ``result.json`` into ``output_dir``."""
    import torch
    from trainers import common
    from trainers.data import collate_preference, preference_stream
    from trainers.losses import diffusion_dpo_loss, per_sample_mse

    cfg = common.coerce_config(DPOConfig, config)
    if not cfg.corpus_dir:
        raise ValueError("DPOConfig.corpus_dir is required")
    s = common.prepare_training(cfg)
    acc, unet, opt, family = s.accelerator, s.unet, s.optimizer, s.family
    family._train_size = cfg.resolution

    raw_consumed = int(s.extra.get("raw_samples_consumed", 0))
    stream = preference_stream(cfg.corpus_dir, cfg.seed if cfg.shuffle else None, start_raw=raw_consumed,
                               drop_ties=cfg.drop_ties, rank=acc.process_index, world_size=acc.num_processes)

    tasks = set(cfg.tasks) if cfg.tasks else None
    if not 0.0 <= cfg.label_flip <= 1.0:
        raise ValueError(f"label_flip must be within [0, 1], got {cfg.label_flip}")

    def next_batch() -> dict[str, Any]:
        nonlocal raw_consumed
        items = []
        while len(items) < cfg.batch_size:
            raw_consumed, pair = next(stream)
            if tasks is not None and str(pair[-1].get("task") or "t2i") not in tasks:
                continue  # a task this run does not train (cfg.tasks)
            if cfg.label_flip and _flipped(pair, cfg.seed, cfg.label_flip):
                img_0, img_1, caption, label_0, label_1, *rest = pair
                pair = (img_0, img_1, caption, label_1, label_0, *rest)
            items.append(pair)
        return collate_preference(items, cfg.resolution)

    unet.train()
    step = s.start_step
    last: dict[str, Any] = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = common.apply_lr(opt, cfg, step)
        gen = common.step_generator(cfg.seed, step, salt=acc.process_index)
        sums = {"loss": 0.0, "implicit_acc": 0.0, "margin": 0.0, "reward_w": 0.0, "reward_l": 0.0, "model_diff": 0.0,
                "ref_diff": 0.0}
        for _micro in range(cfg.gradient_accumulation_steps):
            batch = next_batch()
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(acc.device)
            latents = family.images_to_latents(pixels, generator=gen, sample=cfg.sample_latents).float()
            half = latents.shape[0] // 2
            # the same noise and timestep for the preferred and the dispreferred image
            noise = torch.randn((half, *latents.shape[1:]), generator=gen).to(acc.device)
            noise = noise.repeat(2, *([1] * (latents.ndim - 1)))
            timesteps = family.draw_training_time(half, gen).to(acc.device).repeat(2)
            noisy, timesteps, target = family.training_sample(latents, gen, noise=noise, t=timesteps)
            cond = common.condition_batch(family, batch["captions"], batch["meta"], cfg.resolution).repeat(2)
            with acc.autocast():
                pred = family.predict(noisy, timesteps, cond)
            model_err = per_sample_mse(pred, target)
            with torch.no_grad(), common.reference_mode(common.unwrap(s)), acc.autocast():
                ref_err = per_sample_mse(family.predict(noisy, timesteps, cond), target)
            loss, implicit_acc, margin = diffusion_dpo_loss(model_err[:half], model_err[half:], ref_err[:half],
                                                            ref_err[half:], cfg.beta)
            acc.backward(loss / cfg.gradient_accumulation_steps)
            n = cfg.gradient_accumulation_steps
            sums["loss"] += loss.item() / n
            sums["implicit_acc"] += implicit_acc.item() / n
            sums["margin"] += margin.item() / n
            implicit_reward = -0.5 * cfg.beta * (model_err.detach() - ref_err)
            sums["reward_w"] += implicit_reward[:half].mean().item() / n
            sums["reward_l"] += implicit_reward[half:].mean().item() / n
            sums["model_diff"] += (model_err[:half] - model_err[half:]).mean().item() / n
            sums["ref_diff"] += (ref_err[:half] - ref_err[half:]).mean().item() / n
        grad_norm = acc.clip_grad_norm_(s.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        metrics = {**sums, "lr": lr, "step_time": time.perf_counter() - t0, "raw_samples_consumed": raw_consumed}
        if grad_norm is not None:
            metrics["grad_norm"] = common.to_float(grad_norm)
        last = s.logger.log(step, metrics)
        if acc.is_main_process and s.checkpoints.due(step, cfg.max_steps):
            s.checkpoints.save(step, common.unwrap(s), opt, cfg, {"raw_samples_consumed": raw_consumed})
    unet.eval()
    last = last or (s.logger.history[-1] if s.logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time")}
    return common.finish_training(s, step, final)
