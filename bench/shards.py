"""Corpus write throughput vs a plain ``tarfile`` writer of the same bytes (issue 4).

    .venv/bin/python bench/shards.py [--samples 2000] [--image-kb 48] [--shard-samples 250] [--repeats 3]

Both write the same samples (a JPEG-sized random payload, a caption and a JSON record each; random bytes, so no
layer can compress them) into shards of ``--shard-samples`` in a fresh directory on the same filesystem:

* plain: ``tarfile.open(path, "w")`` per shard and ``addfile`` per member — no hashing, no index, no fsync;
* ours: :func:`pipelines.corpora.build_corpus` — webdataset's ``TarWriter``, sha256 computed while writing, each
  shard written to a temporary sibling, fsynced and renamed, ``index.parquet``, segment records, ``manifest.json``
  and the ``latest`` pointer.

The two alternate for R rounds (best wall time of each counts). Prints MB/s of each and last
``ratio=<our throughput / plain throughput>`` (1.0 = as fast as a bare tar writer; the target is >= 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _timing import alternate  # noqa: E402  (bench/ is on sys.path when the script runs)


def make_samples(n: int, image_bytes: int) -> list[tuple[dict, dict]]:
    rng = __import__("random").Random(0)
    samples = []
    for i in range(n):
        key = f"{i:08x}{rng.getrandbits(64):016x}"
        meta = {"candidate_id": key, "prompt_id": f"p{i // 4}", "reward": rng.random(), "task": "t2i"}
        samples.append(({"__key__": key, "jpg": rng.randbytes(image_bytes), "txt": f"a photo of thing {i}",
                         "json": json.dumps(meta).encode()}, {"candidate_id": key, "task": "t2i",
                                                              "reward": meta["reward"]}))
    return samples


class ListSource:
    def __init__(self, samples):
        self.items = samples

    def samples(self, partition: str, drops: Counter):
        return iter(self.items)

    def reused(self, partition: str, rows) -> None:
        pass


def write_plain(samples: list[tuple[dict, dict]], out: Path, shard_samples: int) -> int:
    out.mkdir(parents=True)
    written = 0
    for start in range(0, len(samples), shard_samples):
        with tarfile.open(out / f"{start // shard_samples:06d}.tar", "w") as tar:
            for sample, _ in samples[start:start + shard_samples]:
                for ext, value in sample.items():
                    if ext == "__key__":
                        continue
                    data = value if isinstance(value, bytes) else str(value).encode()
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    written += len(data)
    return written


def write_ours(samples: list[tuple[dict, dict]], out: Path, shard_samples: int) -> int:
    from pipelines.corpora import ShardLimits, build_corpus

    build = build_corpus(out, "bench", {"p": "1"}, {}, ListSource(samples), ShardLimits(max_samples=shard_samples))
    return build.manifest["num_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--image-kb", type=int, default=48)
    parser.add_argument("--shard-samples", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    samples = make_samples(args.samples, args.image_kb * 1024)
    payload = sum(len(s["jpg"]) + len(s["txt"]) + len(s["json"]) for s, _ in samples)
    base = Path(args.dir or tempfile.mkdtemp(prefix="prefmill-bench-shards-"))
    counter = {"n": 0}

    def fresh() -> Path:
        counter["n"] += 1
        path = base / f"run{counter['n']}"
        return path

    def plain() -> int:
        out = fresh()
        try:
            return write_plain(samples, out, args.shard_samples)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def ours() -> int:
        out = fresh()
        try:
            return write_ours(samples, out, args.shard_samples)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    ours()  # warm up imports (webdataset, polars, fsspec)
    _, walls, _ = alternate({"plain": plain, "ours": ours}, args.repeats)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    plain_s, ours_s = min(walls["plain"]), min(walls["ours"])
    mb = payload / 1e6
    print(f"samples={args.samples} payload={mb:.1f} MB shards={-(-args.samples // args.shard_samples)} "
          f"cpus={os.cpu_count()}")
    print(f"plain tarfile: best {plain_s:.3f} s ({mb / plain_s:.0f} MB/s); all {[round(w, 3) for w in walls['plain']]}")
    print(f"build_corpus:  best {ours_s:.3f} s ({mb / ours_s:.0f} MB/s); all {[round(w, 3) for w in walls['ours']]}")
    print(f"ratio={plain_s / ours_s:.3f}")


if __name__ == "__main__":
    main()
