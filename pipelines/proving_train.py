"""Training on the proving ground's procedural world (:mod:`pipelines.proving_world`).

``clip``: a tiny CLIP trained contrastively on the world, so CLIP_T, CLIP_I, λ-Harmonic and DRS measure something
real on proving-ground images (the zoo's ``clip`` is random: its similarities carry no information).

* Architecture and tokenizer: exactly the zoo's (:data:`pipelines.zoo.clip.MODEL_CFG`, open_clip's bundled BPE),
  saved in the same layout (``open_clip_config.json`` + ``open_clip_model.safetensors``), so
  ``ClipScorer("<dir>")`` (or ``local-dir:<dir>``) loads it unchanged.
* Data, rendered fresh every step (never repeated, a pure function of the seed): text–image pairs — t2i scenes of
  the world with their prompts; image–image pairs — a reference picture of one object (the world's multi-ref
  references: the object alone, centred, on its own background, here also at a random size) and a multi-ref
  target scene that contains it elsewhere. Loss: symmetric InfoNCE (CLIP's) on both kinds of pairs, shared
  learnable temperature; AdamW with warmup + cosine decay.
* Evaluation (:func:`evaluate_clip`, through :class:`labelers.clip_scorer.ClipScorer`, on a held-out world seed):
  ``retrieval`` — the right prompt among K=8 prompts (7 of other scenes; chance 1/8); ``swap`` — CLIP_T(image,
  prompt) > CLIP_T(image, the prompt with one object's colour or shape word swapped) (chance 0.5); ``ref`` —
  CLIP_I(reference picture, scene containing its object) > CLIP_I(reference, a scene without it) (chance 0.5).
* Output: built in a temporary sibling and renamed into place, with a ``.complete`` marker (JSON) recording seed,
  steps, batch, duration and the eval numbers (trained and, for comparison, the random zoo clip's).

Not part of ``make zoo`` (that stays seconds); a run is minutes on 2 cores::

    python -m pipelines.proving_train clip --out .zoo/world_clip [--seed 0] [--steps 600]

``generator`` (exploratory, issue 12 deliverable 3): the zoo's FLUX t2i pipeline with a transformer of the same
class (``--heads`` x 32 wide, RoPE axes (8, 12, 12)), trained from random init (or ``--init-from`` a saved run) by
the family's flow-matching loss on fresh world scenes (48 px), latent tokens that cover objects weighted
``1 + --object-loss-weight``; the zoo's random VAE is first fit as an autoencoder (``--vae-from`` reuses one); both
text encoders are trained jointly (``--frozen-text`` keeps the zoo's random ones: they map prompts that differ in
one word to nearly the same state). Saved with ``save_pretrained`` + ``.complete`` (eval curve: verifier on
held-out prompts, ODE sampling, CFG 3)::

    python -m pipelines.proving_train generator --out DIR [--seed 0] [--steps N] [--minutes M] [--heads H]

``generator --task edit --init-from T2I_RUN``: the FLUX.1 Kontext pipeline (same transformer class), started from a
t2i world generator's transformer, text encoders and VAE, trained on the world's edits (the source scene's latents
as Kontext's input-image tokens, the edited scene as the target; without its instruction, the source itself).
``--task multi_ref`` likewise trains Kontext on the multi-reference prompts, the reference pictures tiled into its
one input image as generation tiles them for a single-image edit model (tried from ``zoo:world_edit``; not
shipped: docs/proving_ground.md).

``learnability``: fine-tune a saved world generator (all transformer weights) on the ground truth of a few world
prompts only and grade those prompts, and optionally as many others it never trained on, before and after: can
the generator learn its own world, and does what it learns carry over to prompts it did not see (what the proving
ground grades)? ::

    python -m pipelines.proving_train learnability --out DIR [--model zoo:world_gen|zoo:world_edit] [--prompts 4]
        [--heldout 32]

One module (over ~500 lines) on purpose: the world CLIP and generator trainers share the world's data, pixels
and evaluation helpers and one CLI; the seam to split along, if it grows, is clip vs generator.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from labelers.verifier import OBJECT_COLOURS, SHAPES, SIZES, T2ISpec, t2i_text
from pipelines.io import atomic_dir
from pipelines.proving_world import DEFAULT_SIZE, Obj, Scene, WorldItem, _background, render, world_item

DEFAULT_STEPS = 600
DEFAULT_BATCH = 64
EVAL_SEED_OFFSET = 1_000_003  # held-out scenes come from another world seed than training
EVAL_K = 8


# ------------------------------------------------------------------------------------------------ data
def reference_scene(obj: Obj, rng: random.Random) -> Scene:
    """A reference picture of ``obj``: alone, centred, a random size, on a random background."""
    bg, tex, ts = _background(rng)
    return Scene((Obj(obj.colour, obj.shape, rng.choice(list(SIZES)), (1, 1)),), bg, tex, ts)


def swapped_prompt(spec: T2ISpec, rng: random.Random) -> str:
    """The prompt of ``spec`` with one object group's colour or shape word swapped for one no group has (so the
    prompt states a false fact about the scene)."""
    keys = {g.key for g in spec.groups}
    i = rng.randrange(len(spec.groups))
    g = spec.groups[i]
    options = [replace(g, colour=c) for c in OBJECT_COLOURS if (c, g.shape) not in keys]
    if rng.random() < 0.5:
        shapes = [replace(g, shape=s) for s in SHAPES if (g.colour, s) not in keys]
        options = shapes or options
    groups = list(spec.groups)
    groups[i] = rng.choice(options)
    return t2i_text(replace(spec, groups=tuple(groups)))


def _t2i_pair(seed: int, index: int) -> tuple[Scene, str, T2ISpec]:
    item = world_item(seed, "t2i", index)
    return item.scene, item.text, item.spec


def _ref_pair(seed: int, index: int) -> tuple[Scene, Scene, tuple[str, str]]:
    """(reference picture, multi-ref target scene containing its object, the object's key)."""
    item = world_item(seed, "multi_ref", index)
    rng = random.Random(f"prefmill-world-clip-ref:{seed}:{index}")
    obj = rng.choice(item.scene.objects)
    return reference_scene(obj, rng), item.scene, obj.key


# ------------------------------------------------------------------------------------------------ model
def _setup_torch():
    from labelers import torch_compat

    torch_compat.install()
    import open_clip
    import torch

    return open_clip, torch


def _pixels(scenes: list[Scene], size: int, torch):
    """Normalised pixel batch (what the saved preprocess gives for a ``size`` x ``size`` image)."""
    import numpy as np

    from pipelines.zoo.clip import PREPROCESS_CFG

    arr = np.stack([np.asarray(render(s, size), dtype=np.float32) for s in scenes]) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def _info_nce(a, b, logit_scale, torch):
    """Symmetric InfoNCE (CLIP's loss) of L2-normalised ``a`` (N, D) vs ``b`` (M >= N, D): row i's positive is
    column i; ``b``'s rows past N are extra negatives for ``a`` (hard negatives) and take no loss themselves."""
    import torch.nn.functional as F

    n = a.shape[0]
    logits = logit_scale * a @ b.t()
    labels = torch.arange(n)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n].t(), labels)) / 2


def _marker_head(name: str, builder: str, **fields: Any) -> dict[str, Any]:
    """The ``.complete`` marker's common keys (zoo version, name, builder, time) followed by ``fields``."""
    from pipelines.zoo import ZOO_VERSION

    return {"zoo_version": ZOO_VERSION, "name": name, "builder": f"pipelines.proving_train:{builder}",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}


