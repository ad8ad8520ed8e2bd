"""Near-duplicate filtering at scale: the indexed path against today's brute force (issue 15).

    nice -n 19 .venv/bin/python bench/dedup.py [--sizes 100000,300000,1000000] [--dim 64] [--exact-max 300000]

Synthetic items, the way ``SftSource`` feeds :class:`labelers.filters.NearDuplicateFilter` (sha256s, 64-bit
pHashes, CLIP embeddings; batches of ``--batch`` items, one per partition; ``phash_max_distance`` 4,
``cosine_threshold`` 0.97 as in ``sdxl_vllm``):

* originals: ``--dim``-d unit embeddings around ``N / 200`` topic centres (cosine ≈ 0.5 within a topic, ≈ 0 across:
  far below the threshold), pHashes = the topic's code with each bit flipped with probability 0.3 (≈ 27 bits
  between two items of a topic);
* planted duplicates, ``--dup-fraction`` of the items, each placed at a random point after its original: 40 %
  pHash near copies (1 to 4 bits flipped, embedding cosine 0.975-0.995 too: dropped as ``near_duplicate_phash``),
  40 % CLIP near copies (embedding cosine 0.975-0.995, a fresh pHash: ``near_duplicate_clip``), 20 % byte copies
  (same sha256: ``exact_duplicate``).

Per size: the wall and CPU seconds of the whole stream through the indexed path (``exact=False``) and, up to
``--exact-max`` items and while the N² extrapolation of the last exact run stays under ``--exact-budget``
seconds, through the brute force (``exact=True``, today's code); the drops by reason; the recall of the planted
duplicates (dropped / planted) by each path, overall and for the CLIP copies alone (the only ones the index can
miss); and where both ran, the verdicts that differ. The last line is ``exponent=<k> recall=<r>``: ``k`` the
least-squares slope of log(indexed wall time) on log(N) over the sizes (the line before it: the same for CPU
seconds, less sensitive to other load on a shared machine), ``r`` the lowest planted-duplicate recall
of the indexed path relative to the exact path's (the exact path drops every planted duplicate wherever it ran).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labelers.filters import NearDuplicateFilter  # noqa: E402

PHASH_MAX = 4
COSINE = 0.97


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _flips(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 64-bit masks, each bit set with probability 0.3 (≈ 0.25 + 0.0625 - 0.0156: a&b | c&d&e)."""
    def word():
        return rng.integers(0, 2**64, size=n, dtype=np.uint64)

    return (word() & word()) | (word() & word() & word())


