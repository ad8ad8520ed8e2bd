"""Preference pairs from labelled candidates (DESIGN.md ``pairs`` contract).

``select_pairs(labels, ...)`` groups the ``ok`` rows of a labels table by ``prompt_id`` and pairs candidates:

* ``best_vs_worst``: one pair per prompt, the highest reward against the lowest-reward candidate whose image
  differs from the best one;
* ``all_pairs``: every pair of distinct-image candidates, the higher reward chosen; at most
  ``max_pairs_per_prompt`` per prompt, keeping the largest margins.

``p_chosen`` is the Bradley-Terry probability ``σ((r_chosen - r_rejected) / τ)`` and ``margin`` the reward
difference. A pair whose margin is ``<= tie_margin`` is a tie: dropped (``tie_policy="drop"``) or kept with
``label = 0.5`` (``"keep"``); otherwise a margin below ``min_margin`` drops it. ``label_mode``:

* ``deterministic``: the higher reward is chosen, ``label = 1.0``;
* ``sampled``: the winner is drawn from Bernoulli(``p_chosen``) with a per-pair seeded generator (RPO-style
  stochastic Bradley-Terry labels); an upset swaps chosen and rejected (their ``margin`` is then negative
  and ``p_chosen`` < 0.5), ``label = 1.0``;
* ``soft``: as deterministic but ``label = p_chosen``.

Returns ``(pairs, drops)``; ``drops`` always has every reason key: ``not_ok`` (label rows not ``ok`` or without a
reward), ``single_candidate`` (prompts with fewer than two usable candidates), ``identical_image`` (candidate pairs
skipped because both images have the same ``image_sha256``; needs that column, e.g. from the candidates table),
``tie``, ``below_margin``, ``capped`` (pairs over ``max_pairs_per_prompt``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from labelers.bradley_terry import bt_probability
from labelers.hashing import content_id

STRATEGIES = ("best_vs_worst", "all_pairs")
TIE_POLICIES = ("drop", "keep")
LABEL_MODES = ("deterministic", "sampled", "soft")
DROP_REASONS = ("not_ok", "single_candidate", "identical_image", "tie", "below_margin", "capped")
PAIR_COLUMNS = ("pair_id", "prompt_id", "chosen_id", "rejected_id", "p_chosen", "margin", "strategy", "label")


def pairs_schema() -> dict:
    import polars as pl

    return {
        "pair_id": pl.Utf8,
        "prompt_id": pl.Utf8,
        "chosen_id": pl.Utf8,
        "rejected_id": pl.Utf8,
        "p_chosen": pl.Float64,
        "margin": pl.Float64,
        "strategy": pl.Utf8,
        "label": pl.Float64,
    }


def _pair_uniform(seed: int, prompt_id: str, a: str, b: str) -> float:
    """A uniform [0, 1) draw that depends only on the seed and the (unordered) pair."""
    lo, hi = sorted((a, b))
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{lo}|{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_pairs(
    labels: Any,
    strategy: str = "best_vs_worst",
    min_margin: float = 0.0,
    tau: float = 0.1,
    tie_policy: str = "drop",
    label_mode: str = "deterministic",
    seed: int = 0,
    max_pairs_per_prompt: int | None = None,
    tie_margin: float = 1e-9,
) -> tuple[Any, dict[str, int]]:
    """Build preference pairs from a labels ``polars.DataFrame`` (``candidate_id, prompt_id, reward, status``
    and optionally ``image_sha256``). Deterministic for a given table and arguments."""
    import polars as pl

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; known: {TIE_POLICIES}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label_mode {label_mode!r}; known: {LABEL_MODES}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError("max_pairs_per_prompt must be >= 1 or None")
    missing = [c for c in ("candidate_id", "prompt_id", "reward", "status") if c not in labels.columns]
    if missing:
        raise ValueError(f"labels table lacks column(s) {missing}")

    drops = {reason: 0 for reason in DROP_REASONS}
    usable_mask = (pl.col("status") == "ok") & pl.col("reward").is_not_null() & pl.col("reward").is_not_nan()
    has_sha = "image_sha256" in labels.columns
    cols = ["candidate_id", "prompt_id", "reward"] + (["image_sha256"] if has_sha else [])
    usable = labels.filter(usable_mask).select(cols)
    drops["not_ok"] = labels.height - usable.height
    usable = usable.unique(subset=["candidate_id"], keep="first", maintain_order=True)

    rows: list[dict] = []
    # Highest reward first; candidate_id breaks ties so the result never depends on row order.
    ordered = usable.sort(["prompt_id", "reward", "candidate_id"], descending=[False, True, False])
    for (prompt_id,), group in ordered.group_by(["prompt_id"], maintain_order=True):
        cands = group.to_dicts()
        if len(cands) < 2:
            drops["single_candidate"] += 1
            continue

        def same_image(a: dict, b: dict) -> bool:
            return has_sha and a.get("image_sha256") is not None and a.get("image_sha256") == b.get("image_sha256")

        candidates_pairs: list[tuple[dict, dict]] = []
        if strategy == "best_vs_worst":
            best = cands[0]
            worst = next((c for c in reversed(cands[1:]) if not same_image(best, c)), None)
            if worst is None:
                drops["identical_image"] += 1
                continue
            candidates_pairs.append((best, worst))
        else:
            for i in range(len(cands)):
                for j in range(i + 1, len(cands)):
                    if same_image(cands[i], cands[j]):
                        drops["identical_image"] += 1
                        continue
                    candidates_pairs.append((cands[i], cands[j]))

        kept: list[tuple[dict, dict, float, bool]] = []
        for hi, lo in candidates_pairs:
            margin = float(hi["reward"]) - float(lo["reward"])
            tie = margin <= tie_margin
            if tie and tie_policy == "drop":
                drops["tie"] += 1
                continue
            if not tie and margin < min_margin:
                drops["below_margin"] += 1
                continue
            kept.append((hi, lo, margin, tie))
        if max_pairs_per_prompt is not None and len(kept) > max_pairs_per_prompt:
            kept.sort(key=lambda p: (-p[2], p[0]["candidate_id"], p[1]["candidate_id"]))
            drops["capped"] += len(kept) - max_pairs_per_prompt
            kept = kept[:max_pairs_per_prompt]

        for hi, lo, margin, tie in kept:
            chosen, rejected = hi, lo
            if tie:
                label, p = 0.5, 0.5
            else:
                p = float(bt_probability(hi["reward"], lo["reward"], tau))
                label = 1.0
                if label_mode == "sampled" and _pair_uniform(seed, prompt_id, hi["candidate_id"], lo["candidate_id"]) >= p:
                    chosen, rejected, p = lo, hi, 1.0 - p
                elif label_mode == "soft":
                    label = p
            r_margin = float(chosen["reward"]) - float(rejected["reward"])
            rows.append(
                {
                    "pair_id": content_id(prompt_id, chosen["candidate_id"], rejected["candidate_id"], strategy),
                    "prompt_id": prompt_id,
                    "chosen_id": chosen["candidate_id"],
                    "rejected_id": rejected["candidate_id"],
                    "p_chosen": p,
                    "margin": r_margin,
                    "strategy": strategy,
                    "label": label,
                }
            )
    return pl.DataFrame(rows, schema=pairs_schema()), drops