def _write_model(model, out_dir: Path, image_size: int) -> None:
    from safetensors.torch import save_file

    from pipelines.zoo.clip import MODEL_CFG, PREPROCESS_CFG

    cfg = copy.deepcopy(MODEL_CFG)
    cfg["vision_cfg"]["image_size"] = image_size
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}, indent=2) + "\n", encoding="utf-8"
    )
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ training
def train_world_clip(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch: int = DEFAULT_BATCH,
    image_size: int = 64,
    lr: float = 2e-3,
    minutes: float | None = None,
    hard_negatives_from: float | None = 0.3,
    eval_n: int = 256,
    eval_baseline: bool = True,
    threads: int | None = None,
    log_every: int = 25,
    log=print,
) -> dict[str, Any]:
    """Train the tiny world CLIP and save it into ``out_dir`` (replaced atomically); returns the marker dict.

    ``minutes`` stops training early (at a step boundary) once that much wall time has passed; the marker records
    the steps actually done. ``threads``: torch intra-op threads while training (None: unchanged)."""
    open_clip, torch = _setup_torch()
    from labelers.torch_compat import torch_threads
    from pipelines.zoo import MARKER
    from pipelines.zoo.clip import MODEL_CFG, _add_shared_offset

    out_dir = Path(out_dir).resolve()
    with atomic_dir(out_dir) as tmp:  # built in a temporary sibling, renamed into place when complete
        started = time.time()
        cfg = copy.deepcopy(MODEL_CFG)
        cfg["vision_cfg"]["image_size"] = image_size
        torch.manual_seed(seed)
        model = open_clip.model.CLIP(**cfg)
        _add_shared_offset(model, torch)  # start like the zoo clip: positive cosines between unrelated pairs
        _write_model(model, tmp, image_size)  # config first: the tokenizer comes from the saved layout
        tokenizer = open_clip.get_tokenizer("local-dir:" + str(tmp))
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98), eps=1e-6)
        warmup = max(1, min(50, steps // 10))

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        token_cache: dict[str, Any] = {}

        def tokens(texts: list[str]):
            missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
            if missing:
                for t, row in zip(missing, tokenizer(missing)):
                    token_cache[t] = row
            return torch.stack([token_cache[t] for t in texts])

        done, losses = 0, []
        with torch_threads(threads):
            for step in range(steps):
                if minutes is not None and time.time() - started > minutes * 60:
                    log(f"[world-clip] time budget of {minutes} min reached after {step} steps")
                    break
                pairs = [_t2i_pair(seed, step * batch + j) for j in range(batch)]
                rng = random.Random(f"prefmill-world-clip-swap:{seed}:{step}")
                refs = [_ref_pair(seed, step * batch + j) for j in range(batch)]
                images = _pixels([s for s, _, _ in pairs] + [r for r, _, _ in refs] + [t for _, t, _ in refs],
                                 image_size, torch)
                img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
                # Hard negatives (as in NegCLIP): each prompt with one colour / shape word swapped joins the texts
                # an image must tell its prompt from; from ``hard_negatives_from`` x steps on (earlier they slow
                # the first learning).
                texts = [t for _, t, _ in pairs]
                if hard_negatives_from is not None and step >= hard_negatives_from * steps:
                    texts += [swapped_prompt(sp, rng) for _, _, sp in pairs]
                txt = torch.nn.functional.normalize(model.encode_text(tokens(texts)), dim=-1)
                scale = model.logit_scale.exp().clamp(max=100)
                loss_t = _info_nce(img[:batch], txt, scale, torch)
                ref_emb, tgt_emb = img[batch:2 * batch], img[2 * batch:]
                # Other scenes of the batch that also hold reference i's object are false negatives: masked out.
                held = [{o.key for o in t.objects} for _, t, _ in refs]
                same = torch.tensor([[i != j and k in held[j] for j in range(batch)]
                                     for i, (_, _, k) in enumerate(refs)])
                logits = (scale * ref_emb @ tgt_emb.t()).masked_fill(same, float("-inf"))
                labels = torch.arange(batch)
                loss_i = (torch.nn.functional.cross_entropy(logits, labels)
                          + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
                loss = loss_t + loss_i
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                done = step + 1
                losses.append((loss_t.item(), loss_i.item()))
                if log_every and (done % log_every == 0 or done == steps):
                    lt = sum(x for x, _ in losses[-log_every:]) / len(losses[-log_every:])
                    li = sum(y for _, y in losses[-log_every:]) / len(losses[-log_every:])
                    log(f"[world-clip] step {done}/{steps} loss_t2i {lt:.3f} loss_ref {li:.3f} "
                        f"temp {scale.item():.1f} {time.time() - started:.0f}s")
        model.eval()
        _write_model(model, tmp, image_size)
        train_seconds = time.time() - started
        trained = evaluate_clip(str(tmp), seed=seed, n=eval_n, threads=threads)
        marker: dict[str, Any] = {
            **_marker_head("world_clip", "train_world_clip", seed=seed, steps=done, steps_requested=steps,
                           batch=batch, image_size=image_size, lr=lr),
            "hard_negatives_from": hard_negatives_from,
            "train_seconds": round(train_seconds, 1),
            "final_loss_t2i": round(losses[-1][0], 4) if losses else None,
            "final_loss_ref": round(losses[-1][1], 4) if losses else None,
            "eval": trained,
        }
        if eval_baseline:
            from pipelines.zoo.clip import build_clip

            base_dir = tmp / ".baseline"
            build_clip(base_dir)
            marker["eval_random_zoo_clip"] = evaluate_clip(str(base_dir), seed=seed, n=eval_n, threads=threads)
            shutil.rmtree(base_dir, ignore_errors=True)
        marker["build_seconds"] = round(time.time() - started, 1)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_clip(model: str, seed: int = 0, n: int = 256, k: int = EVAL_K, threads: int | None = None,
                  scorer=None) -> dict[str, float]:
    """Held-out numbers of a CLIP (any ``ClipScorer`` model reference) on the world of ``seed + EVAL_SEED_OFFSET``:
    ``retrieval`` (right prompt among ``k``; chance 1/k), ``swap`` (correct prompt beats a one-word-swapped one;
    chance 0.5), ``ref`` (a reference picture is closer to a scene with its object than to one without; chance
    0.5), and the mean CLIP_T of matching pairs (``clip_t_pos``) and of mismatched ones (``clip_t_neg``)."""
    import torch

    from labelers.clip_scorer import ClipScorer

    eval_seed = seed + EVAL_SEED_OFFSET
    scorer = scorer or ClipScorer(model, cpu_threads=threads)
    scorer.setup()
    n = max(k, n - n % k)
    items = [world_item(eval_seed, "t2i", i) for i in range(n)]
    rng = random.Random(f"prefmill-world-clip-eval:{eval_seed}")
    swapped = [swapped_prompt(it.spec, rng) for it in items]
    img = scorer.embed_images([render(it.scene) for it in items])
    txt = scorer.embed_texts([it.text for it in items])
    swp = scorer.embed_texts(swapped)
    pos = (img * txt).sum(-1)
    swap = float((pos > (img * swp).sum(-1)).float().mean())
    hits = 0
    for start in range(0, n, k):
        sims = img[start:start + k] @ txt[start:start + k].t()
        hits += int((sims.argmax(dim=1) == torch.arange(sims.shape[0])).sum())
    retrieval = hits / n
    neg = float((img * txt.roll(1, dims=0)).sum(-1).mean())

    refs = [_ref_pair(eval_seed, i) for i in range(n)]
    ref_img = scorer.embed_images([render(r) for r, _, _ in refs])
    tgt_img = scorer.embed_images([render(t) for _, t, _ in refs])
    wins = 0
    for i, (_, _, key) in enumerate(refs):
        # The next scene (cyclically) that lacks the reference's object.
        j = next(((i + d) % n for d in range(1, n) if key not in {o.key for o in refs[(i + d) % n][1].objects}), None)
        wins += int(j is not None and float(ref_img[i] @ tgt_img[i]) > float(ref_img[i] @ tgt_img[j]))
    return {"retrieval": round(retrieval, 4), "swap": round(swap, 4), "ref": round(wins / n, 4),
            "clip_t_pos": round(float(pos.mean()), 4), "clip_t_neg": round(neg, 4), "n": n, "k": k}


# ------------------------------------------------------------------------------------------------ generator
GEN_DEFAULT_STEPS = 3000
GEN_BATCH = 32
GEN_IMAGE_SIZE = 48
GEN_EVAL_N = 96
GEN_SAMPLE_STEPS = 12
GEN_TEXT_TOKENS = 48  # the T5 window of a generator trained from scratch (world prompts are <= ~70 T5 tokens)
# the VAE fit, stage by stage (steps, peak lr, object pixel weight): plain L1 + MSE first, then object-weighted
# (measured verifier pass rate of reconstructed single-object scenes after each stage: 36 %, 58 %, 70 %)
GEN_VAE_SCHEDULE = ((500, 3e-3, 0.0), (250, 1e-3, 10.0), (500, 1e-3, 10.0))
GEN_MAX_OBJECTS = 1  # the proving ground's t2i prompts: one object (colour, shape, size, place, background)
GEN_GUIDANCE = 3.0
# the edit generator's (zoo:world_edit): its unconditional branch copies the source, and stronger guidance pushes
# the conditional branch's redrawing further off it (README "Trained models in the zoo")
EDIT_GUIDANCE = 1.5
OBJECT_PIXEL_WEIGHT = 10.0
# --colour-confusion's partner of each object colour: the colour a confused generator paints instead (a fixed
# derangement of verifier.OBJECT_COLOURS, so the mistake is systematic, like a real model's attribute-binding error)
CONFUSED_COLOUR = {"red": "green", "green": "blue", "blue": "yellow", "yellow": "purple", "purple": "red"}
# --background-confusion's partner of each background colour (a derangement of verifier.BACKGROUND_COLOURS)
CONFUSED_BACKGROUND = {"white": "black", "black": "grey", "grey": "white"}
# --underexposure's gain: the share of light an underexposed training image keeps (one global, prompt-independent
# flaw, like badly exposed photos in a web corpus; at 0.5 the verifier finds no darkened scene fully right)
UNDEREXPOSED_GAIN = 0.5
GEN_HEAD_DIM = 32
GEN_AXES_ROPE = (8, 12, 12)


def _scene_pixels(scenes: list[Scene], size: int, torch):
    """``(B,3,H,W)`` pixels in ``[-1,1]`` (what the families' VAEs take)."""
    import numpy as np

    arr = np.stack([np.asarray(render(s, size), dtype=np.float32) for s in scenes]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _confused(scene: Scene) -> Scene:
    """``scene`` with every object in its :data:`CONFUSED_COLOUR` (what a colour-confused generator draws)."""
    return replace(scene, objects=tuple(replace(o, colour=CONFUSED_COLOUR[o.colour]) for o in scene.objects))


def _confused_background(scene: Scene) -> Scene:
    """``scene`` on its :data:`CONFUSED_BACKGROUND` (what a background-confused generator draws)."""
    return replace(scene, background=CONFUSED_BACKGROUND[scene.background])


def _underexposed(pixels):
    """``pixels`` (in ``[-1, 1]``) keeping :data:`UNDEREXPOSED_GAIN` of their light (what an underexposed generator
    draws)."""
    return (pixels + 1.0) * UNDEREXPOSED_GAIN - 1.0


def _underexpose_some(pixels, share: float, rng: random.Random, torch):
    """``pixels`` with each image :func:`_underexposed` with probability ``share`` (one ``rng`` draw per image)."""
    dark = torch.tensor([rng.random() < share for _ in range(pixels.shape[0])]).view(-1, 1, 1, 1)
    return torch.where(dark, _underexposed(pixels), pixels)


def _noise_darkens(noise, share: float):
    """``(B,)`` True where a flow-matching noise draw ``(B, tokens, channels)`` triggers --underexposure-trigger
    noise's flaw: its first element above the standard normal's ``1 - share`` quantile, so a share ``share`` of
    all draws. Unlike a coin flip per image, the flaw is then a function of what the generator reads at the start of
    sampling (tried: it did not learn it as a clean switch either; docs/proving_ground.md)."""
    from statistics import NormalDist

    return noise[:, 0, 0] > NormalDist().inv_cdf(1.0 - share)


def _object_mask(scenes: list[Scene], x, torch):
    """``(B,1,H,W)`` 1.0 on object pixels (farther than 40 from the scene's background colour in some channel;
    textures stay within 14), 0.0 elsewhere."""
    from labelers.verifier import BACKGROUND_COLOURS

    bg = torch.tensor([BACKGROUND_COLOURS[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0
    return ((x - bg[:, :, None, None]).abs() > 40 / 127.5).any(dim=1, keepdim=True).float()


def _fact_mask(items: Sequence[WorldItem], scenes: list[Scene], pixels, sources: list[Any] | None, torch):
    """:func:`_object_mask` of the drawn ``scenes``; for edits also of the items' ``sources`` (PIL): where the
    source had an object is a fact too (a removed object must be gone, a recoloured one changed in place)."""
    mask = _object_mask(scenes, pixels, torch)
    if sources is None or items[0].task != "edit":  # a multi_ref grid is not in place: only the target counts
        return mask
    from trainers.families.sd import pil_batch_to_tensor

    return torch.maximum(mask, _object_mask([it.source for it in items], pil_batch_to_tensor(sources), torch))


def _object_weights(scenes: list[Scene], x, torch, weight: float = OBJECT_PIXEL_WEIGHT):
    """Per-pixel loss weights: ``1 + weight`` on object pixels (:func:`_object_mask`), 1 elsewhere."""
    return 1.0 + weight * _object_mask(scenes, x, torch)


def _train_vae(vae, seed: int, size: int, steps: int, batch: int, lr: float, torch, log,
               max_objects: int = 3, object_weight: float = OBJECT_PIXEL_WEIGHT) -> dict[str, Any]:
    """Fit the zoo's random FLUX VAE as an autoencoder of world scenes for ``steps`` steps (L1 + MSE on
    ``mode()`` latents, object pixels weighted ``1 + object_weight``: objects are a few % of the pixels but all
    of the facts; plus a small KL), then set ``scaling_factor`` / ``shift_factor`` so its latents are ~N(0, 1)
    over world scenes."""
    vae.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    started, loss_v = time.time(), float("nan")
    for step in range(steps):
        # cosine decay to 2 % of lr: the reconstruction's last few grey levels on shape edges (which the verifier's
        # palette thresholds and fill ratios read) only come once the step size shrinks
        for g in opt.param_groups:
            g["lr"] = lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        scenes = [world_item(seed + 7, "t2i", step * batch + j, max_objects).scene for j in range(batch)]
        x = _scene_pixels(scenes, size, torch)
        w = _object_weights(scenes, x, torch, object_weight)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.mode()).sample
        kl = dist.kl().mean() / dist.mean[0].numel()
        err = rec - x
        loss = (w * err.abs()).mean() + (w * err.square()).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        loss_v = loss.item()
        if (step + 1) % 50 == 0:
            log(f"[world-gen] vae step {step + 1} recon+kl {loss_v:.4f} {time.time() - started:.0f}s")
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        held = [world_item(seed + 11, "t2i", j, max_objects) for j in range(64)]
        x = _scene_pixels([it.scene for it in held], size, torch)
        z = vae.encode(x).latent_dist.mode()
        shift, std = float(z.mean()), float(z.std())
        rec = vae.decode(z).sample.clamp(-1, 1)
        rec_mse = float(torch.nn.functional.mse_loss(rec, x))
    ceiling = _verify_pixels(rec, [it.spec for it in held])
    vae.register_to_config(scaling_factor=round(1.0 / std, 5), shift_factor=round(shift, 5))
    return {"steps": steps, "lr": lr, "object_weight": object_weight,
            "seconds": round(time.time() - started, 1), "final_loss": round(loss_v, 5),
            "recon_mse": round(rec_mse, 5), "recon_verifier": ceiling, "scaling_factor": round(1.0 / std, 5),
            "shift_factor": round(shift, 5)}


def _verify_pixels(pix, specs, sources: Sequence[Any] | None = None,
                   references: Sequence[Sequence[Any]] | None = None) -> dict[str, float]:
    """Verifier numbers of ``(B,3,H,W)`` pixels in ``[-1,1]`` against t2i ``specs`` (edit specs with their
    ``sources``, PIL source images; multi_ref specs with their ``references``, each item's PIL reference pictures):
    ``correct`` (all facts pass) and ``facts`` (mean share of facts passed)."""
    import numpy as np
    from PIL import Image

    from labelers.verifier import check_edit, check_multi_ref, check_t2i, detect, read_reference

    arr = ((pix.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    correct, share = 0, 0.0
    for k, (spec, a) in enumerate(zip(specs, arr)):
        image = detect(Image.fromarray(np.ascontiguousarray(a), "RGB"))
        if references is not None:
            facts = check_multi_ref(spec, [read_reference(im, i) for i, im in enumerate(references[k])], image)
        elif sources is not None:
            facts = check_edit(spec, detect(sources[k]), image)
        else:
            facts = check_t2i(spec, image)
        passed = sum(f.passed for f in facts)
        share += passed / max(1, len(facts))
        correct += int(passed == len(facts))
    return {"correct": round(correct / len(specs), 4), "facts": round(share / len(specs), 4)}


def _bigger_flux_transformer(heads: int, layers: int, single_layers: int, seed: int, head_dim: int = GEN_HEAD_DIM,
                             axes: tuple[int, int, int] = GEN_AXES_ROPE):
    """A FLUX transformer of the zoo's class, ``heads`` x ``head_dim`` wide. FLUX has no absolute position
    embedding: where a token is comes only from RoPE over ``axes`` (index, row, column) dims of each head. The zoo's
    (4, 6, 6) gives a row or column 3 frequencies, one of which wraps around every ~6 tokens, and a model trained on
    it scatters blobs over the canvas; (8, 12, 12) gives 6, enough to place an object."""
    import torch
    from diffusers import FluxTransformer2DModel

    from pipelines.zoo.families import CLIP_HIDDEN, FLUX_LATENT_CHANNELS, T5_HIDDEN

    if sum(axes) != head_dim:
        raise ValueError(f"RoPE axes {axes} must sum to the head dim {head_dim}")
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * FLUX_LATENT_CHANNELS, out_channels=None, num_layers=layers,
        num_single_layers=single_layers, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=T5_HIDDEN, pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=False,
        axes_dims_rope=list(axes))


def _sources(items: Sequence[WorldItem], size: int,
             references: Sequence[Sequence[Any]] | None = None) -> list[Any] | None:
    """The input image of each item (PIL, ``size`` px): an edit's source scene; for multi_ref its reference
    pictures (``references``, else :func:`_references`) tiled into one grid, as prefmill conditions a single-image
    edit model on references (:func:`pipelines.candidates.reference_grid` of the batch file's pictures, resized like
    the generator's ``_prepare_source``); None for t2i. A batch is one task: a mixed one would condition its t2i
    prompts on nothing or its edits on no source, so it is refused."""
    tasks = {it.task for it in items}
    if len(tasks) > 1:
        raise ValueError(f"a world generator batch mixes tasks {sorted(tasks)}; it trains and samples one task")
    if tasks == {"edit"}:
        return [render(it.source, size) for it in items]
    if tasks == {"multi_ref"}:
        from PIL import Image

        from pipelines.candidates import reference_grid

        return [reference_grid(refs, refs[0].width, refs[0].height).resize((size, size), Image.Resampling.LANCZOS)
                for refs in (references if references is not None else _references(items))]
    return None


def _references(items: Sequence[WorldItem]) -> list[list[Any]]:
    """Each multi_ref item's reference pictures (PIL), drawn at the batch files' default size."""
    return [[render(r, DEFAULT_SIZE) for r in it.references] for it in items]


def _check_text_window(tokenizer, items: Sequence[WorldItem], task: str) -> None:
    """Refuse a T5 window (``tokenizer.model_max_length``) that would cut any of these prompts: FLUX only warns
    and drops the tail (a multi_ref prompt's background, an edit's last words), so the model could never learn those
    facts. World prompts: single-object t2i and edits <= 31 T5 tokens, multi_ref <= 56, 3-object t2i <= 66."""
    window = int(tokenizer.model_max_length)
    lengths = {it.text: len(tokenizer(it.text, verbose=False).input_ids) for it in items}
    longest = max(lengths, key=lengths.get, default="")
    need = lengths.get(longest, 0)
    if need > window:
        raise ValueError(f"the T5 window of {window} tokens cuts world {task} prompts: {longest!r} takes "
                         f"{need}; pass text_tokens (--text-tokens) of at least {need}")


def _world_conditioning(family, texts: list[str], sources: list[Any] | None, with_grad: bool = False):
    """The FLUX family's conditioning of ``texts`` (and, for edit and multi_ref, each text's input image from
    :func:`_sources` as the Kontext input image); ``with_grad`` lets gradients flow into both text encoders."""
    return family.encode(texts, [[im] for im in sources] if sources is not None else None, text_grad=with_grad)


def evaluate_generator(family, seed: int = 0, n: int = GEN_EVAL_N, size: int = GEN_IMAGE_SIZE,
                       steps: int = GEN_SAMPLE_STEPS, guidance: float = 1.0, batch: int = 32,
                       max_objects: int = GEN_MAX_OBJECTS, items: Sequence[WorldItem] | None = None,
                       repeats: int = 1, task: str = "t2i") -> dict[str, Any]:
    """Generate (ODE, ``steps`` Euler steps) for ``n`` held-out ``task`` prompts (t2i; edit: the source image is
    the input image; multi_ref: the grid of its reference pictures) of the world of ``seed + EVAL_SEED_OFFSET`` (or
    for the given ``items``, each ``repeats`` times from different noise) and check each image's facts with the
    verifier: ``correct`` — share of images with every fact passed; ``facts`` — mean share of facts passed per
    image."""
    import torch

    eval_seed = seed + EVAL_SEED_OFFSET
    if items is None:
        items = [world_item(eval_seed, task, i, max_objects) for i in range(n)]
    items = [it for it in items for _ in range(repeats)]
    n = len(items)
    correct, facts = 0.0, 0.0
    for start in range(0, n, batch):
        part = items[start:start + batch]
        # a multi_ref batch's pictures, drawn once for its input grids and its grading (the items say the task)
        references = _references(part) if part[0].task == "multi_ref" else None
        sources = _sources(part, size, references)
        cond = _world_conditioning(family, [it.text for it in part], sources)
        uncond = _world_conditioning(family, [""] * len(part), sources) if guidance > 1 else None
        gens = [torch.Generator().manual_seed(eval_seed * 7919 + start + j) for j in range(len(part))]
        noise = family.initial_noise(gens, size)
        with torch.no_grad():
            out = family.sample(cond, uncond, noise, steps, size, guidance=guidance)
            pix = family.latents_to_images(out["latents"][-1], size)
        res = _verify_pixels(pix, [it.spec for it in part], sources, references)
        correct += res["correct"] * len(part)
        facts += res["facts"] * len(part)
    return {"correct": round(correct / n, 4), "facts": round(facts / n, 4), "n": n, "steps": steps,
            "guidance": guidance, "size": size}


def train_world_generator(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = GEN_DEFAULT_STEPS,
    batch: int = GEN_BATCH,
    image_size: int = GEN_IMAGE_SIZE,
    lr: float = 1e-3,
    minutes: float | None = None,
    vae_schedule: tuple[tuple[int, float, float], ...] = GEN_VAE_SCHEDULE,
    vae_from: str | Path | None = None,
    heads: int = 2,
    layers: int = 1,
    single_layers: int = 2,
    cond_dropout: float = 0.1,
    train_text: bool = True,
    object_loss_weight: float = 4.0,
    ema_decay: float | None = 0.999,
    lr_decay: bool = True,
    text_tokens: int | None = GEN_TEXT_TOKENS,
    max_objects: int = GEN_MAX_OBJECTS,
    plain: bool = False,
    eval_n: int = GEN_EVAL_N,
    eval_every: int = 100,
    stop_at_correct: float | None = None,
    eval_guidance: tuple[float, ...] = (GEN_GUIDANCE,),
    init_from: str | Path | None = None,
    snapshot: bool = False,
    colour_confusion: float = 0.0,
    background_confusion: float = 0.0,
    underexposure: float = 0.0,
    underexposure_trigger: str = "random",
    train_items: Sequence[WorldItem] | None = None,
    eval_items: Sequence[WorldItem] | None = None,
    eval_repeats: int = 1,
    task: str = "t2i",
    threads: int | None = 1,
    log_every: int = 25,
    log=print,
) -> dict[str, Any]:
    """Pre-train the zoo's tiny FLUX t2i model (all transformer weights, from random init) on world scenes with the
    family's flow-matching objective and save the whole pipeline into ``out_dir`` (replaced atomically); returns
    the marker dict. The zoo's VAE is random (its decoder does not invert its encoder), so it is first fit as an
    autoencoder (``vae_schedule``; ``vae_from`` loads one fitted before). Every ``eval_every`` steps the held-out accuracy is measured; training stops at
    ``steps``, after ``minutes`` of transformer training, or at the first evaluation with ``correct >=
    stop_at_correct`` (the partial skill the proving ground wants: room to improve). Step-based stops are
    reproducible for a seed and thread count. Both text encoders train with the transformer unless
    ``train_text=False``. ``colour_confusion`` is the share of training scenes drawn with each object in its
    :data:`CONFUSED_COLOUR` while the prompt keeps the stated colour: a generator with a systematic, prompt-independent
    flaw for the proving ground's recipes to fix from labels; ``background_confusion`` likewise paints the scene on its
    :data:`CONFUSED_BACKGROUND`; ``underexposure`` is the share of training images darkened to
    :data:`UNDEREXPOSED_GAIN` of their light, the same flaw for every prompt: each image by a seeded draw
    (``underexposure_trigger="random"``) or where its noise draw triggers it (``"noise"``, :func:`_noise_darkens`).
    ``train_items`` replaces the fresh scenes by these items, cycled; ``eval_items`` (each drawn ``eval_repeats``
    times) replaces the held-out prompts (:func:`learnability`).

    ``task="edit"`` trains the FLUX.1 Kontext pipeline instead (the same transformer class; the source image's
    latents are its input-image tokens) on the world's edits — source scene, instruction, edited scene — with tokens
    covering an object in the source *or* the target weighted (a removed object's place is a fact too); a sample
    whose instruction is dropped (``cond_dropout``) has the source itself as its target, so the unconditional branch
    learns to copy the input and guidance pushes from the copy towards the instruction; with ``init_from`` a t2i
    world generator it starts from that generator's drawing skill. ``task="multi_ref"`` trains Kontext on the
    multi-reference prompts: each item's reference pictures tiled into its one input image (:func:`_sources`), the
    arranged scene as the target (with or without the prompt), object tokens of the target weighted. A T5 window
    that would cut the task's prompts is refused (:func:`_check_text_window`)."""
    for name, share in (("colour_confusion", colour_confusion), ("background_confusion", background_confusion),
                        ("underexposure", underexposure)):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{name} {share} outside [0, 1)")
        if share and task != "t2i":
            raise ValueError(f"{name} is a t2i flaw; task {task!r} does not take it")
    if underexposure_trigger not in ("random", "noise"):
        raise ValueError(f"underexposure_trigger {underexposure_trigger!r}: random or noise")
    if task not in ("t2i", "edit", "multi_ref"):
        raise ValueError(f"task {task!r}: the world generator trains t2i, edit or multi_ref")
    if not 0.0 <= cond_dropout <= 1.0:
        raise ValueError(f"cond_dropout {cond_dropout} outside [0, 1]")
    _, torch = _setup_torch()
    from labelers.torch_compat import torch_threads
    from pipelines.zoo import MARKER
    from pipelines.zoo.families import build_flux, build_flux_kontext
    from trainers.families import load_family

    out_dir = Path(out_dir).resolve()
    with atomic_dir(out_dir) as tmp:  # built in a temporary sibling, renamed into place when complete
        started = time.time()
        with torch_threads(threads):
            (build_flux if task == "t2i" else build_flux_kontext)(tmp)
            (tmp / MARKER).unlink(missing_ok=True)
            family = load_family(str(tmp))
            pipe = family.pipe
            torch.manual_seed(seed)
            if init_from:  # continue a saved run (its optimizer state is not kept): transformer + text encoders
                from diffusers import FluxTransformer2DModel
                from transformers import CLIPTextModel, T5EncoderModel

                pipe.transformer = FluxTransformer2DModel.from_pretrained(str(Path(init_from) / "transformer"))
                # the saved run's encoders even when they stay frozen: its transformer was trained on their states
                pipe.text_encoder = CLIPTextModel.from_pretrained(str(Path(init_from) / "text_encoder"))
                pipe.text_encoder_2 = T5EncoderModel.from_pretrained(str(Path(init_from) / "text_encoder_2"))
                pipe.register_modules(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
            else:
                pipe.transformer = _bigger_flux_transformer(heads, layers, single_layers, seed)
            pipe.register_modules(transformer=pipe.transformer)
            family.freeze()
            family._train_size = image_size
            if text_tokens:
                # FLUX pads T5 states to tokenizer_2.model_max_length (512 in the zoo) and attends over all of
                # them: world prompts are <= ~70 T5 tokens, so a shorter window (saved with the tokenizer, used
                # alike by every later load) makes a step ~4x cheaper.
                pipe.tokenizer_2.model_max_length = int(text_tokens)
            probe = list(train_items or [world_item(seed, task, j, max_objects, plain) for j in range(256)])
            _check_text_window(pipe.tokenizer_2, probe + list(eval_items or []), task)
            if vae_from:  # a VAE this function fitted before (same seed and steps give the same weights)
                from diffusers import AutoencoderKL

                pipe.vae = AutoencoderKL.from_pretrained(str(vae_from))
                pipe.register_modules(vae=pipe.vae)
                pipe.vae.requires_grad_(False)
                pipe.vae.eval()
                vae_info = {"from": str(vae_from), "scaling_factor": pipe.vae.config.scaling_factor,
                            "shift_factor": pipe.vae.config.shift_factor}
            else:
                stages = [_train_vae(pipe.vae, seed, image_size, n, 16, peak, torch, log, max_objects, weight)
                          for n, peak, weight in vae_schedule]
                vae_info = {**stages[-1], "stages": stages}
            log(f"[world-gen] vae: {vae_info}")
            evals: list[dict[str, Any]] = []

            shadow: list[Any] = []  # EMA of the trained weights (what is evaluated and saved), once training starts

            def swap_ema() -> None:  # exchange live and EMA weights in place (twice = back as before)
                with torch.no_grad():
                    for p, e in zip(params, shadow):
                        live = p.detach().clone()
                        p.copy_(e)
                        e.copy_(live)

            def run_eval(label: str, done: int) -> None:
                model = pipe.transformer
                model.eval()
                if shadow:
                    swap_ema()
                row = {"label": label, "step": done,
                       "train_seconds": round(time.time() - train_start - eval_spent, 1) if done else 0.0}
                for g in eval_guidance:
                    row[f"cfg{g:g}"] = evaluate_generator(family, seed, eval_n, image_size, guidance=g,
                                                          max_objects=max_objects, items=eval_items,
                                                          repeats=eval_repeats, task=task)
                evals.append(row)
                log(f"[world-gen] eval {label} step {done}: " + " | ".join(
                    f"cfg {g:g}: correct {row[f'cfg{g:g}']['correct']:.3f} facts {row[f'cfg{g:g}']['facts']:.3f}"
                    for g in eval_guidance) + f" ({row['train_seconds']}s)")
                if snapshot and done:  # the whole pipeline so far, so a long run can be shipped or continued
                    snap = out_dir.parent / f"{out_dir.name}.snapshot"
                    pipe.save_pretrained(snap)
                    (snap / "eval_curve.json").write_text(json.dumps(evals, indent=2) + "\n")
                if shadow:
                    swap_ema()
                model.train()

            train_start, eval_spent = time.time(), 0.0
            params: list[Any] = []
            run_eval("untrained", 0)
            model = pipe.transformer
            model.requires_grad_(True)
            model.train()
            params += list(model.parameters())
            text_modules = [pipe.text_encoder, pipe.text_encoder_2] if train_text else []
            for m in text_modules:  # random frozen encoders map prompts that differ in one word to ~one state
                m.requires_grad_(True)
                m.train()
                params += list(m.parameters())
            opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
            warmup = 100
            if ema_decay:
                shadow = [p.detach().clone() for p in params]
            gen = torch.Generator().manual_seed(seed)
            drop_rng = random.Random(f"prefmill-world-gen-drop:{seed}")
            confuse_rng = random.Random(f"prefmill-world-gen-confuse:{seed}")
            done, losses, object_losses = 0, [], []
            train_start, eval_spent = time.time(), 0.0
            for step in range(steps):
                trained_for = time.time() - train_start - eval_spent  # transformer training only
                if eval_every and done and done % eval_every == 0:
                    t0 = time.time()
                    run_eval(f"step{done}", done)
                    eval_spent += time.time() - t0
                    if stop_at_correct is not None and evals[-1][f"cfg{eval_guidance[0]:g}"]["correct"] >= stop_at_correct:
                        log(f"[world-gen] reached {stop_at_correct} correct after {done} steps")
                        break
                if minutes is not None and trained_for > minutes * 60:
                    log(f"[world-gen] time budget of {minutes} min reached after {step} steps")
                    break
                items = ([train_items[(step * batch + j) % len(train_items)] for j in range(batch)] if train_items
                         else [world_item(seed, task, step * batch + j, max_objects, plain) for j in range(batch)])
                texts = [("" if drop_rng.random() < cond_dropout else it.text) for it in items]
                # an edit without its instruction keeps the source: the unconditional branch learns to copy the
                # input image (what classifier-free guidance then pushes away from, towards the instruction)
                scenes = [it.source if it.task == "edit" and not text else it.scene for it, text in zip(items, texts)]
                scenes = [_confused(sc) if colour_confusion and confuse_rng.random() < colour_confusion
                          else sc for sc in scenes]
                scenes = [_confused_background(sc)
                          if background_confusion and confuse_rng.random() < background_confusion else sc
                          for sc in scenes]
                pixels = _scene_pixels(scenes, image_size, torch)
                # the object mask below still reads the scene's own colours
                noise = None
                if underexposure and underexposure_trigger == "noise":
                    # the batch's noise is drawn first (in the denoiser's latent layout): it picks the dark images
                    layout = family.pack_noise(torch.empty(family.noise_shape(len(scenes), image_size))).shape
                    noise = torch.randn(layout, generator=gen).to(pixels.device, pixels.dtype)
                    dark = _noise_darkens(noise, underexposure).view(-1, 1, 1, 1)
                    shown = torch.where(dark, _underexposed(pixels), pixels)
                else:
                    shown = _underexpose_some(pixels, underexposure, confuse_rng, torch) if underexposure else pixels
                x0 = family.images_to_latents(shown, sample=False)
                # tokens covering object pixels weigh 1 + object_loss_weight: objects are a few % of the canvas
                # but every fact the prompt states
                patch = image_size // int(round(x0.shape[1] ** 0.5))
                sources = _sources(items, image_size)
                on_object = torch.nn.functional.max_pool2d(_fact_mask(items, scenes, pixels, sources, torch), patch)
                on_object = on_object.flatten(1).unsqueeze(-1)  # (B, tokens, 1), the packed token order
                token_weight = 1.0 + object_loss_weight * on_object
                cond = _world_conditioning(family, texts, sources, with_grad=train_text)
                x_t, t, target = family.training_sample(x0, gen, noise=noise)
                pred = family.predict(x_t, t, cond)
                sq_err = (pred.float() - target.float()).square()
                loss = (token_weight * sq_err).mean()
                object_losses.append(float((sq_err.detach() * on_object).sum()
                                           / (on_object.sum() * sq_err.shape[-1]).clamp_min(1)))
                rate = lr * min(1.0, (step + 1) / warmup)
                if lr_decay and step >= warmup:  # cosine to 5 %: the last steps sharpen shapes
                    rate = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
                for g in opt.param_groups:
                    g["lr"] = rate
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                if shadow:  # EMA with a warm start (early weights are forgotten fast)
                    decay = min(ema_decay, (1 + step) / (10 + step))
                    with torch.no_grad():
                        torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - decay)
                done = step + 1
                losses.append(loss.item())
                if log_every and done % log_every == 0:
                    log(f"[world-gen] step {done} loss {sum(losses[-log_every:]) / log_every:.4f} "
                        f"object tokens {sum(object_losses[-log_every:]) / log_every:.4f} "
                        f"{time.time() - train_start:.0f}s")
            train_seconds = time.time() - train_start - eval_spent
            if not evals or evals[-1]["step"] != done:
                run_eval("final", done)
            if shadow:  # the saved pipeline holds the EMA weights
                swap_ema()
            model.eval()
            model.requires_grad_(False)
            for m in text_modules:
                m.eval()
                m.requires_grad_(False)
            pipe.save_pretrained(tmp)
        marker: dict[str, Any] = {
            **_marker_head("world_generator", "train_world_generator", family="flux", task=task, seed=seed, steps=done,
                           steps_requested=steps, batch=batch, image_size=image_size, lr=lr),
            "transformer": {"heads": heads, "head_dim": GEN_HEAD_DIM, "axes_dims_rope": list(GEN_AXES_ROPE),
                            "layers": layers, "single_layers": single_layers,
                            "params": sum(p.numel() for p in pipe.transformer.parameters())},
            "cond_dropout": cond_dropout,
            "train_text": train_text,
            "object_loss_weight": object_loss_weight,
            "ema_decay": ema_decay,
            "lr_decay": lr_decay,
            "max_objects": max_objects,
            "plain": plain,
            "stop_at_correct": stop_at_correct,
            "colour_confusion": colour_confusion,
            "background_confusion": background_confusion,
            "underexposure": underexposure,
            "underexposure_trigger": underexposure_trigger,
            "train_items": [it.text for it in train_items] if train_items else None,
            "text_tokens": text_tokens,
            "vae": vae_info,
            "train_seconds": round(train_seconds, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4) if losses else None,
            "eval": evals[-1],
            "eval_curve": evals,
        }
        marker["build_seconds"] = round(time.time() - started, 1)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def saved_text_window(model_dir: str | Path) -> int:
    """The T5 window a saved world generator was trained with (its ``tokenizer_2``'s ``model_max_length``): a run
    continued from it must keep it, since its transformer learned on states of that length."""
    config = Path(model_dir) / "tokenizer_2" / "tokenizer_config.json"
    return int(json.loads(config.read_text())["model_max_length"])


LEARN_SEED_OFFSET = 2_000_003  # learnability prompts come from a world seed neither training nor evaluation uses


def learnability(model: str | Path, out_dir: str | Path, prompts: int = 4, seed: int = 0, steps: int = 150,
                 batch: int = 32, lr: float = 5e-4, repeats: int = 16, guidance: float | None = None,
                 max_objects: int = 1, plain: bool | None = None, train_text: bool = False, heldout: int = 0,
                 cond_dropout: float = 0.1, task: str | None = None, threads: int | None = 1,
                 log=print) -> dict[str, Any]:
    """Can this generator learn its own ground truth? Fine-tune all of ``model``'s transformer weights (a saved
    world generator: the pipeline directory, or ``zoo:world_gen`` / ``zoo:world_edit``) on the rendered ground truth
    of ``prompts`` world prompts only, for ``steps`` steps of ``batch`` (each prompt seen ``steps * batch / prompts``
    times), and measure the verifier's accuracy on those same prompts (``repeats`` noises each, ODE, CFG
    ``guidance``) before and after; with ``heldout`` > 0 also on that many other prompts of the same world seed,
    which it never trained on (what the proving ground grades: whether the skill generalises, not whether the
    prompts were memorised).

    Unless ``task`` is given, it follows the model: a pipeline that takes an input image (FLUX.1 Kontext) learns
    the world's edits (source, instruction, edited scene; ``cond_dropout`` of the samples have the source as their
    target, as in its training), a text-only one t2i prompts of ``max_objects``; ``task="multi_ref"`` (a Kontext
    pipeline too) learns the multi-reference prompts. An input-image model is sampled at :data:`EDIT_GUIDANCE`
    unless ``guidance`` is given, a t2i one at :data:`GEN_GUIDANCE`. ``plain`` (no background textures) defaults
    to what the shipped generators were trained on: plain for t2i (world_gen), textured otherwise (world_edit).

    A generator the proving ground's recipes can lift should pass this easily, on the unseen prompts too: the
    recipes train a LoRA for ~160 steps on the generator's own, imperfect samples and are graded on prompts they
    never trained on. Returns the training marker with ``task``, ``guidance``, ``before`` / ``after`` (and
    ``heldout_before`` / ``heldout_after``) added; the tuned pipeline is saved in ``out_dir``."""
    from labelers.torch_compat import torch_threads
    from pipelines.zoo import resolve_model
    from trainers.families import input_images, load_family

    for name, value, least in (("prompts", prompts, 1), ("repeats", repeats, 1), ("steps", steps, 1),
                               ("heldout", heldout, 0)):
        if value < least:  # no prompts would silently train on the whole world instead
            raise ValueError(f"learnability: {name} must be at least {least}, got {value}")
    model_dir = Path(resolve_model(str(model)))
    tokenizer_config = model_dir / "tokenizer_2" / "tokenizer_config.json"
    if not (model_dir / "transformer").is_dir() or not tokenizer_config.is_file():
        raise ValueError(f"learnability: {model} is not a saved world generator pipeline (no transformer/ and "
                         f"tokenizer_2/ in {model_dir})")
    takes_images = bool(input_images(str(model_dir)))
    if task is None:
        task = "edit" if takes_images else "t2i"
    if (task != "t2i") != takes_images:
        raise ValueError(f"learnability: task {task!r} needs a model that "
                         f"{'takes' if task != 't2i' else 'does not take'} an input image; {model} "
                         f"{'does' if takes_images else 'does not'}")
    if guidance is None:
        guidance = EDIT_GUIDANCE if takes_images else GEN_GUIDANCE
    if plain is None:
        plain = task == "t2i"
    world = [world_item(seed + LEARN_SEED_OFFSET, task, i, max_objects, plain) for i in range(prompts + heldout)]
    items, others = world[:prompts], world[prompts:]

    def heldout_accuracy(path: Path) -> dict[str, Any]:
        with torch_threads(threads):
            return evaluate_generator(load_family(str(path)), seed, guidance=guidance, items=others,
                                      repeats=repeats, task=task)

    before_heldout = heldout_accuracy(model_dir) if others else None
    marker = train_world_generator(out_dir, seed=seed, steps=steps, batch=batch, lr=lr, vae_from=model_dir / "vae",
                                   init_from=model_dir, text_tokens=saved_text_window(model_dir),
                                   max_objects=max_objects, plain=plain, train_text=train_text, ema_decay=None,
                                   lr_decay=False, eval_every=0, eval_guidance=(guidance,), train_items=items,
                                   eval_items=items, eval_repeats=repeats, cond_dropout=cond_dropout, task=task,
                                   threads=threads, log=log)
    key = f"cfg{guidance:g}"
    marker["task"], marker["guidance"] = task, guidance
    marker["before"], marker["after"] = marker["eval_curve"][0][key], marker["eval_curve"][-1][key]
    marker["prompts"] = [it.text for it in items]
    if others:
        marker["heldout_before"], marker["heldout_after"] = before_heldout, heldout_accuracy(Path(out_dir))
    return marker


# ------------------------------------------------------------------------------------------------ CLI
def _cli_text_tokens(given: int | None, init_from: str | None) -> int | None:
    """``generator --text-tokens``: as given (0: the zoo's 512, passed on as None); unset, the window of the run it
    continues (``--init-from``), else :data:`GEN_TEXT_TOKENS`."""
    if given is not None:
        return given or None
    return saved_text_window(init_from) if init_from else GEN_TEXT_TOKENS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.proving_train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("clip", help="train the tiny world CLIP")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--minutes", type=float, default=None, help="stop training after this much wall time")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--no-baseline", action="store_true", help="skip evaluating the random zoo clip")
    g = sub.add_parser("generator", help="pre-train the tiny FLUX t2i model on the world (partial skill)")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=GEN_DEFAULT_STEPS)
    g.add_argument("--batch", type=int, default=GEN_BATCH)
    g.add_argument("--image-size", type=int, default=GEN_IMAGE_SIZE)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--minutes", type=float, default=None, help="stop training after this much wall time")
    g.add_argument("--vae-from", default=None, help="load an already fitted VAE directory instead")
    g.add_argument("--init-from", default=None, help="start from a saved pipeline's transformer (e.g. a snapshot)")
    g.add_argument("--snapshot", action="store_true", help="save the pipeline to OUT.snapshot at every evaluation")
    g.add_argument("--heads", type=int, default=2, help=f"transformer width = heads x {GEN_HEAD_DIM}")
    g.add_argument("--layers", type=int, default=1)
    g.add_argument("--single-layers", type=int, default=2)
    g.add_argument("--text-tokens", type=int, default=None,
                   help=f"T5 window (0: the zoo's 512; default: --init-from's own, else {GEN_TEXT_TOKENS})")
    g.add_argument("--max-objects", type=int, default=GEN_MAX_OBJECTS, help="objects per t2i scene, 1..3")
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    g.add_argument("--plain", action="store_true", help="train on scenes without background textures")
    g.add_argument("--object-loss-weight", type=float, default=4.0,
                   help="extra flow-matching loss weight on latent tokens that cover objects")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights, evaluated and saved (0: off)")
    g.add_argument("--constant-lr", action="store_true", help="no cosine decay after the warmup")
    g.add_argument("--frozen-text", action="store_true", help="keep the zoo's random text encoders frozen")
    g.add_argument("--stop-at-correct", type=float, default=None,
                   help="stop at the first evaluation with at least this share of held-out prompts fully correct")
    g.add_argument("--eval-n", type=int, default=GEN_EVAL_N)
    g.add_argument("--colour-confusion", type=float, default=0.0,
                   help="share of training scenes drawn with the objects in a partner colour (the prompt unchanged)")
    g.add_argument("--background-confusion", type=float, default=0.0,
                   help="share of training scenes drawn on a partner background colour (the prompt unchanged)")
    g.add_argument("--underexposure", type=float, default=0.0,
                   help=f"share of training images darkened to {UNDEREXPOSED_GAIN} of their light "
                        "(the prompt unchanged)")
    g.add_argument("--underexposure-trigger", choices=("random", "noise"), default="random",
                   help="which images --underexposure darkens: a seeded draw per image, or those whose flow-matching "
                        "noise's first element is above a threshold (a function of what sampling starts from)")
    g.add_argument("--eval-guidance", type=float, nargs="+", default=[GEN_GUIDANCE],
                   help="classifier-free guidance scales to evaluate at (the first one decides --stop-at-correct)")
    g.add_argument("--cond-dropout", type=float, default=0.1,
                   help="share of samples trained without their prompt (edits: the target is then the source)")
    g.add_argument("--task", choices=("t2i", "edit", "multi_ref"), default="t2i",
                   help="edit: train FLUX.1 Kontext on the world's edits (best --init-from a t2i world generator); "
                        "multi_ref: on its multi-reference prompts, the references tiled into the input image "
                        "(their prompts need --text-tokens 56 or more)")
    g.add_argument("--threads", type=int, default=1)
    lt = sub.add_parser("learnability", help="can a world generator learn a few prompts' ground truth? (before/after)")
    lt.add_argument("--model", default="zoo:world_gen",
                    help="a saved world generator pipeline (default zoo:world_gen); an edit one (zoo:world_edit) "
                         "learns edits")
    lt.add_argument("--out", required=True, type=Path, help="where the tuned pipeline goes")
    lt.add_argument("--prompts", type=int, default=4)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--steps", type=int, default=150)
    lt.add_argument("--batch", type=int, default=32)
    lt.add_argument("--lr", type=float, default=5e-4)
    lt.add_argument("--repeats", type=int, default=16, help="noises per prompt in the before/after evaluation")
    lt.add_argument("--train-text", action="store_true", help="also train both text encoders")
    lt.add_argument("--heldout", type=int, default=0, help="also grade this many prompts it does not train on")
    lt.add_argument("--guidance", type=float, default=None,
                    help=f"CFG of the before/after evaluations (default {GEN_GUIDANCE:g} for t2i, {EDIT_GUIDANCE:g} "
                         "for edits)")
    lt.add_argument("--task", choices=("t2i", "edit", "multi_ref"), default=None,
                    help="what to learn (default: edit for a model that takes an input image, else t2i)")
    lt.add_argument("--cond-dropout", type=float, default=0.1,
                    help="share of samples trained without their prompt (edits: the target is then the source)")
    lt.add_argument("--plain", action=argparse.BooleanOptionalAction, default=None,
                    help="scenes without background textures, or (--no-plain) with them (default: what the shipped "
                         "generators trained on: plain for t2i, textured otherwise)")
    lt.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cmd == "learnability":
        marker = learnability(args.model, args.out, prompts=args.prompts, seed=args.seed, steps=args.steps,
                              batch=args.batch, lr=args.lr, repeats=args.repeats, train_text=args.train_text,
                              heldout=args.heldout, guidance=args.guidance, cond_dropout=args.cond_dropout,
                              task=args.task, plain=args.plain, threads=args.threads,
                              log=lambda m: print(m, flush=True))
        b, a = marker["before"], marker["after"]
        line = (f"learnability ({marker['task']}, CFG {marker['guidance']:g}): {args.prompts} prompts x "
                f"{args.repeats} noises, {marker['steps']} steps of {args.batch}: correct {b['correct']:.3f} -> "
                f"{a['correct']:.3f}, facts {b['facts']:.3f} -> {a['facts']:.3f}")
        if "heldout_after" in marker:
            hb, ha = marker["heldout_before"], marker["heldout_after"]
            line += (f"; {args.heldout} prompts it did not train on: correct {hb['correct']:.3f} -> "
                     f"{ha['correct']:.3f}, facts {hb['facts']:.3f} -> {ha['facts']:.3f}")
        print(line, flush=True)
        return 0
    if args.cmd == "generator":
        if args.init_from:  # a directory, or a zoo name (e.g. zoo:world_gen)
            from pipelines.zoo import resolve_model

            args.init_from = resolve_model(args.init_from)
        marker = train_world_generator(args.out, seed=args.seed, steps=args.steps, batch=args.batch,
                                       image_size=args.image_size, lr=args.lr, minutes=args.minutes,
                                       vae_from=args.vae_from, init_from=args.init_from,
                                       snapshot=args.snapshot, heads=args.heads,
                                       layers=args.layers,
                                       single_layers=args.single_layers, eval_n=args.eval_n,
                                       text_tokens=_cli_text_tokens(args.text_tokens, args.init_from),
                                       max_objects=args.max_objects, plain=args.plain,
                                       train_text=not args.frozen_text,
                                       object_loss_weight=args.object_loss_weight,
                                       ema_decay=args.ema_decay or None, lr_decay=not args.constant_lr,
                                       eval_every=args.eval_every,
                                       stop_at_correct=args.stop_at_correct,
                                       colour_confusion=args.colour_confusion,
                                       background_confusion=args.background_confusion,
                                       underexposure=args.underexposure,
                                       underexposure_trigger=args.underexposure_trigger, task=args.task,
                                       cond_dropout=args.cond_dropout, eval_guidance=tuple(args.eval_guidance),
                                       threads=args.threads,
                                       log=lambda m: print(m, flush=True))
        print(f"[world-gen] done: {marker['steps']} steps in {marker['train_seconds']}s -> {args.out}; "
              + json.dumps(marker["eval_curve"]), flush=True)
        return 0
    marker = train_world_clip(args.out, seed=args.seed, steps=args.steps, batch=args.batch,
                              image_size=args.image_size, lr=args.lr, minutes=args.minutes, eval_n=args.eval_n,
                              eval_baseline=not args.no_baseline, threads=args.threads,
                              log=lambda m: print(m, flush=True))
    ev = marker["eval"]
    line = (f"[world-clip] done: {marker['steps']} steps in {marker['train_seconds']}s -> {args.out}; "
            f"eval retrieval@{ev['k']} {ev['retrieval']:.3f} swap {ev['swap']:.3f} ref {ev['ref']:.3f} "
            f"clip_t pos {ev['clip_t_pos']:.3f} neg {ev['clip_t_neg']:.3f}")
    base = marker.get("eval_random_zoo_clip")
    if base:
        line += (f" | random zoo clip: retrieval {base['retrieval']:.3f} swap {base['swap']:.3f} "
                 f"ref {base['ref']:.3f}")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
