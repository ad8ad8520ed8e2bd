"""The proving ground's report: how much each training recipe improved the base model, measured by the verifier on
held-out prompts (never the training reward). Dagster-free; ``assets/proving.py`` calls it.

* :func:`evaluate_weights` generates ``seeds`` images per held-out prompt with the base model or an adapter (the same
  seeds for every recipe), checks each with :func:`labelers.verifier.verify` and scores it with the profile's CLIP:
  per prompt, ``accuracy`` is the share of its images with every stated fact true.
* :func:`bootstrap_interval`: the 95 % percentile interval of the mean accuracy, resampling prompts.
* CLIP-T is the image-text similarity of the profile's CLIP (the world CLIP in the proving profile); CLIP-I is the
  image's similarity to its reference images, or for t2i (no references) to the base model's image of the same
  prompt and seed — how far a recipe moved away from what the base drew.
* :func:`plot_curves` draws accuracy against training steps (PIL, no plotting dependency) to a PNG.
* :func:`prove_line`: ``prove: base=<x> best=<y> best_recipe=<name> shuffled=<z> verifier_reward=<w>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# recipe -> (the run directory name under runs/, what it is)
RECIPES: dict[str, tuple[str, str]] = {
    "sft": ("sft", "LoRA SFT on the SFT corpus (best-rewarded candidates)"),
    "dpo": ("dpo", "Diffusion-DPO on the preference corpus"),
    "grpo": ("grpo_base", "GRPO from the base model, CLIP reward"),
    "sft_grpo": ("grpo", "SFT then GRPO (DyRef's two stages)"),
    "dpo_shuffled": ("dpo_shuffled", "control: DPO on the same pairs with shuffled labels"),
    "grpo_verifier": ("grpo_verifier", "control: GRPO from the base with the verifier as the reward"),
}
CONTROLS = ("dpo_shuffled", "grpo_verifier")


def verify_rows(rows: Sequence[dict[str, Any]], images: Sequence[Any]) -> list[dict[str, Any]]:
    """Per image: ``correct`` (every fact true), ``facts`` (share true) and the failed facts' messages."""
    from labelers.judge import JudgeItem
    from labelers.verifier import verify

    out = []
    for row, image in zip(rows, images):
        item = JudgeItem(key=row["candidate_id"], task=row["task"], text=row["text"], image=image,
                         source_image=row.get("_source"), reference_images=tuple(row.get("_references") or ()))
        v = verify(item)
        out.append({"correct": v.all_passed, "facts": v.fact_share,
                    "failed": "; ".join(f.message for f in v.failed)})
    return out


