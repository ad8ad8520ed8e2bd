"""Batched CLIP scoring vs a naive per-image loop (issue 3).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/clip.py [--candidates 256] [--per-prompt 4] [--references 3] [--repeats 3]

Scores the same N candidates two ways in one run, on the same open_clip weights (``zoo:clip``), one torch thread:

* ``ClipScorer("zoo:clip").score(images, texts, references)``: images embedded in batches of ``batch_size``, each
  distinct prompt text and each distinct reference image embedded once (references are shared by the candidates
  of a prompt), all batched;
* the naive way: a plain loop over candidates that embeds the candidate image, its text and each of its
  references one at a time (``encode_image`` / ``encode_text`` on a batch of one) and takes the cosines.

Candidates come in groups of ``--per-prompt`` sharing a prompt and its ``--references`` reference images (a
``multi_ref`` batch). Both warm up first, then alternate for R rounds; the best wall time of each counts. Prints
a few lines of figures, the largest difference between the two ways' scores, and last
``speedup=<loop seconds / batched seconds>``.
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


def image(i: int, size: int = 64):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256))
    draw = ImageDraw.Draw(im)
    fill = ((200 + 7 * i) % 256, (13 * i) % 256, (29 * i) % 256)
    draw.ellipse((4 + i % 17, 6 + i % 11, 36 + i % 23, 44 + i % 13), fill=fill)
    return im


def workload(candidates: int, per_prompt: int, references: int):
    """(images, texts, references): ``per_prompt`` candidates per prompt share its text and reference images."""
    images, texts, refs = [], [], []
    prompt_refs: list = []
    for c in range(candidates):
        p = c // per_prompt
        if p == len(prompt_refs):
            prompt_refs.append([image(10_000 + references * p + r) for r in range(references)])
        images.append(image(c))
        texts.append(f"the subject of reference {p % 7} in the style of reference {p % 5}, prompt {p}")
        refs.append(prompt_refs[p])
    return images, texts, refs


class NaiveLoop:
    """Per candidate: embed its image, its text and each reference one at a time; cosines of the normalised
    embeddings. The same open_clip model and preprocessing as the scorer, loaded through open_clip directly."""

    def __init__(self, name: str):
        import open_clip

        self.model, self.preprocess = open_clip.create_model_from_pretrained(name, device="cpu", precision="fp32")
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    def score(self, images, texts, references):
        import torch
        import torch.nn.functional as F

        from labelers.torch_compat import torch_threads

        out = []
        with torch.no_grad(), torch_threads(1):
            for img, text, refs in zip(images, texts, references):
                ie = F.normalize(self.model.encode_image(self.preprocess(img.convert("RGB"))[None]).float(), dim=-1)[0]
                te = F.normalize(self.model.encode_text(self.tokenizer([text])).float(), dim=-1)[0]
                sims = []
                for ref in refs:
                    pixels = self.preprocess(ref.convert("RGB"))[None]
                    re = F.normalize(self.model.encode_image(pixels).float(), dim=-1)[0]
                    sims.append(float(re @ ie))
                out.append((float(te @ ie), sims))
        return out


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--per-prompt", type=int, default=4, help="candidates sharing a prompt and its references")
    parser.add_argument("--references", type=int, default=3, help="reference images per prompt")
    parser.add_argument("--batch-size", type=int, default=32, help="ClipScorer batch size (the tiny profile's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from labelers.clip_scorer import ClipScorer

    images, texts, refs = workload(args.candidates, args.per_prompt, args.references)
    t0 = time.perf_counter()
    scorer = ClipScorer("zoo:clip", batch_size=args.batch_size, cpu_threads=1).setup()
    naive = NaiveLoop(scorer.open_clip_name()[0])
    warm = max(args.per_prompt, 8)
    scorer.score(images[:warm], texts[:warm], refs[:warm])
    naive.score(images[:warm], texts[:warm], refs[:warm])
    print(f"# setup + warm-up {time.perf_counter() - t0:.1f} s", flush=True)

    runs = {"batched": lambda: scorer.score(images, texts, refs),
            "per-image loop": lambda: naive.score(images, texts, refs)}
    results, walls, cpus = alternate(runs, args.repeats)

    diff = 0.0
    for s, (clip_t, sims) in zip(results["batched"], results["per-image loop"]):
        diff = max(diff, abs(s.clip_t - clip_t), *(abs(a - b) for a, b in zip(s.clip_i_per_ref, sims)))
    n_prompts = -(-args.candidates // args.per_prompt)
    embeds_naive = args.candidates * (2 + args.references)
    embeds_batched = args.candidates + n_prompts * (1 + args.references)
    print(f"candidates={args.candidates} prompts={n_prompts} references/prompt={args.references} "
          f"batch_size={args.batch_size} repeats={args.repeats} cpu_threads=1 (os cpus: {os.cpu_count()}); "
          f"embeddings: batched {embeds_batched}, loop {embeds_naive}")
    best = {}
    for name in runs:
        best[name] = min(walls[name])
        listed = " ".join(f"{w:.3f}" for w in walls[name])
        print(f"{name:>14}: best {best[name]:.3f} s wall ({min(cpus[name]):.3f} s cpu), "
              f"{args.candidates / best[name]:.0f} candidates/s; runs [{listed}] s")
    print(f"max |score difference| = {diff:.2e}")
    speedup = best["per-image loop"] / best["batched"]
    print(f"speedup={speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
