"""The proving ground's VLM judge: the zoo's tiny Qwen2.5-VL judge fine-tuned on the verifier's answers, so the
VLM-judge path (``judge.backend: transformers``, grammar-constrained JSON) gives meaningful, imperfect scores.

* Data (fresh every step, a pure function of the seed): single-object t2i prompts of the world, each with its
  ground-truth render or a render with one fact broken (the object recoloured, reshaped, resized, moved, the
  background changed, the object missing, an extra object), 48 px; the target answer is
  :class:`labelers.verifier.VerifierJudge`'s JSON for that image (scores 0-5 and feedback per dimension).
* Training: the judge's own chat messages (:func:`labelers.judge.build_messages`), teacher forcing, cross-entropy
  on the answer tokens only; every weight trains (the model is ~0.4 M parameters).
* Evaluation: :class:`labelers.judge.TransformersJudge` (greedy, the same structured decoding as labelling) on a
  held-out world seed against the verifier: ``exact`` / ``within_1`` score agreement per dimension and
  ``correct_accuracy`` (the judge gives every dimension 5 exactly when the verifier finds every fact true).

``python -m pipelines.proving_judge --out DIR [--steps N]``; ``zoo:world_judge`` trains it on first use.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from labelers.verifier import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, SIZES
from pipelines.proving_world import CELLS, Scene, render, world_item

JUDGE_STEPS = 300
JUDGE_BATCH = 8
JUDGE_SIZE = 48
EVAL_SEED_OFFSET = 2_000_003
BREAKS = ("recolour", "reshape", "resize", "move", "background", "missing", "extra")


def broken_scene(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with one fact broken (or unchanged for half the draws)."""
    if rng.random() < 0.5 or not scene.objects:
        return scene
    obj = scene.objects[0]
    kind = rng.choice(BREAKS)
    if kind == "recolour":
        obj = replace(obj, colour=rng.choice([c for c in OBJECT_COLOURS if c != obj.colour]))
    elif kind == "reshape":
        obj = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif kind == "resize":
        obj = replace(obj, size=next(s for s in SIZES if s != obj.size))
    elif kind == "move":
        obj = replace(obj, cell=rng.choice([c for c in CELLS if c != obj.cell]))
    elif kind == "background":
        return replace(scene, background=rng.choice([b for b in BACKGROUND_COLOURS if b != scene.background]))
    elif kind == "missing":
        return replace(scene, objects=())
    else:
        extra = replace(obj, colour=rng.choice([c for c in OBJECT_COLOURS if c != obj.colour]),
                        cell=rng.choice([c for c in CELLS if c != obj.cell]))
        return replace(scene, objects=(obj, extra))
    return replace(scene, objects=(obj,))


def examples(seed: int, start: int, n: int, size: int = JUDGE_SIZE) -> list[tuple[Any, str]]:
    """``n`` (JudgeItem, verifier answer JSON) pairs of the world of ``seed``."""
    from labelers.judge import JudgeItem
    from labelers.verifier import VerifierJudge

    verifier = VerifierJudge()
    out = []
    for i in range(start, start + n):
        item = world_item(seed, "t2i", i, max_objects=1)
        rng = random.Random(f"prefmill-world-judge:{seed}:{i}")
        ji = JudgeItem(key=str(i), task="t2i", text=item.text, image=render(broken_scene(item.scene, rng), size))
        out.append((ji, verifier.judge([ji])[0].raw))
    return out


def _batch(processor, rubric, pairs, torch):
    from labelers.judge import build_messages

    prompts, fulls, images = [], [], []
    for item, answer in pairs:
        text = processor.apply_chat_template(build_messages(item, rubric), tokenize=False, add_generation_prompt=True)
        prompts.append(text)
        fulls.append(text + answer + "<|im_end|>")
        images.append(item.image)
    enc = processor(text=fulls, images=images, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for k, (prompt, image) in enumerate(zip(prompts, images)):
        n_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        labels[k, :n_prompt] = -100  # right padding: the prompt is each row's first n_prompt tokens
    enc["labels"] = labels
    return enc


def evaluate_judge(model_dir: str, seed: int = 0, n: int = 64) -> dict[str, float]:
    """Greedy structured judging of ``n`` held-out examples, compared with the verifier."""
    from labelers.judge import TransformersJudge

    pairs = examples(seed + EVAL_SEED_OFFSET, 0, n)
    judge = TransformersJudge(model_dir, batch_size=16, max_new_tokens=256, temperature=0.0).setup()
    try:
        results = judge.judge([p[0] for p in pairs])
    finally:
        judge.teardown()
    exact = within = total = ok = agree_correct = 0
    for (item, answer), res in zip(pairs, results):
        truth = {k: float(v["score"]) for k, v in json.loads(answer).items()}
        if not res.ok:
            continue
        ok += 1
        for dim, score in truth.items():
            total += 1
            exact += int(res.scores.get(dim) == score)
            within += int(abs(float(res.scores.get(dim, -9)) - score) <= 1)
        agree_correct += int(all(v == 5 for v in res.scores.values()) == all(v == 5 for v in truth.values()))
    return {"n": n, "ok": ok / n, "exact": exact / max(1, total), "within_1": within / max(1, total),
            "correct_accuracy": agree_correct / max(1, ok)}


def train_world_judge(out_dir: str | Path, seed: int = 0, steps: int = JUDGE_STEPS, batch: int = JUDGE_BATCH,
                      lr: float = 2e-3, threads: int | None = None, eval_n: int = 64, log=print) -> dict[str, Any]:
    """Fine-tune a copy of ``zoo:judge`` into ``out_dir`` (written in place: the zoo builder owns atomicity)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from labelers.rubrics import load_rubric
    from labelers.torch_compat import torch_threads
    from pipelines.zoo import MARKER, resolve_model

    out_dir = Path(out_dir)
    base = Path(resolve_model("zoo:judge"))
    shutil.copytree(base, out_dir, dirs_exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    rubric = load_rubric("t2i")
    started = time.time()
    with torch_threads(threads):
        torch.manual_seed(seed)
        processor = AutoProcessor.from_pretrained(out_dir)
        processor.tokenizer.padding_side = "right"
        model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 20)
            enc = _batch(processor, rubric, examples(seed, step * batch, batch), torch)
            loss = model(**enc).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 25 == 0:
                log(f"[world-judge] step {step + 1}/{steps} loss {sum(losses[-25:]) / 25:.4f} "
                    f"{time.time() - started:.0f}s")
        model.eval()
        model.save_pretrained(out_dir)
        train_seconds = time.time() - started
        metrics = evaluate_judge(str(out_dir), seed, eval_n)
    log(f"[world-judge] agreement with the verifier on {eval_n} held-out images: {metrics}")
    info = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "train_seconds": round(train_seconds, 1),
            "final_loss": round(sum(losses[-25:]) / max(1, len(losses[-25:])), 4), "eval": metrics}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.proving_judge", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=JUDGE_STEPS)
    parser.add_argument("--batch", type=int, default=JUDGE_BATCH)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = train_world_judge(args.out, args.seed, args.steps, args.batch, args.lr, args.threads,
                             log=lambda m: print(m, flush=True))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
