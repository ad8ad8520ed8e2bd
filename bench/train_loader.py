"""SFT training-step throughput: streaming from the corpus shards vs the same samples held in memory (issue 5).

    .venv/bin/python bench/train_loader.py [--samples 256] [--resolution 32] [--batch-size 4] [--steps 2]
                                           [--workers 1] [--repeats 48] [--with-generator]

Writes an SFT corpus of ``--samples`` 64×64 JPEGs (captions, json with the t2i judge scores) with
:func:`pipelines.corpora.build_corpus` (shards of ``--shard-samples``), loads the tiny ``zoo:t2i`` pipeline with a
LoRA exactly as ``python -m trainers.sft`` does (:func:`trainers.common.prepare_training`), and times ``--steps``
real SFT steps (VAE encode, CLIP text encode, UNet forward + backward, clip, AdamW step: the trainer's
:class:`trainers.sft.sft_trainer.SFTStep`) per run, one torch thread, fed

* streaming: the trainer's own stream (:class:`trainers.sft.stream.SFTStream`: ``corpus_dataset(kind="sft")`` in a
  ``DataLoader`` with ``--workers`` worker processes that read, decode and collate while the step runs);
* in-memory: the same samples decoded and collated into batches beforehand (the loader's ideal: zero cost);
* ``--with-generator`` adds, for information, the previous in-process reader (``sft_samples`` + ``collate_sft``
  in the training process, decoding on the critical path).

Every way warms up first (worker start-up, the first batches and first steps are one-time costs, excluded), then
they alternate for R rounds (``bench/_timing.py``). Prints steps/s of each (best and median round), the time the
streaming steps waited for data, and last ``ratio=<streaming steps/s ÷ in-memory steps/s>`` (target >= 0.9: the
loader is not the bottleneck): the median over rounds of the two ways' ratio within a round. Rounds run back to
back, so on a shared machine the background load of a round hits both ways alike and the pairing cancels it;
the ratio of the two best rounds is printed too.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _timing import alternate  # noqa: E402  (bench/ is on sys.path when the script runs)

CAPTIONS = ["a red square on grass", "a blue circle at night", "a green field under a yellow sun",
            "a black cat on a white sofa", "a watercolor of a lighthouse", "a bowl of ramen, studio photo"]


def jpeg(i: int, size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = np.array([(37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256], dtype=np.float32)
    arr = np.clip(base[None, None, :] + rng.normal(0, 30, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ScoredSource:
    """``build_corpus`` source: SFT samples (``jpg, txt, json``) with the t2i rubric's scores in the json."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def samples(self, partition: str, drops: Counter):
        for i in range(self.n):
            key = f"{partition}-{i:06d}"
            meta = {"candidate_id": key, "task": "t2i", "prompt_alignment": i % 6, "visual_quality": (i * 7) % 6,
                    "aesthetics": (i * 5) % 6, "reward": (i % 10) / 10, "clip_t": 0.3}
            yield ({"__key__": key, "jpg": jpeg(i, self.size), "txt": CAPTIONS[i % len(CAPTIONS)],
                    "json": json.dumps(meta).encode()}, {"candidate_id": key, "task": "t2i", "reward": meta["reward"]})

    def reused(self, partition: str, rows) -> None:
        pass


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32,
                        help="training resolution (32: the tiny model's fastest step, the hardest test for the loader)")
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps per timed run (a round runs each way once)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the streaming run")
    parser.add_argument("--prefetch", type=int, default=2, help="DataLoader prefetch_factor (chunks per worker)")
    parser.add_argument("--repeats", type=int, default=48, help="rounds")
    parser.add_argument("--reward-conditioning", action="store_true", help="train the reward-conditioned variant")
    parser.add_argument("--with-generator", action="store_true", help="also time the old in-process reader")
    args = parser.parse_args(argv)

    import torch

    import trainers  # noqa: F401  (torchvision shim before diffusers)
    from pipelines.corpora import ShardLimits, build_corpus
    from trainers import common
    from trainers.data import batched, collate_sft, sft_samples
    from trainers.sft import SFTConfig
    from trainers.sft.sft_trainer import SFTStep, reward_embedding_factory
    from trainers.sft.stream import SFTStream

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_loader_"))
    t0 = time.perf_counter()
    build = build_corpus(tmp / "sft_corpus", "sft_corpus", {"p0": "bench"}, {"n": args.samples},
                         ScoredSource(args.samples, args.image_size), ShardLimits(max_samples=args.shard_samples))
    corpus_dir = str(tmp / "sft_corpus" / build.version)
    n_shards = len(build.manifest["shards"])
    corpus_mb = sum(p.stat().st_size for p in (Path(corpus_dir) / "shards").glob("*.tar")) / 1e6
    print(f"# corpus: {args.samples} samples {args.image_size}x{args.image_size} JPEG in {n_shards} shards "
          f"({corpus_mb:.1f} MB), written in {time.perf_counter() - t0:.1f} s", flush=True)

    cfg = SFTConfig(pretrained_model="zoo:t2i", corpus_dir=corpus_dir, output_dir=str(tmp / "run"),
                    resolution=args.resolution, batch_size=args.batch_size, num_threads=1, checkpoint_every=0,
                    learning_rate=1e-4, caption_dropout=0.1, dataloader_num_workers=args.workers,
                    prefetch_factor=args.prefetch, reward_conditioning=args.reward_conditioning)
    s = common.prepare_training(cfg, modules=reward_embedding_factory(cfg))
    step_fn = SFTStep(cfg, s)
    s.unet.train()
    counter = iter(range(10**9))

    def train_step(batch) -> float:
        k = next(counter)
        common.apply_lr(s.optimizer, cfg, k)
        loss, _ = step_fn.loss(batch, common.step_generator(cfg.seed, k))
        s.accelerator.backward(loss)
        s.accelerator.clip_grad_norm_(s.params, cfg.max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    # in memory: the same samples, decoded and collated once
    with SFTStream(corpus_dir, resolution=cfg.resolution, chunk_size=cfg.batch_size, seed=cfg.seed,
                   num_workers=0) as once:
        memory = [once.take(cfg.batch_size) for _ in range(args.samples // cfg.batch_size)]
    stream = SFTStream(corpus_dir, resolution=cfg.resolution, chunk_size=cfg.batch_size, seed=cfg.seed,
                       shuffle_buffer=cfg.shuffle_buffer, num_workers=args.workers, prefetch_factor=args.prefetch)
    generator = batched(sft_samples(corpus_dir, cfg.seed, repeat=True), cfg.batch_size)
    position = {"memory": 0}
    waits: list[float] = []

    def run_streaming(steps: int = args.steps) -> None:
        wait = 0.0
        for _ in range(steps):
            w0 = time.perf_counter()
            batch = stream.take(cfg.batch_size)
            wait += time.perf_counter() - w0
            train_step(batch)
        waits.append(wait)

    def run_memory(steps: int = args.steps) -> None:
        for _ in range(steps):
            batch = memory[position["memory"] % len(memory)]
            position["memory"] += 1
            train_step(batch)

    def run_generator(steps: int = args.steps) -> None:
        for _ in range(steps):
            train_step(collate_sft(next(generator), cfg.resolution))

    runs = {"streaming": run_streaming, "in-memory": run_memory}
    if args.with_generator:
        runs["generator (old)"] = run_generator
    t0 = time.perf_counter()
    for run in runs.values():  # warm-up: worker start, first batches, first steps (allocator, oneDNN kernels)
        run(4)
    waits.clear()
    worker_pids = [w.pid for w in getattr(stream._items, "_workers", [])]
    worker_cpu0 = sum(process_cpu_seconds(pid) for pid in worker_pids)
    print(f"# setup + warm-up {time.perf_counter() - t0:.1f} s; steps/run={args.steps} batch={cfg.batch_size} "
          f"resolution={cfg.resolution} workers={args.workers} prefetch_factor={args.prefetch} "
          f"reward_conditioning={cfg.reward_conditioning} torch threads=1 (os cpus: {os.cpu_count()})", flush=True)

    try:
        _, walls, cpus = alternate(runs, args.repeats)
        worker_cpu = sum(process_cpu_seconds(pid) for pid in worker_pids) - worker_cpu0
    finally:
        stream.close()
    rate: dict[str, float] = {}
    for name in runs:
        best = min(walls[name])
        rate[name] = args.steps / best
        print(f"{name:>16}: {rate[name]:.2f} steps/s best round ({1000 * best / args.steps:.1f} ms/step), "
              f"{args.steps / statistics.median(walls[name]):.2f} median, {args.steps / max(walls[name]):.2f} worst; "
              f"main-process cpu {1000 * statistics.median(cpus[name]) / args.steps:.1f} ms/step (median round)")
    n_stream = args.steps * args.repeats
    print(f"streaming waited for data {1000 * statistics.median(waits) / args.steps:.2f} ms/step (median run), "
          f"{1000 * max(waits) / args.steps:.2f} ms/step at worst; DataLoader worker cpu "
          f"{1000 * worker_cpu / n_stream:.1f} ms/step (read, decode, resize, collate)")
    paired = [m / w for w, m in zip(walls["streaming"], walls["in-memory"])]
    print(f"streaming/in-memory per round: median {statistics.median(paired):.3f}, "
          f"range {min(paired):.3f}..{max(paired):.3f}; ratio of the best rounds "
          f"{rate['streaming'] / rate['in-memory']:.3f}")
    ratio = statistics.median(paired)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
