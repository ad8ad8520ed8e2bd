"""The proving ground's VLM judge: a tiny Qwen2.5-VL trained to read world scenes and then on the verifier's answers,
so the VLM-judge path (``judge.backend: transformers``, grammar-constrained JSON) gives meaningful, imperfect scores.

* Model: zoo:judge (tokenizer, chat template, language model size) with its own config — the language model's RoPE
  base lowered to 10 so attention can tell image tokens' positions apart, a 64-wide vision tower, and a 112 px
  pixel budget (16 image tokens) — see :func:`_world_judge_config`. Every weight trains (~0.5 M parameters).
* Stage 1, reading (``--caption-steps``): describe a render (one fact broken half the time) in full, "a large red
  circle in the top left on a white background": every answer word can only come from the image.
* Stage 2, judging (``--steps``): the judge's own chat messages (:func:`labelers.judge.build_messages`) with the
  verifier's JSON answer (:class:`labelers.verifier.VerifierJudge`: scores 0-5 and feedback per dimension) as the
  target, half renders with one fact broken (recoloured, reshaped, resized, moved, another background, missing, an
  extra object), half the generator's own candidates (``--candidates``, zoo:world_gen drawn as the profiles draw
  it: blurry shapes, objects missing or misplaced, which renders do not look like). Teacher forcing, cross-entropy
  on the answer tokens only. All training prompts come from world seeds of their own (``TRAIN_WORLD_OFFSET``):
  never make prove's (seed 0) or the demo's (1-3).
* Evaluation: :class:`labelers.judge.TransformersJudge` (greedy, the same structured decoding as labelling) against
  the verifier on a held-out world seed, on renders and on the generator's candidates: ``exact`` / ``within_1``
  score agreement per dimension, ``correct_accuracy`` (all fives exactly when the verifier finds every fact true)
  and ``pairwise`` (how often it orders two candidates of a prompt as the verifier does; ``pairwise_ties``: how
  often it cannot tell them apart).

``python -m pipelines.proving_judge --out DIR [--threads N]``; ``--init-from DIR --caption-steps 0 --steps N`` goes
on training a world judge (the shipped one took two commands: see its MANIFEST.json — after the first 1,500 judging
steps its greedy answers were still all fives on the generator's candidates; 2,000 more made them order). Ship the
result with ``python -m pipelines.zoo.trained ship-world-judge DIR COMMAND``.
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

CAPTION_STEPS = 3000
JUDGE_STEPS = 1500
JUDGE_BATCH = 8
JUDGE_LR = 5e-4  # 2e-3 (the first world judge's) never gets past the text prior: it learns the answers' marginals
TEXT_ROPE_THETA = 10.0
TEXT_LAYERS = 4
VISION_WIDTH = 64
JUDGE_SIZE = 48
EVAL_SEED_OFFSET = 2_000_003
# the judge trains on worlds of its own: make prove draws world seed 0 and the demo's samples seeds 1-3, so the
# judge never sees a prompt (or candidate) it will label there
TRAIN_WORLD_OFFSET = 1_000
# the generator whose candidates the judge labels, drawn as this profile's t2i generator draws them
CANDIDATE_MODEL = "zoo:world_gen"
CANDIDATE_PROFILE = "proving"
# the image processor's pixel budget: a 48 px image upscaled to 112 px is 8x8 patches of 14 -> 16 tokens after
# the 2x2 merge (zoo:judge's 56 px budget gives a whole scene 4 tokens)
JUDGE_PIXELS = 112
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


def candidate_examples(seed: int, prompts: int, seeds_per_prompt: int, model: str = CANDIDATE_MODEL,
                       threads: int | None = None) -> list[tuple[Any, str]]:
    """The generator's own candidates for ``prompts`` single-object world prompts x ``seeds_per_prompt`` seeds,
    each with the verifier's answer: the images the judge labels in practice (blurry shapes, missing or misplaced
    objects), which renders with one fact broken do not look like."""
    from labelers.judge import JudgeItem
    from labelers.verifier import VerifierJudge
    from pipelines.evaluation import eval_requests
    from pipelines.generation import ImageGenerator
    from pipelines.profiles import load_profile

    sampling = load_profile(CANDIDATE_PROFILE)["generation"]["generators"]["t2i"]
    texts = [{"prompt_id": str(i), "task": "t2i", "text": world_item(seed, "t2i", i, max_objects=1).text}
             for i in range(prompts)]
    requests, rows = eval_requests(texts, seeds_per_prompt, base_seed=seed)
    generator = ImageGenerator(model=model, kind="t2i", batch_size=16, cpu_threads=threads,
                               **{k: sampling[k] for k in ("steps", "guidance_scale", "width", "height")})
    generator.setup()
    try:
        images = generator.generate(requests)
    finally:
        generator.teardown()
    items = [JudgeItem(key=row["prompt_id"], task="t2i", text=row["text"], image=image)
             for row, image in zip(rows, images)]
    return [(item, result.raw) for item, result in zip(items, VerifierJudge().judge(items))]


CAPTION_REQUEST = "Describe the picture in one sentence."


def describe(scene: Scene) -> str:
    """Every fact of ``scene`` in the prompts' words ("a large red circle in the top left on a white background")."""
    from labelers.verifier import cell_name

    things = " and ".join(f"a {o.size} {o.colour} {o.shape} in the {cell_name(o.cell)}" for o in scene.objects)
    return f"{things or 'nothing'} on a {scene.background} background"


