"""Each TransformersJudge speed-up on and off, on the tiny zoo judge (CPU, greedy), same items, alternating rounds.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/judge_speedups.py [--images 32]
        [--batch-size 16] [--repeats 3] [--max-new-tokens 256] [--device cpu]

Variants: all on (the default), prefix_cache off, preallocated_cache off (prefix cache on, plain DynamicCache),
gqa_attention off, all off. Prints best/median wall seconds per variant, the slowdown of each against all-on,
and whether every variant's raw answers equal all-on's (greedy: they must).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from judge import pil_images, prompts  # noqa: E402  (bench/judge.py)

VARIANTS = {
    "all_on": {},
    "no_prefix_cache": {"prefix_cache": False},
    "no_preallocated": {"preallocated_cache": False},
    "no_gqa_attention": {"gqa_attention": False},
    "all_off": {"prefix_cache": False, "preallocated_cache": False, "gqa_attention": False},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="t2i")
    args = ap.parse_args()

    from labelers.judge import JudgeItem, TransformersJudge

    imgs, texts = pil_images(args.images), prompts(args.images)
    items = [JudgeItem(f"k{i}", args.task, t, im, source_image=im if args.task == "edit" else None,
                       reference_images=(im,) if args.task == "multi_ref" else ())
             for i, (t, im) in enumerate(zip(texts, imgs))]
    judges = {}
    for name, kw in VARIANTS.items():
        j = TransformersJudge("zoo:judge", device=args.device, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, cpu_threads=1, temperature=0.0, **kw).setup()
        j.judge(items[: args.batch_size])  # warm-up: load, grammar compile, first prefill
        judges[name] = j
    walls = {name: [] for name in judges}
    answers = {}
    for _ in range(args.repeats):
        for name, j in judges.items():
            t0 = time.perf_counter()
            res = j.judge(items)
            walls[name].append(time.perf_counter() - t0)
            answers[name] = [(r.status, r.raw) for r in res]
    base = min(walls["all_on"])
    print(f"device={args.device} images={args.images} batch={args.batch_size} task={args.task} "
          f"max_new_tokens={args.max_new_tokens} repeats={args.repeats} torch_threads=1")
    for name, j in judges.items():
        ok = sum(s == "ok" for s, _ in answers[name])
        print(f"{name:18s} best {min(walls[name]):6.2f} s  median {statistics.median(walls[name]):6.2f} s  "
              f"x{min(walls[name]) / base:4.2f} vs all_on  ok {ok}/{len(items)}  "
              f"identical_to_all_on={answers[name] == answers['all_on']}  prefix_active={j.prefix_cache_active} "
              f"gqa_active={j.cpu_gqa_attention} stats={dict(j.stats)}")


if __name__ == "__main__":
    main()
