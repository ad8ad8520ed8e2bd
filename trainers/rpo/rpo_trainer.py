"""Subject-driven RPO (Miao et al., "Subject-driven Text-to-Image Generation via Preference-based Reinforcement
Learning") with a LoRA on any diffusion family of :mod:`trainers.families`.

Input: 3-5 reference images of one subject, its class noun (``dog``) and an identifier token (``sks``); prompts
are templates holding ``{subject}`` (-> ``"sks dog"`` for generation, ``"dog"`` for CLIP-T). Per round:

1. **generate** ``candidates_per_prompt`` images for every prompt template with the *current* LoRA (the family's
   deterministic sampler from seeded noise, :meth:`ModelFamily.sample`), keeping their final latents;
2. **score** each with :class:`labelers.clip_scorer.ClipScorer`: CLIP_I = mean cosine to the reference images,
   CLIP_T = cosine to the class-noun prompt, reward = λ-Harmonic (:func:`labelers.rewards.lambda_harmonic`);
3. **pairs**: within a prompt, every two candidates get the Bradley-Terry label
   ``P(i ≻ j) = σ((r_i - r_j)/τ)`` (:func:`labelers.bradley_terry.bt_probability`); near-ties
   (``P < min_p_chosen``) are dropped, the ``max_pairs_per_prompt`` of largest margin kept;
4. **train** ``steps_per_round`` optimizer steps on ``L = L_pref + recon_weight · L_recon``:
   ``L_pref`` is Diffusion-DPO (:func:`trainers.losses.diffusion_dpo_loss`; with ``soft_labels`` its
   cross-entropy toward the BT probability, :func:`preference_loss`) on the candidates' latents, same noise and
   time for both images, the frozen base (LoRA off, or the frozen ``init_adapter``) as reference; ``L_recon`` is the
   family's own training objective (noise / v / flow-velocity MSE, :meth:`ModelFamily.training_sample` +
   :meth:`ModelFamily.predict`, as SFT) on the reference images captioned with ``instance_prompt``;
5. **validate**: fixed-seed images for ``validation_prompts``, mean λ-Harmonic; a better score saves
   ``best_adapter/``; ``patience`` rounds without one stop training (early stopping).

Round 0 validates the base model (the LoRA starts at zero), so a run that never beats the base keeps it. At the end
the selected adapter is restored and written to ``adapter/`` (the last weights go to ``last_adapter/``), and
``heldout_prompts`` are scored for the base and the selected adapter (CLIP-I, CLIP-T, λ-Harmonic) into
``result.json`` (``heldout``) beside the per-round curve (``curve``, also ``curve.json``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainers.rpo.rpo_config import RPOConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# --------------------------------------------------------------------------------------------- pure pieces
def subject_prompt(template: str, cfg: RPOConfig, with_identifier: bool = True) -> str:
    """``template`` with ``{subject}`` -> ``"<identifier> <class_noun>"`` (or the class noun alone, for CLIP-T)."""
    subject = f"{cfg.identifier} {cfg.class_noun}".strip() if with_identifier else cfg.class_noun
    if "{subject}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{subject}}")
    return template.replace("{subject}", subject)


def reconstruction_loss(pred, target):
    """The family's training objective on the reference images: ``mean((pred - target)²)`` in float32 (zero
    exactly when the prediction equals the target)."""
    import torch.nn.functional as F

    return F.mse_loss(pred.float(), target.float())


def preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta: float, p_chosen=None):
    """Diffusion-DPO on per-sample denoising errors ``(B,)``; returns ``(loss, implicit_acc, margin)``.

    ``p_chosen`` None (or all ones): exactly :func:`trainers.losses.diffusion_dpo_loss`. Otherwise the
    cross-entropy toward the Bradley-Terry label: with ``inside = -½·β·((m_w - m_l) - (r_w - r_l))``,
    ``loss = mean(-p·log σ(inside) - (1-p)·log σ(-inside))``, minimal at ``inside = logit(p)``. Swapping ``w`` and
    ``l`` negates ``inside`` (and ``margin``).
    """
    import torch
    import torch.nn.functional as F

    from trainers.losses import diffusion_dpo_loss

    if p_chosen is None:
        return diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta)
    p = torch.as_tensor(p_chosen, dtype=torch.float32, device=model_err_w.device)
    inside = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    loss = -(p * F.logsigmoid(inside) + (1.0 - p) * F.logsigmoid(-inside)).mean()
    return loss, (inside > 0).float().mean().detach(), inside.mean().detach()


def combined_loss(pref, recon, recon_weight: float):
    """RPO's objective: ``L_pref + recon_weight · L_recon`` (either part may be None: absent this step)."""
    parts = [x for x in (pref, None if recon is None else recon * float(recon_weight)) if x is not None]
    if not parts:
        raise ValueError("combined_loss needs a preference or a reconstruction term")
    return sum(parts[1:], parts[0])