def bootstrap_interval(per_prompt: Sequence[float], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over prompts."""
    import numpy as np

    values = np.asarray(per_prompt, dtype=np.float64)
    if not len(values):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def evaluate_weights(generator, scorer, prompts: Sequence[dict[str, Any]], seeds: int, adapter: str | None = None,
                     base_images: Sequence[Any] | None = None, references: dict | None = None) -> dict[str, Any]:
    """Verifier accuracy, CLIP-T and CLIP-I of ``generator`` (with ``adapter`` loaded, or the base) on ``prompts``.
    Returns the summary plus ``images`` (for CLIP-I of later recipes) and per-image ``rows``."""
    import numpy as np

    from pipelines.evaluation import eval_requests

    requests, rows = eval_requests(list(prompts), seeds, references=references,
                                   reference_input=getattr(generator, "reference_input", None))
    if adapter:
        generator.load_lora(adapter)
    try:
        images = generator.generate(requests)
    finally:
        if adapter:
            generator.unload_lora()
    refs_of = {p["prompt_id"]: list((references or {}).get(p["prompt_id"]) or ()) for p in prompts}
    for row in rows:
        row["_references"] = refs_of.get(row["prompt_id"])
    checks = verify_rows(rows, images)
    ref_lists = [refs_of.get(r["prompt_id"]) or ([base_images[i]] if base_images is not None else [])
                 for i, r in enumerate(rows)]
    scores = scorer.score(list(images), [r["text"] for r in rows], ref_lists)
    by_prompt: dict[str, list[float]] = {}
    for row, check in zip(rows, checks):
        by_prompt.setdefault(row["prompt_id"], []).append(float(check["correct"]))
    per_prompt = [float(np.mean(v)) for v in by_prompt.values()]
    lo, hi = bootstrap_interval(per_prompt)
    clip_i = [s.clip_i for s in scores if s.clip_i is not None]
    table_rows = [{"prompt_id": r["prompt_id"], "seed": r["seed"], "text": r["text"], "correct": c["correct"],
                   "facts": c["facts"], "failed": c["failed"], "clip_t": float(s.clip_t),
                   "clip_i": None if s.clip_i is None else float(s.clip_i)}
                  for r, c, s in zip(rows, checks, scores)]
    return {
        "accuracy": float(np.mean(per_prompt)) if per_prompt else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "facts": float(np.mean([c["facts"] for c in checks])) if checks else float("nan"),
        "clip_t": float(np.mean([s.clip_t for s in scores])) if scores else float("nan"),
        "clip_i": float(np.mean(clip_i)) if clip_i else None,
        "prompts": len(per_prompt),
        "images": len(images),
        "per_prompt": per_prompt,
        "rows": table_rows,
        "_images": images,
    }


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per recipe (base first), accuracy with its 95 % interval, gain over base, CLIP-T/CLIP-I."""
    base = results["base"]["accuracy"]
    lines = ["| recipe | verifier accuracy | 95 % CI | Δ vs base | facts | CLIP-T | CLIP-I | steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        clip_i = "—" if r.get("clip_i") is None else f"{r['clip_i']:.3f}"
        lines.append(f"| {name} | {r['accuracy']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{100 * (r['accuracy'] - base):+.1f} pt | {r['facts']:.3f} | {r['clip_t']:.3f} | {clip_i} | "
                     f"{r.get('steps', 0)} |")
    return "\n".join(lines)


def best_recipe(results: dict[str, dict[str, Any]]) -> str:
    """The recipe (controls excluded) with the highest verifier accuracy."""
    trained = {k: v for k, v in results.items() if k != "base" and k not in CONTROLS}
    return max(trained, key=lambda k: trained[k]["accuracy"]) if trained else "base"


def prove_line(results: dict[str, dict[str, Any]]) -> str:
    def acc(name: str) -> str:
        return f"{results[name]['accuracy']:.3f}" if name in results else "n/a"

    best = best_recipe(results)
    return (f"prove: base={acc('base')} best={acc(best)} best_recipe={best} shuffled={acc('dpo_shuffled')} "
            f"verifier_reward={acc('grpo_verifier')}")


def pooled_label_agreement(agreements: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``reward_labels``' agreement with the verifier (``labelers.diagnostics.verifier_agreement``), pooled over
    batches: per score (judge, clip, reward) the pairs ordered the verifier's way, ordered, tied, and the rates."""
    pooled: dict[str, dict[str, int]] = {}
    candidates = 0
    for agreement in agreements:
        candidates += int(agreement.get("candidates") or 0)
        for name, counts in (agreement.get("pair_counts") or {}).items():
            into = pooled.setdefault(name, {"agree": 0, "ordered": 0, "tied": 0, "told_apart": 0})
            for key in into:
                into[key] += int(counts.get(key, 0))
    if not pooled:
        return None
    out: dict[str, Any] = {"candidates": candidates}
    for name, c in pooled.items():
        out[name] = {**c, "agreement": c["agree"] / c["ordered"] if c["ordered"] else None,
                     "tie_rate": c["tied"] / c["told_apart"] if c["told_apart"] else None}
    return out


def labels_line(pooled: dict[str, Any] | None) -> str:
    """One sentence on how well the labels could have taught the recipes: the share of same-prompt candidate pairs
    the verifier tells apart that each label orders its way (50 % is chance)."""
    if not pooled:
        return "labels: no agreement with the verifier recorded (checks.verifier_agreement is off)"

    def part(name: str, title: str) -> str:
        c = pooled.get(name)
        if not c or c["agreement"] is None:
            return f"{title} n/a"
        ties = f", ties {100 * c['tie_rate']:.0f} %" if c["tied"] else ""
        return f"{title} {100 * c['agreement']:.1f} % of {c['ordered']}{ties}"

    n = max((c["told_apart"] for k, c in pooled.items() if isinstance(c, dict)), default=0)
    return (f"labels vs the verifier ({pooled['candidates']} candidates, up to {n} same-prompt pairs it tells apart; "
            f"50 % is chance): {part('judge', 'judge')}; {part('clip', 'CLIP-T')}; {part('reward', 'reward')}")


def plot_curves(curves: dict[str, list[tuple[int, float]]], base: float, path, title: str = "") -> None:
    """Accuracy (y, 0..1) against training step (x) per recipe, a dashed line at the base; PNG at ``path``."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 420, 56, 170, 30, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    max_step = max([s for pts in curves.values() for s, _ in pts] + [1])
    ymax = min(1.0, max([a for pts in curves.values() for _, a in pts] + [base]) + 0.1)

    def xy(step: float, acc: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / max_step
        y = height - bottom - (height - top - bottom) * acc / ymax
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):
        acc = ymax * k / 5
        _, y = xy(0, acc)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{acc:.2f}", fill="black")
    for k in range(5):
        step = max_step * k / 4
        x, _ = xy(step, 0)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 8, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((left, 8), title or "held-out verifier accuracy vs training step", fill="black")
    draw.text((width // 2 - 40, height - 16), "training step", fill="black")
    x0, y0 = xy(0, base)
    x1, _ = xy(max_step, base)
    for x in range(int(x0), int(x1), 10):
        draw.line([x, y0, min(x + 5, x1), y0], fill="grey")
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    for k, (name, pts) in enumerate(curves.items()):
        colour = palette[k % len(palette)]
        pts = sorted(pts)
        if len(pts) > 1:
            draw.line([xy(s, a) for s, a in pts], fill=colour, width=2)
        for s, a in pts:
            x, y = xy(s, a)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - right + 10, top + 16 * k), name, fill=colour)
    draw.text((width - right + 10, top + 16 * len(curves)), f"base {base:.2f}", fill="grey")
    img.save(path, format="PNG")


def implicit_preference(model: str, adapter: str, pairs: Sequence[tuple[Any, Any, str]], size: int,
                        draws: int = 8, seed: int = 0) -> list[float]:
    """Diffusion-DPO's implicit preference of ``adapter`` over the base ``model`` for each ``(preferred,
    dispreferred, prompt)`` of t2i ``pairs``: ``(err_base(w) - err_lora(w)) - (err_base(l) - err_lora(l))``, the
    family's prediction errors averaged over ``draws`` shared (noise, t) draws. Positive: training made the
    preferred image relatively more likely."""
    import torch

    from trainers.families import load_family
    from trainers.families.sd import pil_batch_to_tensor
    from trainers.losses import per_sample_mse

    family = load_family(model)
    family._train_size = size
    pipe = family.pipe

    def pixels(images):
        return pil_batch_to_tensor([im.convert("RGB").resize((size, size)) for im in images])

    def errors(latents, cond, gen_seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(gen_seed)
        total = torch.zeros(latents.shape[0])
        for _ in range(draws):
            half = latents.shape[0] // 2
            noise = torch.randn((half, *latents.shape[1:]), generator=gen).repeat(2, *([1] * (latents.ndim - 1)))
            t = family.draw_training_time(half, gen).repeat(2)
            noisy, t, target = family.training_sample(latents, gen, noise=noise, t=t)
            total += per_sample_mse(family.predict(noisy, t, cond), target).float()
        return total / draws

    margins: list[float] = []
    with torch.no_grad():
        for start in range(0, len(pairs), 16):
            part = pairs[start:start + 16]
            px = torch.cat([pixels([p[0] for p in part]), pixels([p[1] for p in part])])
            latents = family.images_to_latents(px, sample=False).float()
            cond = family.encode([p[2] for p in part] * 2)
            base = errors(latents, cond, seed + start)
            pipe.load_lora_weights(adapter)
            try:
                tuned = errors(latents, cond, seed + start)
            finally:
                pipe.unload_lora_weights()
            gain = base - tuned
            n = len(part)
            margins.extend((gain[:n] - gain[n:]).tolist())
    return margins
