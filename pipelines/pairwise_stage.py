"""Pairwise labelling of one partition: every pair of distinct ok candidates of a train prompt (capped per
prompt) is judged in both orders, verdicts are stored, and Bradley-Terry strengths fitted per prompt turn them
into the pairs table."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any


def candidate_pairs(labels, max_pairs_per_prompt: int) -> list[tuple[str, str, str]]:
    """(prompt_id, id_a, id_b) for ok candidates of each prompt with different images, at most N per prompt."""
    import polars as pl

    out: list[tuple[str, str, str]] = []
    ok = labels.filter(pl.col("status") == "ok").sort(["prompt_id", "candidate_id"])
    for (prompt_id,), group in ok.group_by(["prompt_id"], maintain_order=True):
        rows = list(zip(group["candidate_id"], group["image_sha256"]))
        combos = [(a, b) for (a, sa), (b, sb) in itertools.combinations(rows, 2) if sa != sb]
        out += [(prompt_id, a, b) for a, b in combos[:max_pairs_per_prompt]]
    return out


def judge_pairs(pairwise_judge, triples, prompts_by_id: dict[str, dict[str, Any]], images: dict, batch_size: int,
                log: Callable[[str], None] = print):
    from PIL import Image

    from labelers.hashing import content_id
    from labelers.pairwise import PairItem

    def open_rgb(path):
        with Image.open(path) as img:
            return img.convert("RGB")

    verdicts = []
    for start in range(0, len(triples), batch_size):
        items = []
        for prompt_id, id_a, id_b in triples[start:start + batch_size]:
            prompt = prompts_by_id[prompt_id]
            image_a, image_b = images.get(id_a), images.get(id_b)
            items.append(PairItem(
                key=content_id("pair-verdict", id_a, id_b), task=prompt["task"], text=prompt["text"],
                image_a=None if isinstance(image_a, Exception) else image_a,
                image_b=None if isinstance(image_b, Exception) else image_b,
                source_image=open_rgb(prompt["source_image"]) if prompt["source_image"] else None,
                reference_images=[open_rgb(p) for p in prompt["reference_images"]],
                reference_types=prompt["reference_types"], prompt_id=prompt_id, id_a=id_a, id_b=id_b))
        verdicts += pairwise_judge.compare(items)
        log(f"pairwise: judged {min(start + batch_size, len(triples))}/{len(triples)} pairs in both orders")
    return verdicts


def verdicts_frame(verdicts):
    import polars as pl

    fields = ("key", "prompt_id", "id_a", "id_b", "status", "verdict", "consistent", "answer_ab", "answer_ba",
              "reason_ab", "reason_ba", "error", "attempts")
    return pl.DataFrame([{f: getattr(v, f) for f in fields} for v in verdicts],
                        schema={f: (pl.Boolean if f == "consistent" else pl.Int64 if f == "attempts" else pl.String)
                                for f in fields})


def pairwise_partition(pairwise_judge, labels, prompts, images: dict, out_dir: Path, settings: dict[str, Any],
                       batch_size: int, log: Callable[[str], None] = print):
    """Returns (pairs, drops, verdicts table). Verdicts are written to ``out_dir/verdicts.parquet``. ``settings``:
    a validated pairwise ``pairs`` section's ``max_pairs_per_prompt``, ``bt_prior`` and ``tie_policy``."""
    from labelers.pairwise import verdicts_to_pairs
    from pipelines.io import write_parquet

    prompts_by_id = {row["prompt_id"]: row for row in prompts.iter_rows(named=True)}
    triples = candidate_pairs(labels, settings["max_pairs_per_prompt"])
    verdicts = judge_pairs(pairwise_judge, triples, prompts_by_id, images, batch_size, log)
    table = verdicts_frame(verdicts)
    write_parquet(table, out_dir / "verdicts.parquet")
    pairs, drops = verdicts_to_pairs(verdicts, prior=settings["bt_prior"], tie_policy=settings["tie_policy"])
    return pairs, drops, table
