"""SFT trainer: LoRA on the UNet, standard denoising loss ``‖ε - ε_θ(√ᾱ_t·z + √(1-ᾱ_t)·ε, t, c)‖²``.

Stage 1 of DyRef's two-stage recipe (SFT, then RL from this adapter: ``GRPOConfig.init_adapter``).
Randomness of step ``k`` (VAE posterior sample, noise, timesteps, caption dropout) comes from a generator seeded
with ``(seed, k)`` and the data stream is seeded per epoch, so a resumed run continues exactly like an
uninterrupted one.
"""

from __future__ import annotations

import time
from typing import Any

from trainers.sft.sft_config import SFTConfig


def train(config: SFTConfig | dict | str) -> dict[str, Any]:
    """Train, checkpoint, and write ``adapter/``, ``metrics.jsonl``, ``result.json`` into ``output_dir``."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from trainers import common
    from trainers.data import batched, collate_sft, sft_samples
    from trainers.losses import noise_prediction_target

    cfg = common.coerce_config(SFTConfig, config)
    if not cfg.corpus_dir:
        raise ValueError("SFTConfig.corpus_dir is required")
    s = common.prepare_training(cfg)
    acc, pipe, unet, opt = s.accelerator, s.pipe, s.unet, s.optimizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train_t = noise_scheduler.config.num_train_timesteps

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    consumed = s.start_step * per_step * acc.num_processes  # global samples consumed before start_step
    stream = sft_samples(cfg.corpus_dir, cfg.seed if cfg.shuffle else None, repeat=True, skip=consumed,
                         rank=acc.process_index, world_size=acc.num_processes)
    batches = batched(stream, cfg.batch_size)
    empty_emb = common.encode_prompts(pipe, [""], acc.device) if cfg.caption_dropout > 0 else None

    unet.train()
    step = s.start_step
    last: dict[str, Any] = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        lr = common.apply_lr(opt, cfg, step)
        gen = common.step_generator(cfg.seed, step, salt=acc.process_index)
        total_loss = 0.0
        for _micro in range(cfg.gradient_accumulation_steps):
            batch = collate_sft(next(batches), cfg.resolution)
            latents = common.images_to_latents(pipe.vae, batch["pixels"], generator=gen).float()
            bsz = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen).to(acc.device)
            timesteps = torch.randint(0, num_train_t, (bsz,), generator=gen).to(acc.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            emb = common.encode_prompts(pipe, batch["captions"], acc.device)
            if empty_emb is not None:
                drop = (torch.rand(bsz, generator=gen) < cfg.caption_dropout).to(acc.device)
                emb = torch.where(drop[:, None, None], empty_emb.expand_as(emb), emb)
            target = noise_prediction_target(noise_scheduler, latents, noise, timesteps)
            with acc.autocast():
                pred = unet(noisy, timesteps, emb).sample
            loss = F.mse_loss(pred.float(), target.float())
            acc.backward(loss / cfg.gradient_accumulation_steps)
            total_loss += loss.item() / cfg.gradient_accumulation_steps
        grad_norm = acc.clip_grad_norm_(s.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        metrics = {"loss": total_loss, "lr": lr, "step_time": time.perf_counter() - t0,
                   "samples_seen": step * per_step * acc.num_processes}
        if grad_norm is not None:
            metrics["grad_norm"] = common.to_float(grad_norm)
        last = s.logger.log(step, metrics)
        if acc.is_main_process and s.checkpoints.due(step, cfg.max_steps):
            consumed_now = step * per_step * acc.num_processes
            s.checkpoints.save(step, common.unwrap(s), opt, cfg, {"samples_consumed": consumed_now})
    unet.eval()
    last = last or (s.logger.history[-1] if s.logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time")}
    return common.finish_training(s, step, final)
