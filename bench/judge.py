"""Batched vs one-at-a-time judging with the transformers judge on CPU (issue 3).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/judge.py [--images 32] [--batch-size 16] [--repeats 3]

Judges the same N images twice in one run with ``TransformersJudge("zoo:judge", cpu_threads=1, ...)``: once with
``batch_size=B`` and once with ``batch_size=1`` — same backend, same weights, same settings (by default the
``tiny`` profile's judge section: sampling at its temperature, its max_new_tokens and retries; ``--temperature 0``
for greedy). Each judge warms up first (model load, grammar compile, first prefill); then the two alternate for R
rounds, so background load on a shared machine hits both alike, and the best wall time of each counts.

Images are deterministic PIL drawings (``--source pil``, default) or come from the tiny text-to-image model
(``--source t2i``, ``pipelines.generation.ImageGenerator("zoo:t2i")``). Prints a few lines of figures and, last,
``speedup=<one-at-a-time seconds / batched seconds>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _timing import alternate  # noqa: E402  (bench/ is on sys.path when the script runs)

SUBJECTS = ("a red fox in snow", "a blue car on a bridge", "two cats on a sofa", "a lighthouse at dusk",
            "a bowl of green apples", "a yellow kite over the sea", "a wooden cabin in a forest", "a robot reading")


def prompts(n: int) -> list[str]:
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}" for i in range(n)]


def pil_images(n: int, size: int = 64) -> list:
    """N distinct deterministic RGB images: a coloured background with an ellipse and a bar."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256))
        draw = ImageDraw.Draw(im)
        fill = ((200 + 7 * i) % 256, (13 * i) % 256, (29 * i) % 256)
        draw.ellipse((4 + i % 17, 6 + i % 11, 36 + i % 23, 44 + i % 13), fill=fill)
        draw.rectangle((0, size - 8 - i % 9, size, size - 4), fill=((11 * i) % 256, 220, (3 * i) % 256))
        out.append(im)
    return out


def t2i_images(texts: list[str]) -> list:
    from pipelines.generation import GenerationRequest, ImageGenerator

    gen = ImageGenerator("zoo:t2i", kind="t2i", steps=6, width=64, height=64, batch_size=8, cpu_threads=1)
    gen.setup()
    return gen.generate([GenerationRequest(key=str(i), text=t, seed=i) for i, t in enumerate(texts)])


def judge_settings(args) -> dict:
    """The profile's judge settings (transformers backend keys only), with command-line overrides."""
    from pipelines.profiles import load_profile

    section = dict(load_profile(args.profile)["judge"])
    keep = ("max_new_tokens", "max_retries", "seed", "feedback_max_chars", "retry_temperature", "temperature")
    settings = {k: section[k] for k in keep if k in section}
    if args.temperature is not None:
        settings["temperature"] = args.temperature
    if args.max_new_tokens is not None:
        settings["max_new_tokens"] = args.max_new_tokens
    return settings


def summarize(results) -> str:
    ok = sum(r.status == "ok" for r in results)
    parse = sum(r.status == "parse_error" for r in results)
    gens = sum(r.attempts for r in results)
    return f"ok={ok} parse_error={parse} generations={gens}"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", choices=("pil", "t2i"), default="pil")
    parser.add_argument("--profile", default="tiny", help="judge settings come from this profile's judge section")
    parser.add_argument("--temperature", type=float, default=None, help="override (0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override")
    parser.add_argument("--no-prefix-cache", action="store_true", help="TransformersJudge(prefix_cache=False)")
    args = parser.parse_args(argv)

    from labelers.judge import JudgeItem, TransformersJudge

    texts = prompts(args.images)
    images = pil_images(args.images) if args.source == "pil" else t2i_images(texts)
    items = [JudgeItem(key=f"img-{i}", task="t2i", text=t, image=im) for i, (t, im) in enumerate(zip(texts, images))]
    settings = judge_settings(args)
    extra = {"prefix_cache": False} if args.no_prefix_cache else {}

    judges = {}
    for name, bs in (("batched", args.batch_size), ("one-at-a-time", 1)):
        t0 = time.perf_counter()
        judge = TransformersJudge("zoo:judge", cpu_threads=1, batch_size=bs, **settings, **extra).setup()
        judge.judge(items[: max(2, min(bs, len(items)))])  # warm-up: grammar compile, prefix cache, first prefill
        judges[name] = judge
        print(f"# {name}: batch_size={bs}, setup + warm-up {time.perf_counter() - t0:.1f} s", flush=True)

    last, walls, cpus = alternate({name: (lambda j=judge: j.judge(items)) for name, judge in judges.items()},
                                  args.repeats)

    first = judges["batched"]
    print(f"images={args.images} source={args.source} task=t2i batch_size={args.batch_size} repeats={args.repeats} "
          f"cpu_threads=1 settings={settings} prefix_cache={getattr(first, 'prefix_cache', None)} "
          f"cpu_gqa_attention={getattr(first, 'cpu_gqa_attention', None)} (os cpus: {os.cpu_count()})")
    best = {}
    for name in judges:
        best[name] = min(walls[name])
        runs = " ".join(f"{w:.2f}" for w in walls[name])
        print(f"{name:>14}: best {best[name]:.2f} s wall ({min(cpus[name]):.2f} s cpu), "
              f"{args.images / best[name]:.1f} images/s; runs [{runs}] s; {summarize(last[name])}")
    speedup = best["one-at-a-time"] / best["batched"]
    print(f"speedup={speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