def caption_examples(seed: int, start: int, n: int, size: int = JUDGE_SIZE) -> list[tuple[Any, str]]:
    """``n`` (JudgeItem, description) pairs: a render (one fact broken half the time) to be described in full —
    every word of the answer can only come from the image."""
    from labelers.judge import JudgeItem

    out = []
    for i in range(start, start + n):
        rng = random.Random(f"prefmill-world-caption:{seed}:{i}")
        scene = broken_scene(world_item(seed, "t2i", i, max_objects=1).scene, rng)
        out.append((JudgeItem(key=str(i), task="caption", text=CAPTION_REQUEST, image=render(scene, size)),
                    describe(scene)))
    return out


def _messages(item, rubric) -> list[dict]:
    from labelers.judge import build_messages
    from labelers.judge.protocol import image_part, text_part

    if item.task == "caption":  # the only way to the answer is through the image
        return [{"role": "user", "content": [image_part(item.image), text_part(item.text)]}]
    return build_messages(item, rubric)


def _batch(processor, rubric, pairs, torch):
    prompts, fulls, images = [], [], []
    for item, answer in pairs:
        text = processor.apply_chat_template(_messages(item, rubric), tokenize=False, add_generation_prompt=True)
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


def agreement(pairs: list[tuple[Any, str]], results: list[Any]) -> dict[str, Any]:
    """How a judge's ``results`` agree with the verifier's answers in ``pairs``: ``exact`` / ``within_1`` per
    (image, dimension) score; ``correct_accuracy``: it gives every dimension 5 exactly when the verifier finds every
    fact true; ``pairwise``: of the same-prompt image pairs (items sharing a key) the verifier's mean score tells
    apart, the share the judge's mean score orders the same way, ties left out (``pairwise_ties``: the share it ties)."""
    from labelers.diagnostics import pair_order

    exact = within = total = ok = agree_correct = 0
    means: dict[str, list[tuple[float, float]]] = {}
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
        means.setdefault(item.key, []).append((sum(truth.values()) / len(truth),
                                               sum(float(v) for v in res.scores.values()) / max(1, len(res.scores))))
    order = pair_order(means.values())
    return {"n": len(pairs), "ok": ok / max(1, len(pairs)), "exact": exact / max(1, total),
            "within_1": within / max(1, total), "correct_accuracy": agree_correct / max(1, ok),
            "pairwise": order.agreement, "pairwise_ties": order.tie_rate, "pairwise_n": order.told_apart}


