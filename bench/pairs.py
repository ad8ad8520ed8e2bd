"""Pair building for 1M labelled candidates vs a plain polars sort of the same labels (issue 4).

    .venv/bin/python bench/pairs.py [--prompts 250000] [--per-prompt 4] [--repeats 5]

Builds one labels table of ``--prompts`` × ``--per-prompt`` candidates in shuffled row order: 24-hex-character
``candidate_id`` and ``prompt_id`` (content-hash-like), 64-hex ``image_sha256`` (about 0.5% of the candidates
repeat another candidate's image of the same prompt), three per-dimension scores 0–5 (about 0.5% null) and a
reward from them plus noise; about 1% of the rows are ``parse_error`` without a reward.

Times, alternating in one process (``bench/_timing.py``; after one warm-up run each), best wall time of
``--repeats`` rounds:

* ``sort``: the baseline, ``labels.sort(["prompt_id", "reward"])``;
* ``select_pairs``: ``select_pairs(labels)`` with the defaults (``best_vs_worst``, deterministic labels);
* extra lines: ``all_pairs``, ``top_bottom_k`` (``top_k=1``), ``pareto`` (on the three scores) and ``sampled``
  (the default strategy with ``label_mode="sampled"``).

Prints a line per way (best wall and its CPU seconds, ratio to the sort, pairs made) and last
``ratio=<select_pairs seconds / sort seconds>`` (target: at most 5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _timing import alternate  # noqa: E402  (bench/ is on sys.path when the script runs)

DIMENSIONS = ["aesthetics", "alignment", "artifacts"]


def hex_ids(rng, n: int, nbytes: int):
    """``n`` random lowercase hex strings of ``2 * nbytes`` characters, as a polars Series."""
    import numpy as np
    import polars as pl

    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[rng.integers(0, 16, (n, 2 * nbytes))]
    return pl.Series(np.ascontiguousarray(digits).view(f"S{2 * nbytes}").ravel()).cast(pl.Utf8)


def workload(prompts: int, per_prompt: int, seed: int = 0):
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    n = prompts * per_prompt
    scores = {d: rng.integers(0, 6, n).astype(np.float64) for d in DIMENSIONS}
    for d in DIMENSIONS:
        scores[d][rng.random(n) < 0.005] = np.nan
    reward = np.nanmean(np.stack(list(scores.values())), axis=0) / 5.0 + rng.normal(0.0, 0.05, n)
    status = np.where(rng.random(n) < 0.01, "parse_error", "ok")
    sha = hex_ids(rng, n, 32)
    # about 0.5% of the candidates show the previous candidate's image (same prompt)
    repeat_previous = (rng.random(n) < 0.005) & (np.arange(n) % per_prompt != 0)
    source = np.where(repeat_previous, np.arange(n) - 1, np.arange(n))
    labels = pl.DataFrame({
        "candidate_id": hex_ids(rng, n, 12),
        "prompt_id": hex_ids(rng, prompts, 12).gather(np.repeat(np.arange(prompts), per_prompt)),
        "reward": np.where(status == "ok", reward, np.nan),
        "status": status,
        "image_sha256": sha.gather(source),
        **{d: pl.Series(v).fill_nan(None) for d, v in scores.items()},
    }).with_columns(pl.col("reward").fill_nan(None))
    return labels.sample(fraction=1.0, shuffle=True, seed=seed)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=250_000)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import polars as pl

    from labelers.pairs import select_pairs

    t0 = time.perf_counter()
    labels = workload(args.prompts, args.per_prompt)
    print(f"# labels: {labels.height} rows ({args.prompts} prompts x {args.per_prompt}), "
          f"{(labels['status'] != 'ok').sum()} not ok, built in {time.perf_counter() - t0:.1f} s; "
          f"polars {pl.__version__}, {pl.thread_pool_size()} threads, {os.cpu_count()} cpus", flush=True)

    runs = {
        "sort": lambda: labels.sort(["prompt_id", "reward"]),
        "select_pairs": lambda: select_pairs(labels),
        "all_pairs": lambda: select_pairs(labels, strategy="all_pairs"),
        "top_bottom_k": lambda: select_pairs(labels, strategy="top_bottom_k", top_k=1),
        "pareto": lambda: select_pairs(labels, strategy="pareto", dimensions=DIMENSIONS),
        "sampled": lambda: select_pairs(labels, label_mode="sampled", seed=1),
    }
    t0 = time.perf_counter()
    alternate(runs, 1)  # warm-up
    print(f"# warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    last, walls, cpus = alternate(runs, args.repeats)
    best = {name: min(w) for name, w in walls.items()}
    for name in runs:
        i = walls[name].index(best[name])
        dropped = {reason: n for reason, n in last[name][1].items() if n} if name != "sort" else {}
        made = "" if name == "sort" else f", {last[name][0].height} pairs, drops {dropped}"
        print(f"{name:>13}: best {best[name]:.3f} s wall ({cpus[name][i]:.2f} s cpu), "
              f"ratio {best[name] / best['sort']:.2f}{made}", flush=True)
    ratio = best["select_pairs"] / best["sort"]
    print(f"ratio={ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