def _near_copies(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """Unit vectors at cosine uniform in [0.975, 0.995] from the unit rows of ``v``."""
    r = rng.standard_normal(v.shape).astype(np.float32)
    r -= (r * v).sum(axis=1, keepdims=True) * v
    r = _unit(r)
    cos = rng.uniform(0.975, 0.995, size=(len(v), 1)).astype(np.float32)
    return _unit(cos * v + np.sqrt(1 - cos**2) * r)


def synthetic(n: int, dim: int, dup_fraction: float, seed: int):
    """(sha256s, phashes, embeddings, planted kind per item: '' original, 'phash' | 'clip' | 'exact')."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_fraction)
    n_orig = n - n_dup
    topics = max(1, n // 200)
    centres = _unit(rng.standard_normal((topics, dim)).astype(np.float32))
    codes = rng.integers(0, 2**64, size=topics, dtype=np.uint64)
    topic = rng.integers(0, topics, size=n_orig)
    emb = _unit(centres[topic] + rng.standard_normal((n_orig, dim)).astype(np.float32))
    ph = codes[topic] ^ _flips(rng, n_orig)

    src = rng.integers(0, n_orig, size=n_dup)
    kind = np.where(rng.random(n_dup) < 0.4, 1, np.where(rng.random(n_dup) < 2 / 3, 2, 3))  # phash, clip, exact
    d_emb = _near_copies(rng, emb[src])
    bits = np.zeros(n_dup, dtype=np.uint64)
    for k in range(PHASH_MAX):  # 1..4 distinct random bits (repeats collapse, at least one stays)
        take = rng.integers(1, PHASH_MAX + 1, size=n_dup) > k
        bits |= np.where(take, np.uint64(1) << rng.integers(0, 64, size=n_dup).astype(np.uint64), np.uint64(0))
    d_ph = np.where(kind == 1, ph[src] ^ bits, codes[topic[src]] ^ _flips(rng, n_dup))
    exact = kind == 3
    d_emb[exact] = emb[src[exact]]
    d_ph[exact] = ph[src[exact]]

    t_orig = rng.random(n_orig)
    t_dup = t_orig[src] + (1 - t_orig[src]) * rng.random(n_dup)
    order = np.argsort(np.concatenate([t_orig, t_dup]), kind="stable")
    sha = np.array([f"o{i}" for i in range(n_orig)] + [f"o{s}" if k == 3 else f"d{j}"
                                                         for j, (s, k) in enumerate(zip(src, kind))], dtype=object)
    names = np.array(["", "phash", "clip", "exact"], dtype=object)
    planted = np.concatenate([np.zeros(n_orig, dtype=np.int64), kind])
    return (sha[order].tolist(), np.concatenate([ph, d_ph])[order], np.concatenate([emb, d_emb])[order],
            names[planted[order]])


def run(n: int, data, exact: bool, batch: int, **index_args):
    sha, ph, emb, _ = data
    f = NearDuplicateFilter(phash_max_distance=PHASH_MAX, cosine_threshold=COSINE, exact=exact,
                            **({} if exact else index_args))
    keys = np.arange(n)
    reasons: list = []
    w0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        reasons += [r for _, r in f.filter_batch(keys[lo:hi], sha[lo:hi], ph[lo:hi], emb[lo:hi])]
    return np.array(reasons, dtype=object), time.perf_counter() - w0, time.process_time() - c0


def recall(reasons: np.ndarray, planted: np.ndarray, which=None) -> float:
    mask = planted != "" if which is None else planted == which
    return float(np.mean(reasons[mask] != None)) if mask.any() else 1.0  # noqa: E711


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=100_000, help="items per filter_batch call (a partition)")
    ap.add_argument("--exact-max", type=int, default=300_000, help="largest size the brute force runs at")
    ap.add_argument("--exact-budget", type=float, default=900.0,
                    help="skip the brute force when the N² extrapolation of its last run exceeds this (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list-size", type=int, default=None, help="ann_list_size (default: the filter's)")
    ap.add_argument("--nprobe", type=int, default=None, help="ann_nprobe (default: the filter's)")
    ap.add_argument("--block-size", type=int, default=None, help="block_size of the indexed path")
    ap.add_argument("--threads", type=int, default=None, help="faiss threads (default: faiss's, one per core)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"dim={args.dim} phash_max_distance={PHASH_MAX} cosine_threshold={COSINE} dup_fraction={args.dup_fraction} "
          f"batch={args.batch} faiss={faiss.__version__} threads={faiss.omp_get_max_threads()}")
    times, cpus, rel = [], [], []
    last_exact = None
    for n in sizes:
        data = synthetic(n, args.dim, args.dup_fraction, args.seed)
        planted = data[3]
        index_args = {name: value for name, value in (("ann_list_size", args.list_size), ("ann_nprobe", args.nprobe),
                                                      ("block_size", args.block_size)) if value is not None}
        got, wall, cpu = run(n, data, exact=False, batch=args.batch, **index_args)
        times.append(wall)
        cpus.append(cpu)
        drops = Counter(r for r in got if r is not None)
        print(f"N={n:>8} indexed: {wall:8.1f} s wall {cpu:8.1f} s cpu  {wall / n * 1e6:6.1f} us/item  "
              f"drops={dict(sorted(drops.items()))}  planted recall={recall(got, planted):.4f} "
              f"(clip copies {recall(got, planted, 'clip'):.4f})")
        estimate = None if last_exact is None else last_exact[1] * (n / last_exact[0]) ** 2
        if n <= args.exact_max and (estimate is None or estimate <= args.exact_budget):
            ref, ewall, ecpu = run(n, data, exact=True, batch=args.batch)
            last_exact = (n, ewall)
            base = recall(ref, planted)
            rel.append(recall(got, planted) / base)
            differ = int(np.sum(ref != got))
            print(f"N={n:>8} exact:   {ewall:8.1f} s wall {ecpu:8.1f} s cpu  {ewall / n * 1e6:6.1f} us/item  "
                  f"planted recall={base:.4f}  verdicts differing from indexed={differ}  "
                  f"recall vs exact={rel[-1]:.4f}  speedup={ewall / wall:.1f}x")
        else:
            why = f"> --exact-max {args.exact_max}" if n > args.exact_max else f"~{estimate:.0f} s estimated"
            rel.append(recall(got, planted))  # the exact path drops every planted duplicate where it ran
            print(f"N={n:>8} exact:   skipped ({why})")
    def slope(ts):
        return float(np.polyfit(np.log(sizes), np.log(ts), 1)[0]) if len(sizes) > 1 else float("nan")

    k = slope(times)
    print(f"exponent of the indexed path's CPU seconds: {slope(cpus):.3f}")
    print(f"exponent={k:.3f} recall={min(rel):.4f}")


if __name__ == "__main__":
    main()