def judge_pair_sets(model_dir: str, *pair_sets: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """Greedy structured judging of each set's images (as labelling does), compared with the verifier: one
    agreement per set, the judge loaded once."""
    from labelers.judge import TransformersJudge

    judge = TransformersJudge(model_dir, batch_size=16, max_new_tokens=256, temperature=0.0).setup()
    try:
        return [agreement(pairs, judge.judge([p[0] for p in pairs])) for pairs in pair_sets]
    finally:
        judge.teardown()


def judge_pairs(model_dir: str, pairs: list[tuple[Any, str]]) -> dict[str, Any]:
    """Greedy structured judging of ``pairs``' images (as labelling does), compared with the verifier."""
    return judge_pair_sets(model_dir, pairs)[0]


def held_out_renders(seed: int = 0, n: int = 64) -> list[tuple[Any, str]]:
    """``n`` renders (half with one fact broken) of a world seed no training uses, with the verifier's answers."""
    return examples(seed + EVAL_SEED_OFFSET, 0, n)


def evaluate_judge(model_dir: str, seed: int = 0, n: int = 64) -> dict[str, Any]:
    """Agreement with the verifier on ``n`` held-out renders (:func:`held_out_renders`)."""
    return judge_pairs(model_dir, held_out_renders(seed, n))


def _set_pixel_budget(out_dir: Path, pixels: int) -> None:
    """Save the processor in ``out_dir`` with every image resized to ``pixels`` x ``pixels`` (a multiple of 28)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out_dir)
    processor.image_processor.size = {"shortest_edge": pixels * pixels, "longest_edge": pixels * pixels}
    if getattr(processor, "video_processor", None) is not None:
        processor.video_processor.size = {"shortest_edge": pixels * pixels, "longest_edge": pixels * pixels}
    processor.save_pretrained(out_dir)


def _world_judge_config(out_dir: Path) -> None:
    """Rewrite ``out_dir``'s zoo:judge config into the world judge's: the language model's RoPE base lowered to
    ``TEXT_ROPE_THETA`` and the vision tower ``VISION_WIDTH`` wide (heads of 16, MLP 4x; its weights start random).
    Why: with zoo:judge's base of 1e6 and 16-dim heads, the height/width sections of the multimodal RoPE turn by
    under 0.1 rad across an image's 4 token rows, so no attention head can tell one image token's position from
    another's, and the judge cannot read where anything is; captioning renders with it learns the background and
    some colours and never a cell (measured: 3,000 steps, caption loss 0.26; with base 10, 0.13 and the cells right).
    Four language-model layers instead of two: 0.07 at 3,000 steps, and room to compare what it reads with the prompt."""
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["rope_parameters"]["rope_theta"] = TEXT_ROPE_THETA
    config["text_config"].update(num_hidden_layers=TEXT_LAYERS, max_window_layers=TEXT_LAYERS,
                                 layer_types=["full_attention"] * TEXT_LAYERS)
    config["vision_config"].update(hidden_size=VISION_WIDTH, num_heads=VISION_WIDTH // 16,
                                   intermediate_size=4 * VISION_WIDTH)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def train_world_judge(out_dir: str | Path, seed: int = 0, steps: int = JUDGE_STEPS, batch: int = JUDGE_BATCH,
                      lr: float = JUDGE_LR, threads: int | None = None, eval_n: int = 64,
                      candidates: str | None = CANDIDATE_MODEL, candidate_prompts: int = 160,
                      candidate_seeds: int = 8, eval_prompts: int = 48, pixels: int = JUDGE_PIXELS,
                      caption_steps: int = CAPTION_STEPS, init_from: str | Path | None = None,
                      log=print) -> dict[str, Any]:
    """Train the world judge into ``out_dir`` (written in place: the zoo builder owns atomicity): ``caption_steps``
    batches of describing renders, then ``steps`` batches of judging — a quarter still descriptions, the rest half
    renders with one fact broken and half (with ``candidates``) the generator's own candidates."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from labelers.rubrics import load_rubric
    from labelers.torch_compat import torch_threads
    from pipelines.zoo import MARKER, resolve_model

    out_dir = Path(out_dir)
    base = Path(init_from) if init_from else Path(resolve_model("zoo:judge"))  # a world judge to train on
    shutil.copytree(base, out_dir, dirs_exist_ok=True)
    (out_dir / "train_info.json").unlink(missing_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)
    rubric = load_rubric("t2i")
    started = time.time()
    with torch_threads(threads):
        if not init_from:
            _set_pixel_budget(out_dir, pixels)
            _world_judge_config(out_dir)
        world = TRAIN_WORLD_OFFSET + seed
        pool: list[tuple[Any, str]] = []
        if candidates:
            pool = candidate_examples(world, candidate_prompts, candidate_seeds, candidates, threads)
            log(f"[world-judge] {len(pool)} candidates of {candidates} labelled by the verifier "
                f"{time.time() - started:.0f}s")
        order = random.Random(f"prefmill-world-judge-order:{seed}")
        torch.manual_seed(seed)
        processor = AutoProcessor.from_pretrained(out_dir)
        processor.tokenizer.padding_side = "right"
        model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32,
                                                            ignore_mismatched_sizes=True)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        losses = []
        total = caption_steps + steps
        # a judging batch: a quarter still descriptions, the rest half renders and half candidates
        n_caption = batch // 4  # a few renders, so reading stays what the answers rest on
        n_judged = batch - n_caption
        n_rendered = n_judged - n_judged // 2 if pool else n_judged
        for step in range(total):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 20)
            if step < caption_steps:  # first learn to read the image: describe renders
                chunk = caption_examples(world, step * batch, batch)
            else:  # then judge renders with one fact broken and the generator's own candidates, still describing
                chunk = (caption_examples(world, step * n_caption, n_caption)
                         + examples(world, step * n_rendered, n_rendered) + order.sample(pool, n_judged - n_rendered))
            enc = _batch(processor, rubric, chunk, torch)
            loss = model(**enc).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 25 == 0:
                log(f"[world-judge] step {step + 1}/{total} loss {sum(losses[-25:]) / 25:.4f} "
                    f"{time.time() - started:.0f}s")
        model.eval()
        model.save_pretrained(out_dir)
        train_seconds = time.time() - started
        renders = held_out_renders(seed, eval_n)
        held_out = (candidate_examples(seed + EVAL_SEED_OFFSET, eval_prompts, 4, candidates, threads)
                    if candidates and eval_prompts else None)
        results = judge_pair_sets(str(out_dir), renders, *filter(None, [held_out]))
        metrics, candidate_metrics = results[0], (results[1] if held_out else None)
        log(f"[world-judge] agreement with the verifier on {eval_n} held-out renders: {metrics}")
        if held_out:
            log(f"[world-judge] ... on {len(held_out)} held-out candidates of {candidates}: {candidate_metrics}")
    info = {"init_from": str(init_from) if init_from else None, "seed": seed, "caption_steps": caption_steps,
            "steps": steps, "batch": batch, "lr": lr, "pixels": pixels,
            "candidates": candidates,
            "candidate_prompts": candidate_prompts if candidates else 0, "candidate_seeds": candidate_seeds,
            "train_seconds": round(train_seconds, 1),
            "final_loss": round(sum(losses[-25:]) / max(1, len(losses[-25:])), 4), "eval": metrics,
            "eval_candidates": candidate_metrics}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.proving_judge", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=JUDGE_STEPS)
    parser.add_argument("--batch", type=int, default=JUDGE_BATCH)
    parser.add_argument("--lr", type=float, default=JUDGE_LR)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--candidates", default=CANDIDATE_MODEL,
                        help="generator whose candidates make half of each batch ('none': renders only)")
    parser.add_argument("--candidate-prompts", type=int, default=160)
    parser.add_argument("--candidate-seeds", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts (x 4 seeds) of candidates")
    parser.add_argument("--caption-steps", type=int, default=CAPTION_STEPS,
                        help="first steps train on describing renders (teaches reading the image)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="a world judge (this command's output) to go on training instead of zoo:judge")
    parser.add_argument("--pixels", type=int, default=JUDGE_PIXELS, help="image side the processor resizes to")
    args = parser.parse_args(argv)
    if args.pixels % 28:
        parser.error("--pixels must be a multiple of 28 (14 px patches, merged 2x2)")
    args.out.mkdir(parents=True, exist_ok=True)
    info = train_world_judge(args.out, args.seed, args.steps, args.batch, args.lr, args.threads,
                             candidates=None if args.candidates == "none" else args.candidates,
                             candidate_prompts=args.candidate_prompts, candidate_seeds=args.candidate_seeds,
                             eval_prompts=args.eval_prompts, pixels=args.pixels,
                             caption_steps=args.caption_steps, init_from=args.init_from,
                             log=lambda m: print(m, flush=True))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