def bt_pairs(rewards: Sequence[float], tau: float, min_p: float = 0.5, max_pairs: int = 0
             ) -> list[tuple[int, int, float]]:
    """``(chosen, rejected, P(chosen ≻ rejected))`` for every two candidates of one prompt (Bradley-Terry on their
    rewards), dropping pairs under ``min_p`` and non-finite rewards; the ``max_pairs`` of largest margin first."""
    from labelers.bradley_terry import bt_probability

    out = []
    for i in range(len(rewards)):
        for j in range(i + 1, len(rewards)):
            ri, rj = float(rewards[i]), float(rewards[j])
            if not (math.isfinite(ri) and math.isfinite(rj)) or ri == rj:
                continue
            c, r = (i, j) if ri > rj else (j, i)
            p = float(bt_probability(rewards[c], rewards[r], tau))
            if p >= min_p:
                out.append((c, r, p))
    out.sort(key=lambda x: (-x[2], x[0], x[1]))
    return out[:max_pairs] if max_pairs > 0 else out


def subject_image_paths(cfg: RPOConfig) -> list[str]:
    paths: list[str] = []
    if cfg.subject_dir:
        root = Path(cfg.subject_dir)
        if not root.is_dir():
            raise ValueError(f"subject_dir {root} is not a directory")
        paths += [str(p) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    paths += [str(p) for p in cfg.subject_images or []]
    if not paths:
        raise ValueError("RPO needs reference images of the subject: set subject_dir or subject_images")
    return paths


def _validate(cfg: RPOConfig) -> None:
    if not 0.0 <= cfg.lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {cfg.lam}")
    if cfg.rounds < 1 or cfg.steps_per_round < 1:
        raise ValueError("rounds and steps_per_round must be >= 1")
    if cfg.candidates_per_prompt < 2 and cfg.pairs_per_step > 0:
        raise ValueError("preference pairs need candidates_per_prompt >= 2")
    if not cfg.prompt_templates or not cfg.validation_prompts:
        raise ValueError("prompt_templates and validation_prompts must not be empty")
    for t in [cfg.instance_prompt, *cfg.prompt_templates, *cfg.validation_prompts, *cfg.heldout_prompts]:
        subject_prompt(t, cfg)


# --------------------------------------------------------------------------------------------- training
def train(config: RPOConfig | dict | str) -> dict[str, Any]:
    """Train, and write ``adapter/`` (the selected checkpoint), ``best_adapter/``, ``last_adapter/``,
    ``metrics.jsonl``, ``curve.json`` and ``result.json`` into ``output_dir``."""
    import numpy as np
    import torch
    from PIL import Image

    from labelers.clip_scorer import ClipScorer
    from labelers.rewards import lambda_harmonic
    from pipelines.zoo import resolve_model
    from trainers import common
    from trainers.losses import per_sample_mse

    cfg = common.coerce_config(RPOConfig, config)
    _validate(cfg)
    ref_paths = subject_image_paths(cfg)
    s = common.prepare_training(cfg)
    acc, unet, opt, family = s.accelerator, s.unet, s.optimizer, s.family
    base = common.unwrap(s)
    device = acc.device
    size = cfg.resolution
    family._train_size = size
    family.check_task("t2i")
    out_dir = s.output_dir
    best_dir = out_dir / "best_adapter"

    references = []
    for p in ref_paths:
        with Image.open(p) as im:
            references.append(im.convert("RGB"))
    ref_pixels = torch.stack([
        torch.from_numpy(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32).copy())
        .permute(2, 0, 1) / 127.5 - 1.0 for im in references])
    scorer = ClipScorer(resolve_model(cfg.clip_model), backend=cfg.clip_backend, device=str(device),
                        batch_size=cfg.clip_batch_size).setup()

    def generate(texts: list[str], seeds: list[int]) -> tuple[Any, list]:
        """Deterministic samples (one seeded noise per image) under the current weights: (latents, PIL images)."""
        lat, images = [], []
        unet.eval()
        for c0 in range(0, len(texts), cfg.generation_batch):
            chunk = texts[c0:c0 + cfg.generation_batch]
            gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds[c0:c0 + cfg.generation_batch]]
            cond = family.encode(chunk, None, size)
            uncond = family.encode([""] * len(chunk), None, size) if cfg.guidance_scale > 1.0 else None
            with torch.no_grad(), acc.autocast():
                res = family.sample(cond, uncond, family.initial_noise(gens, size), cfg.sample_steps, size,
                                    guidance=cfg.guidance_scale, eta=0.0)
                x0 = res["latents"][-1]
                images += common.tensor_to_pil(family.latents_to_images(x0, size).float())
            lat.append(x0.detach().float().cpu())
        unet.train()
        return torch.cat(lat), images

    def score(images: list, templates: list[str]) -> dict[str, list[float]]:
        texts = [subject_prompt(t, cfg, with_identifier=False) for t in templates]
        sc = scorer.score(images, texts, [references] * len(images))
        clip_i = [float(x.clip_i) for x in sc]
        clip_t = [float(x.clip_t) for x in sc]
        lh = [float(lambda_harmonic(i, t, cfg.lam)) for i, t in zip(clip_i, clip_t)]
        return {"clip_i": clip_i, "clip_t": clip_t, "lambda_harmonic": lh}

    def evaluate(templates: list[str]) -> dict[str, float]:
        rows = [t for t in templates for _ in range(cfg.validation_images_per_prompt)]
        seeds = [cfg.validation_seed + k for k in range(len(rows))]
        _, images = generate([subject_prompt(t, cfg) for t in rows], seeds)
        r = score(images, rows)
        return {k: float(np.mean(v)) for k, v in r.items()}

    extra = s.extra
    curve: list[dict[str, Any]] = list(extra.get("curve") or [])
    best = {"score": extra.get("best_score"), "step": extra.get("best_step"), "round": extra.get("best_round")}
    bad_rounds = int(extra.get("bad_rounds", 0))
    stopped_early = bool(extra.get("stopped_early", False))
    start_round = s.start_step // cfg.steps_per_round

    if not curve:  # round 0: the base model (the LoRA starts at zero, or at init_adapter)
        v = evaluate(cfg.validation_prompts)
        curve.append({"round": 0, "step": 0, **{f"val_{k}": x for k, x in v.items()}})
        best = {"score": v["lambda_harmonic"], "step": 0, "round": 0}
        if acc.is_main_process:
            common.save_lora(base, best_dir, family=family)
        s.logger.info(f"rpo: base validation λ-Harmonic {v['lambda_harmonic']:.4f}")

    recon_caption = subject_prompt(cfg.instance_prompt, cfg)
    step = s.start_step
    last: dict[str, Any] = {}
    for rnd in range(start_round + 1, cfg.rounds + 1):
        if stopped_early:
            break
        t_round = time.perf_counter()
        # 1-3: candidates of the current model, λ-Harmonic, Bradley-Terry pairs
        rows = [t for t in cfg.prompt_templates for _ in range(cfg.candidates_per_prompt)]
        seeds = [cfg.seed * 1_000_003 + rnd * 10_007 + k for k in range(len(rows))]
        cand_latents, cand_images = generate([subject_prompt(t, cfg) for t in rows], seeds)
        r = score(cand_images, rows)
        pairs: list[tuple[int, int, float, str]] = []  # (chosen index, rejected index, p, generation prompt)
        for pi, template in enumerate(cfg.prompt_templates):
            lo = pi * cfg.candidates_per_prompt
            group = r["lambda_harmonic"][lo:lo + cfg.candidates_per_prompt]
            for c, rej, p in bt_pairs(group, cfg.bt_tau, cfg.min_p_chosen, cfg.max_pairs_per_prompt):
                pairs.append((lo + c, lo + rej, p, subject_prompt(template, cfg)))
        round_info = {"round": rnd, "n_pairs": len(pairs), "cand_lambda_harmonic": float(np.mean(r["lambda_harmonic"])),
                      "cand_clip_i": float(np.mean(r["clip_i"])), "cand_clip_t": float(np.mean(r["clip_t"])),
                      "mean_p_chosen": float(np.mean([p[2] for p in pairs])) if pairs else None}
        if not pairs:
            s.logger.info(f"rpo round {rnd}: no pair passed min_p_chosen={cfg.min_p_chosen}; reconstruction only")

        # 4: train steps_per_round steps
        for _ in range(cfg.steps_per_round):
            t0 = time.perf_counter()
            lr = common.apply_lr(opt, cfg, step)
            gen = common.step_generator(cfg.seed, step, salt=acc.process_index)
            rng = random.Random(f"{cfg.seed}:{step}")
            metrics: dict[str, Any] = {"round": rnd, "lr": lr}
            pref = None
            if pairs and cfg.pairs_per_step > 0:
                batch = [pairs[rng.randrange(len(pairs))] for _ in range(cfg.pairs_per_step)]
                half = len(batch)
                x0 = torch.cat([cand_latents[[b[0] for b in batch]], cand_latents[[b[1] for b in batch]]]).to(device)
                noise = torch.randn((half, *x0.shape[1:]), generator=gen).to(device)
                noise = noise.repeat(2, *([1] * (x0.ndim - 1)))
                t = family.draw_training_time(half, gen).to(device).repeat(2)
                noisy, t, target = family.training_sample(x0, gen, noise=noise, t=t)
                cond = family.encode([b[3] for b in batch] * 2, None, size)
                with acc.autocast():
                    model_err = per_sample_mse(family.predict(noisy, t, cond), target)
                with torch.no_grad(), common.reference_mode(base), acc.autocast():
                    ref_err = per_sample_mse(family.predict(noisy, t, cond), target)
                p = [b[2] for b in batch] if cfg.soft_labels else None
                pref, implicit_acc, margin = preference_loss(model_err[:half], model_err[half:], ref_err[:half],
                                                             ref_err[half:], cfg.beta, p)
                metrics.update(pref_loss=pref.item(), implicit_acc=implicit_acc.item(), margin=margin.item())
            recon = None
            if cfg.recon_weight > 0 and cfg.recon_batch_size > 0:
                idx = [rng.randrange(len(references)) for _ in range(cfg.recon_batch_size)]
                latents = family.images_to_latents(ref_pixels[idx].to(device), generator=gen,
                                                   sample=cfg.sample_latents).float()
                noisy, t, target = family.training_sample(latents, gen)
                cond = family.encode([recon_caption] * len(idx), None, size)
                with acc.autocast():
                    recon = reconstruction_loss(family.predict(noisy, t, cond), target)
                metrics["recon_loss"] = recon.item()
            loss = combined_loss(pref, recon, cfg.recon_weight)
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                metrics["grad_norm"] = common.to_float(acc.clip_grad_norm_(s.params, cfg.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            metrics["loss"] = loss.item()
            metrics["step_time"] = time.perf_counter() - t0
            if step % cfg.steps_per_round == 0:
                # 5: validation and model selection at the end of the round
                v = evaluate(cfg.validation_prompts)
                improved = v["lambda_harmonic"] > float(best["score"]) + cfg.min_delta
                if improved:
                    best = {"score": v["lambda_harmonic"], "step": step, "round": rnd}
                    bad_rounds = 0
                    if acc.is_main_process:
                        common.save_lora(base, best_dir, family=family)
                else:
                    bad_rounds += 1
                curve.append({**round_info, "step": step, **{f"val_{k}": x for k, x in v.items()},
                              "round_time": time.perf_counter() - t_round})
                metrics.update({k: x for k, x in curve[-1].items() if k not in ("round", "step")})
                metrics.update(best_val_lambda_harmonic=best["score"], best_step=best["step"])
                stopped_early = cfg.patience > 0 and bad_rounds >= cfg.patience
            last = s.logger.log(step, metrics)
        if acc.is_main_process and (rnd % max(1, cfg.checkpoint_every) == 0 or rnd == cfg.rounds or stopped_early):
            s.checkpoints.save(step, base, opt, cfg, {
                "curve": curve, "best_score": best["score"], "best_step": best["step"], "best_round": best["round"],
                "bad_rounds": bad_rounds, "stopped_early": stopped_early})
        if stopped_early:
            s.logger.info(f"rpo: early stop after round {rnd} ({bad_rounds} rounds without a better validation "
                          f"λ-Harmonic; best {best['score']:.4f} at step {best['step']})")

    # the selected checkpoint becomes adapter/; held-out prompts: base vs selected
    unet.eval()
    heldout: dict[str, Any] = {}
    if acc.is_main_process:
        common.save_lora(base, out_dir / "last_adapter", family=family)
        common.load_lora_into(base, best_dir, family=family)
        if cfg.heldout_prompts:
            with common.reference_mode(base):
                heldout["base"] = evaluate(cfg.heldout_prompts)
            heldout["selected"] = evaluate(cfg.heldout_prompts)
            unet.eval()
        common.write_json(out_dir / "curve.json", curve)
    final = {k: v for k, v in (last or {}).items() if k not in ("step", "time") and not isinstance(v, (list, dict))}
    result_extra = {
        "best_adapter_path": str(best_dir),
        "last_adapter_path": str(out_dir / "last_adapter"),
        "best_step": best["step"],
        "best_round": best["round"],
        "best_val_lambda_harmonic": best["score"],
        "stopped_early": stopped_early,
        "curve": curve,
        "heldout": heldout,
        "subject_images": ref_paths,
        "subject_prompt": recon_caption,
    }
    return common.finish_training(s, step, final, result_extra)
