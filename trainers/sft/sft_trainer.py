"""SFT trainer: LoRA on the denoiser with the model family's objective — ``‖ε - ε_θ(x_t, t, c)‖²`` (or v) for the
UNet families, ``‖(ε - x0) - v_θ(x_σ, σ, c)‖²`` for the flow-matching transformers — where ``c`` holds the text and,
for edit / multi_ref samples, their source / reference images.

Stage 1 of DyRef's two-stage recipe (SFT, then RL from this adapter: ``GRPOConfig.init_adapter``).
Randomness of step ``k`` (VAE posterior sample, noise, timesteps, caption and reward dropout) comes from a
generator seeded with ``(seed, k)``, and the data stream (:mod:`trainers.sft.stream`: each rank's shards through
DataLoader workers) is checkpointed by position, so a resumed run continues exactly like an uninterrupted one.

With ``reward_conditioning`` the condition ``c`` is the caption's CLIP hidden states plus reward tokens embedding
the sample's per-dimension judge scores (:mod:`trainers.conditioning`); the embedding is trained with the LoRA, is
in the optimizer and the checkpoints, and is saved as ``adapter/reward_embedding.safetensors`` + ``.json``.
"""

from __future__ import annotations

import time
from typing import Any

from trainers.sft.sft_config import SFTConfig


class SFTStep:
    """The loss of one SFT micro-batch (shared by :func:`train` and ``bench/train_loader.py``).

    ``batch``: ``{"pixels": (B,3,R,R) in [-1,1], "captions": [...], "meta": [sample json, ...]}``; every random
    draw comes from ``gen`` in a fixed order (posterior sample unless ``sample_latents`` is off, noise, timesteps,
    caption dropout, then -- when conditioning -- dimension dropout and reward dropout), so plain SFT draws what it
    always drew.

    The objective is the model family's (:mod:`trainers.families`): noise / v prediction for the UNet families, the
    flow velocity for the flow-matching transformers. Edit and multi_ref samples are conditioned on their source /
    reference images (a task the family cannot condition on is refused, never trained as text-to-image).
    """

    def __init__(self, cfg: SFTConfig, setup):
        from trainers.conditioning import EMBEDDING_NAME

        self.cfg = cfg
        self.acc, self.pipe, self.unet = setup.accelerator, setup.pipe, setup.unet
        self.family = setup.family
        self.family._train_size = cfg.resolution
        self.reward = setup.modules.get(EMBEDDING_NAME) if cfg.reward_conditioning else None
        self.reward_module = self.acc.unwrap_model(self.reward) if self.reward is not None else None

    def loss(self, batch: dict[str, Any], gen) -> tuple[Any, dict[str, float]]:
        """``(loss, extra metrics)``."""
        import torch
        import torch.nn.functional as F

        from trainers import common

        cfg, acc, family = self.cfg, self.acc, self.family
        latents = family.images_to_latents(batch["pixels"].to(acc.device), generator=gen,
                                           sample=cfg.sample_latents).float()
        bsz = latents.shape[0]
        noisy, timesteps, target = family.training_sample(latents, gen)
        captions = list(batch["captions"])
        if cfg.caption_dropout > 0:
            drop = torch.rand(bsz, generator=gen) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = common.condition_batch(family, captions, batch["meta"], cfg.resolution)
        extra = {}
        if self.reward is not None:
            scores = self.reward_module.scores_tensor(batch["meta"])  # (B, D), NaN = no score
            if cfg.reward_dimension_dropout > 0:
                hide = torch.rand(scores.shape, generator=gen) < cfg.reward_dimension_dropout
                scores = scores.masked_fill(hide, float("nan"))
            keep = None
            tokens = self.reward(scores.to(acc.device))
            if cfg.reward_dropout > 0:
                keep = torch.rand(bsz, generator=gen) >= cfg.reward_dropout
                extra["reward_kept"] = float(keep.float().mean())
            cond = family.append_tokens(cond, tokens, keep)
            extra["reward_known"] = float(torch.isfinite(scores).float().mean())
        with acc.autocast():
            pred = family.predict(noisy, timesteps, cond)
        return F.mse_loss(pred.float(), target.float()), extra


