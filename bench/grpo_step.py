"""Time per GRPO step on every family's tiny model, and the SDE window vs full-trajectory training.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/grpo_step.py [--families sd,sdxl,sd3,flux,qwen_image] [--steps 3]
                                                         [--sample-steps 4] [--size 32] [--window-family qwen_image]
                                                         [--window-size 1] [--rounds 5]

Runs the real GRPO trainer (:func:`trainers.grpo.train`, ``reward_fn=None``: the CLIP λ-Harmonic reward with
``clip_model`` = the tiny zoo CLIP) on each family's tiny zoo model (``zoo:t2i`` for sd, ``zoo:sdxl``, ``zoo:sd3``,
``zoo:flux``, ``zoo:qwen_image_edit`` for qwen_image; built once under the default zoo root if missing), on CPU,
one torch thread, no mixed precision, for ``--steps`` optimizer steps in a fresh output dir (so nothing resumes).
The pool is a few t2i prompts (qwen_image: plus multi_ref rows with two reference images each), no held-out rows,
so a step is exactly sample → reward → update. The first step is a warm-up (first forward passes, allocator,
lazy inits) and is discarded; the table gives the mean of the others from ``metrics.jsonl``: ``sample_time``
(policy sampling, recording the trajectory and its log-probabilities, VAE decode), ``reward_time`` (CLIP scoring,
advantages, DAR), ``train_time`` (re-evaluating the recorded transitions with gradients, reference pass for the
KL, backward, AdamW) and ``step_time``.

Then, on ``--window-family`` (a flow family), the SDE window (``sde_window_size=--window-size``: only that many
consecutive sampler steps stochastic and trained, ODE elsewhere) against full-trajectory training
(``sde_window_size=0``: every sampler step stochastic and trained), at equal samples: same group_size,
prompts_per_step, sample_steps, seed (so the same prompts each step). The two alternate for ``--rounds`` rounds
(window, full, window, full, ...) so background load hits both alike; each way's figure is the median of its
post-warm-up step times over all rounds. The last line is ``ratio=<window step time / full step time>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# family -> zoo component of its tiny model
ZOO_NAMES = {"sd": "t2i", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "qwen_image": "qwen_image_edit"}
MULTI_REF = {"qwen_image"}  # families whose tiny model takes several reference images: the pool gets multi_ref rows
CAPTIONS = ["a red square on grass", "a blue circle at night", "a green field under a yellow sun",
            "a black cat on a white sofa", "a watercolor of a lighthouse", "a bowl of ramen, studio photo"]
COLOURS = [(200, 40, 40), (40, 40, 200), (40, 180, 60), (20, 20, 20), (230, 230, 230), (220, 180, 40)]
PHASES = ("sample_time", "reward_time", "train_time", "step_time")


def write_pool(root: Path, size: int, multi_ref: bool) -> str:
    """A small rl_prompt_pool parquet: 6 t2i prompts (+ 4 multi_ref prompts with two reference images each)."""
    import polars as pl
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    refs = []
    for k, colour in enumerate(COLOURS[:4]):
        im = Image.new("RGB", (size, size), colour)
        ImageDraw.Draw(im).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=COLOURS[(k + 2) % 6])
        path = root / f"ref_{k}.png"
        im.save(path)
        refs.append(str(path))
    rows = [{"prompt_id": f"t{i}", "task": "t2i", "text": text, "source_image": None, "reference_images": [],
             "reference_types": [], "split": "train", "difficulty": 0.5} for i, text in enumerate(CAPTIONS)]
    if multi_ref:
        rows += [{"prompt_id": f"m{i}", "task": "multi_ref", "text": f"the subject of the first image, {CAPTIONS[i]}",
                  "source_image": None, "reference_images": [refs[i], refs[(i + 1) % 4]],
                  "reference_types": ["subject", "style"], "split": "train", "difficulty": 0.5} for i in range(4)]
    path = root / ("pool_multi_ref.parquet" if multi_ref else "pool_t2i.parquet")
    pl.DataFrame(rows, schema_overrides={"reference_images": pl.List(pl.String), "source_image": pl.String,
                                         "reference_types": pl.List(pl.String)}).write_parquet(path)
    return str(path)


def run_grpo(model: str, clip: str, pool: str, args, **overrides) -> list[dict]:
    """One fresh GRPO run (own temporary output dir); returns its metrics.jsonl records."""
    from trainers.grpo import GRPOConfig, train

    with tempfile.TemporaryDirectory(prefix="grpo_step_") as out:
        cfg = GRPOConfig(pretrained_model=model, clip_model=clip, prompt_pool=pool, output_dir=out,
                         resolution=args.size, lora_rank=2, num_steps=args.steps, sample_steps=args.sample_steps,
                         group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                         train_micro_batch=args.group_size * args.prompts_per_step, heldout_every=0,
                         checkpoint_every=0, resume=False, mixed_precision="no", device="cpu", num_threads=1,
                         **overrides)
        train(cfg)  # reward_fn=None: ClipReward(cfg) with cfg.clip_model
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def timed(records: list[dict]) -> list[dict]:
    """The records after the warm-up step."""
    if len(records) < 2:
        raise SystemExit("--steps must be >= 2 (the first step is a warm-up)")
    return records[1:]


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd,sdxl,sd3,flux,qwen_image")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per run; the first is a warm-up")
    parser.add_argument("--sample-steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--window-family", default="qwen_image", help="'' skips the window comparison")
    parser.add_argument("--window-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="window/full rounds (alternating)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import trainers  # noqa: F401  (torchvision shim before diffusers)
    from pipelines.zoo import build_zoo

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families + ([args.window_family] if args.window_family else []) if f not in ZOO_NAMES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(ZOO_NAMES)}")
    started = time.perf_counter()
    needed = sorted({ZOO_NAMES[f] for f in families + ([args.window_family] if args.window_family else [])})
    zoo = {name: str(path) for name, path in build_zoo(only=[*needed, "clip"]).items()}
    print(f"# zoo ready ({', '.join(needed)}, clip) in {time.perf_counter() - started:.1f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="grpo_step_pool_"))
    try:
        return _run(args, families, zoo, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, families: list[str], zoo: dict[str, str], work: Path, started: float) -> float:
    pools = {False: write_pool(work / "t2i", args.size, False), True: write_pool(work / "multi_ref", args.size, True)}
    n_traj = args.group_size * args.prompts_per_step
    print(f"size={args.size} steps={args.steps} (first discarded) sample_steps={args.sample_steps} "
          f"group_size={args.group_size} prompts_per_step={args.prompts_per_step} ({n_traj} trajectories/step) "
          f"lora_rank=2 cpu threads=1 mixed_precision=no reward=CLIP (zoo:clip) (os cpus: {os.cpu_count()})")

    rows = []
    for fam in families:
        t0 = time.perf_counter()
        recs = timed(run_grpo(zoo[ZOO_NAMES[fam]], zoo["clip"], pools[fam in MULTI_REF], args))
        mean = {k: statistics.fmean(r[k] for r in recs) for k in PHASES}
        rows.append((fam, ZOO_NAMES[fam], recs[0]["trained_timesteps"], mean, time.perf_counter() - t0))
        print(f"# {fam}: run {time.perf_counter() - t0:.1f} s", flush=True)

    if rows:
        print()
        print("| family | zoo model | trained steps | sampling | reward | training | step |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for fam, name, n_t, m, _ in rows:
            print(f"| {fam} | zoo:{name} | {n_t} | {m['sample_time']:.3f} s | {m['reward_time']:.3f} s | "
                  f"{m['train_time']:.3f} s | {m['step_time']:.3f} s |")
        print(flush=True)

    if not args.window_family:
        print(f"# total {time.perf_counter() - started:.1f} s")
        return float("nan")
    fam = args.window_family
    model, pool = zoo[ZOO_NAMES[fam]], pools[fam in MULTI_REF]
    ways = {"window": {"sde_window_size": args.window_size}, "full": {"sde_window_size": 0}}
    steps: dict[str, list[dict]] = {name: [] for name in ways}
    round_means: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, over in ways.items():
            recs = timed(run_grpo(model, zoo["clip"], pool, args, **over))
            steps[name] += recs
            round_means[name].append(statistics.fmean(r["step_time"] for r in recs))
    med = {}
    print(f"{fam} (zoo:{ZOO_NAMES[fam]}), {n_traj} trajectories x {args.sample_steps} sampler steps, "
          f"{args.rounds} alternating rounds, median over {len(steps['window'])} steps each:")
    for name in ways:
        recs = steps[name]
        med[name] = statistics.median(r["step_time"] for r in recs)
        part = {k: statistics.median(r[k] for r in recs) for k in PHASES[:3]}
        windows = sorted({str(r["sde_window"]) for r in recs})
        print(f"{name:>7}: sde_window_size={ways[name]['sde_window_size']} trained steps "
              f"{recs[0]['trained_timesteps']} (windows {', '.join(windows)}): step {med[name]:.3f} s = sampling "
              f"{part['sample_time']:.3f} + reward {part['reward_time']:.3f} + training {part['train_time']:.3f}; "
              f"round means [{' '.join(f'{v:.3f}' for v in round_means[name])}] s")
    ratio = med["window"] / med["full"]
    print(f"# total {time.perf_counter() - started:.1f} s")
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