def reward_embedding_factory(cfg: SFTConfig):
    """``pipe -> {"reward_embedding": RewardEmbedding}`` for ``prepare_training(modules=...)`` (None when off)."""
    if not cfg.reward_conditioning:
        return None
    if not cfg.reward_dimensions:
        raise ValueError("reward_conditioning needs at least one entry in reward_dimensions")

    def build(family):
        from trainers.conditioning import EMBEDDING_NAME, RewardEmbedding

        width = family.text_width
        return {EMBEDDING_NAME: RewardEmbedding(cfg.reward_dimensions, width, scale=cfg.reward_scale, seed=cfg.seed,
                                                tokens_per_dimension=cfg.reward_tokens_per_dimension)}

    return build


def _validate(cfg: SFTConfig) -> None:
    if not cfg.corpus_dir:
        raise ValueError("SFTConfig.corpus_dir is required")
    for name in ("caption_dropout", "reward_dropout", "reward_dimension_dropout"):
        if not 0.0 <= float(getattr(cfg, name)) <= 1.0:
            raise ValueError(f"SFTConfig.{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.dataloader_num_workers < 0:
        raise ValueError(f"SFTConfig.dataloader_num_workers must be >= 0, got {cfg.dataloader_num_workers}")


def train(config: SFTConfig | dict | str) -> dict[str, Any]:
    """Train, checkpoint, and write ``adapter/``, ``metrics.jsonl``, ``result.json`` into ``output_dir``."""
    from trainers import common
    from trainers.conditioning import WEIGHTS_NAME
    from trainers.sft.stream import SFTStream

    cfg = common.coerce_config(SFTConfig, config)
    _validate(cfg)
    s = common.prepare_training(cfg, modules=reward_embedding_factory(cfg))
    acc, opt = s.accelerator, s.optimizer
    step_fn = SFTStep(cfg, s)

    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    position = None
    if s.start_step:
        positions = s.extra.get("stream_positions")
        if not isinstance(positions, list) or len(positions) != acc.num_processes:
            raise ValueError(f"checkpoint at step {s.start_step} holds data stream positions for "
                             f"{len(positions) if isinstance(positions, list) else 'no'} process(es), this run has "
                             f"{acc.num_processes}: it can only resume with the process count it was written with")
        position = positions[acc.process_index]
    stream = SFTStream(cfg.corpus_dir, resolution=cfg.resolution, chunk_size=cfg.batch_size, seed=cfg.seed,
                       shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, rank=acc.process_index,
                       world_size=acc.num_processes, num_workers=cfg.dataloader_num_workers,
                       prefetch_factor=cfg.prefetch_factor, position=position, tasks=cfg.tasks)

    s.unet.train()
    if step_fn.reward is not None:
        step_fn.reward.train()
    step = s.start_step
    last: dict[str, Any] = {}
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = common.apply_lr(opt, cfg, step)
            gen = common.step_generator(cfg.seed, step, salt=acc.process_index)
            total_loss, data_time, extras = 0.0, 0.0, {}
            for _micro in range(cfg.gradient_accumulation_steps):
                d0 = time.perf_counter()
                batch = stream.take(cfg.batch_size)
                data_time += time.perf_counter() - d0
                loss, extra = step_fn.loss(batch, gen)
                acc.backward(loss / cfg.gradient_accumulation_steps)
                total_loss += loss.item() / cfg.gradient_accumulation_steps
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            grad_norm = acc.clip_grad_norm_(s.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            metrics = {"loss": total_loss, "lr": lr, "step_time": time.perf_counter() - t0, "data_time": data_time,
                       "samples_seen": step * per_step * acc.num_processes, **extras}
            if grad_norm is not None:
                metrics["grad_norm"] = common.to_float(grad_norm)
            last = s.logger.log(step, metrics)
            if s.checkpoints.due(step, cfg.max_steps):
                positions = [stream.position]
                if acc.num_processes > 1:  # every rank reads its own shards: keep every rank's position
                    from accelerate.utils import gather_object

                    positions = gather_object(positions)
                if acc.is_main_process:
                    extra_state = {"samples_consumed": step * per_step * acc.num_processes,
                                   "stream_positions": positions}
                    s.checkpoints.save(step, common.unwrap(s), opt, cfg, extra_state)
    finally:
        stream.close()
    s.unet.eval()
    if step_fn.reward is not None:
        step_fn.reward.eval()
    last = last or (s.logger.history[-1] if s.logger.history else {})
    final = {k: v for k, v in last.items() if k not in ("step", "time")}
    extra_result = {}
    if cfg.reward_conditioning:
        extra_result["reward_embedding_file"] = str(s.output_dir / "adapter" / WEIGHTS_NAME)
        extra_result["reward_dimensions"] = list(cfg.reward_dimensions)
    return common.finish_training(s, step, final, extra_result)
