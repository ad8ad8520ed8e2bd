"""Preference pairs from labelled candidates (DESIGN.md ``pairs`` contract).

``select_pairs(labels, ...)`` takes the usable rows of a labels table (``status == "ok"`` with a reward), orders
each prompt's candidates by reward, highest first (equal rewards: smaller ``candidate_id`` first, so nothing
depends on the input row order) and pairs them with one of these strategies:

* ``best_vs_worst``: one pair per prompt, the best candidate against the lowest-reward candidate whose image
  differs from the best one (when the worst has the best's image, the next-lowest is taken, and so on);
* ``all_pairs``: every pair of the prompt's candidates, the higher one first;
* ``top_bottom_k``: every one of the ``top_k`` best against every one of the ``top_k`` worst (``top_k²`` pairs).
  The two sets never overlap: a prompt with ``n < 2 * top_k`` candidates pairs its best ``n // 2`` against its
  worst ``n // 2`` (the middle candidate of an odd ``n`` is left out), so ``n = 3, top_k = 2`` gives one pair;
* ``pareto``: every pair in which one candidate Pareto-dominates the other on the score columns ``dimensions``
  (at least as good on every dimension, strictly better on at least one; higher scores are better, so negate a
  lower-is-better column first); the dominating one is the pair's first. A pair where neither dominates (equal everywhere, each better somewhere, or a dimension missing —
  null or NaN — for either candidate, which makes that dimension and so the pair not comparable) is dropped as
  ``not_pareto``. Its ``margin`` is still the reward difference, first minus second: when the aggregate
  reward strictly disagrees with the dimensions (the dominating candidate's reward is lower by more than
  ``tie_margin``), the preference is contradictory and the pair is dropped as ``reward_disagrees``; so a kept
  Pareto pair has ``margin >= -tie_margin`` and a non-tie one ``margin > tie_margin``, like the other strategies.

Candidates with the same non-null ``image_sha256`` are never paired (``identical_image``; needs that column, e.g.
joined from the candidates table; without it no two images count as identical).

A pair's first candidate (the higher one) is ``chosen`` and its ``margin = r_chosen - r_rejected``;
``p_chosen = σ(margin / τ)`` (Bradley-Terry). A pair whose ``|margin| <= tie_margin`` is a tie: dropped
(``tie_policy="drop"``) or kept with ``label = p_chosen = 0.5`` (``"keep"``; ties never need a margin). Any other
pair must clear ``min_margin``: on the reward difference (``margin_on="reward"``: ``margin >= min_margin``) or on
the probability (``margin_on="probability"``: ``p_chosen - 0.5 >= min_margin``, so ``min_margin=0.2`` keeps pairs
with ``p_chosen >= 0.7``; ``min_margin`` must then be in ``[0, 0.5)``). ``tie_margin`` is always in reward units.
``max_pairs_per_prompt`` (every strategy) keeps a prompt's pairs with the largest margins (equal margins: the
smaller chosen id, then the smaller rejected id); with a cap, each prompt's pairs come in that order, otherwise in
the candidates' order (chosen rank, then rejected rank); prompts come in ``prompt_id`` order. ``label_mode``:

* ``deterministic``: the higher candidate is chosen, ``label = 1.0``;
* ``sampled``: the winner is drawn from Bernoulli(``p_chosen``) (RPO-style stochastic Bradley-Terry labels) with a
  uniform that depends only on ``seed``, ``prompt_id`` and the unordered pair of candidate ids (first 8 bytes of
  ``sha256(f"{seed}|{prompt_id}|{smaller id}|{larger id}")`` over 2^64); an upset swaps chosen and rejected (their
  ``margin`` is then negative and ``p_chosen`` < 0.5), ``label = 1.0``; ties stay ties; ties, margins and the cap
  are decided before the draw, on the unswapped pair;
* ``soft``: as deterministic but ``label = p_chosen``.

``pair_id = content_id(prompt_id, chosen_id, rejected_id, strategy)`` (:mod:`labelers.hashing`), as before and as
:mod:`labelers.pairwise` writes it, so corpora keyed by it stay stable: polars writes every JSON payload at once and
only the sha256 itself runs once per pair in Python (about 0.5 µs; ``content_id`` called per pair costs ~5 µs).
The sampled-label uniforms are computed the same way.

Everything is vectorised (one sort of the usable rows, then numpy index arithmetic on the prompt blocks); nothing
loops over prompts or rows in Python except those two hashes.

Returns ``(pairs, drops)``; ``drops`` always has every key of :data:`DROP_REASONS`, each dropped row, prompt or
candidate pair counted once, under the first reason that applies, in this order:

* ``not_ok``: label rows that are not ``ok``, lack a reward (null or NaN), a ``prompt_id`` or a ``candidate_id``;
* ``duplicate_candidate``: usable rows whose ``candidate_id`` already has a usable row (one row per candidate is
  kept: the first in the order ``prompt_id``, reward descending, then the other columns ascending);
* ``single_candidate``: prompts with fewer than two usable candidates;
* ``identical_image``: candidate pairs whose images have the same ``image_sha256``; for ``best_vs_worst``, prompts
  where every other candidate has the best one's image;
* ``not_pareto`` (pareto): candidate pairs where neither candidate dominates the other;
* ``reward_disagrees`` (pareto): the dominating candidate has the lower reward (by more than ``tie_margin``);
* ``tie``: pairs with ``|margin| <= tie_margin`` under ``tie_policy="drop"``;
* ``below_margin``: pairs that do not clear ``min_margin``;
* ``capped``: pairs over ``max_pairs_per_prompt``.

So for ``all_pairs`` and ``pareto`` a prompt's ``n (n - 1) / 2`` candidate pairs are all either kept or counted.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from labelers.bradley_terry import bt_probability

STRATEGIES = ("best_vs_worst", "all_pairs", "top_bottom_k", "pareto")
TIE_POLICIES = ("drop", "keep")
LABEL_MODES = ("deterministic", "sampled", "soft")
MARGIN_ON = ("reward", "probability")
DROP_REASONS = (
    "not_ok",
    "duplicate_candidate",
    "single_candidate",
    "identical_image",
    "not_pareto",
    "reward_disagrees",
    "tie",
    "below_margin",
    "capped",
)
PAIR_COLUMNS = ("pair_id", "prompt_id", "chosen_id", "rejected_id", "p_chosen", "margin", "strategy", "label")
REQUIRED_COLUMNS = ("candidate_id", "prompt_id", "reward", "status")

# What json.dumps(..., ensure_ascii=False) escapes inside a string (labelers.hashing.content_id): the quote, the
# backslash and the control characters; taken from json itself so the payload matches it byte for byte.
_JSON_ESCAPES = {ch: json.dumps(ch)[1:-1] for ch in ['"', "\\", *map(chr, range(0x20))]}


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
    """A uniform [0, 1) draw that depends only on the seed and the (unordered) pair (the per-pair reference of what
    :func:`_pair_uniforms` computes for many pairs at once)."""
    lo, hi = sorted((a, b))
    digest = hashlib.sha256(f"{seed}|{prompt_id}|{lo}|{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pair_uniforms(seed: int, prompt_ids: Any, ids_a: Any, ids_b: Any) -> Any:
    """:func:`_pair_uniform` for aligned string Series, as a float64 array: the payloads are built by polars, only
    the sha256 itself runs once per pair in Python."""
    import numpy as np
    import polars as pl

    frame = pl.DataFrame({"p": prompt_ids, "a": ids_a, "b": ids_b})
    payloads = frame.select(
        pl.concat_str(
            [pl.lit(f"{seed}|"), pl.col("p"), pl.lit("|"), pl.min_horizontal("a", "b"), pl.lit("|"),
             pl.max_horizontal("a", "b")]
        )
    ).to_series()
    sha256 = hashlib.sha256
    digests = b"".join([sha256(payload).digest()[:8] for payload in payloads.cast(pl.Binary).to_list()])
    return np.frombuffer(digests, dtype=">u8").astype(np.float64) / 2.0**64


def _content_ids(prompt_ids: Any, chosen_ids: Any, rejected_ids: Any, strategy: str) -> Any:
    """``content_id(prompt_id, chosen_id, rejected_id, strategy)`` for aligned string Series, as a Series: polars
    writes each payload, ``json.dumps([prompt_id, chosen_id, rejected_id, strategy], ensure_ascii=False)`` with
    ``separators=(",", ":")``, and only the sha256 runs once per pair in Python."""
    import numpy as np
    import polars as pl

    def payloads(escape: bool) -> list[bytes]:
        def quoted(series: Any) -> Any:
            text = pl.lit(series)
            return text.str.replace_many(list(_JSON_ESCAPES), list(_JSON_ESCAPES.values())) if escape else text

        tail = '","' + json.dumps(strategy, ensure_ascii=False)[1:] + "]"
        return pl.select(
            pl.concat_str([pl.lit('["'), quoted(prompt_ids), pl.lit('","'), quoted(chosen_ids), pl.lit('","'),
                           quoted(rejected_ids), pl.lit(tail)])
        ).to_series().cast(pl.Binary).to_list()

    raw = payloads(escape=False)
    # Unescaped payloads are right unless an id holds a quote, a backslash or a control character: then the blob
    # of all payloads has more than the 6 structural quotes per pair (plus the strategy's), a backslash or a
    # control byte. One check over the blob instead of a regex per id.
    blob = np.frombuffer(b"".join(raw), dtype=np.uint8)
    quotes_per_payload = 6 + json.dumps(strategy, ensure_ascii=False).count('"')
    if (blob < 0x20).any() or (blob == ord("\\")).any() or (blob == ord('"')).sum() != quotes_per_payload * len(raw):
        raw = payloads(escape=True)
    sha256 = hashlib.sha256
    return pl.Series("pair_id", [sha256(payload).hexdigest()[:32] for payload in raw], dtype=pl.Utf8)


def _validate(labels: Any, strategy: str, min_margin: float, tau: float, tie_policy: str, label_mode: str,
              max_pairs_per_prompt: int | None, top_k: int, dimensions: list[str] | None, margin_on: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; known: {TIE_POLICIES}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label_mode {label_mode!r}; known: {LABEL_MODES}")
    if margin_on not in MARGIN_ON:
        raise ValueError(f"unknown margin_on {margin_on!r}; known: {MARGIN_ON}")
    if margin_on == "probability" and not 0.0 <= min_margin < 0.5:
        raise ValueError(f"with margin_on='probability' min_margin is p_chosen - 0.5 and must be in [0, 0.5), "
                         f"got {min_margin}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError("max_pairs_per_prompt must be >= 1 or None")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    missing = [c for c in REQUIRED_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(f"labels table lacks column(s) {missing}")
    if strategy == "pareto":
        if not dimensions:
            raise ValueError("strategy='pareto' needs dimensions: the labels columns holding per-dimension scores")
        missing = [c for c in dimensions if c not in labels.columns]
        if missing:
            raise ValueError(f"pareto dimension column(s) {missing} not in the labels table")


def _usable_candidates(labels: Any, has_sha: bool, dimensions: list[str], drops: dict[str, int]) -> Any:
    """The usable rows, one per candidate, sorted by prompt, reward descending, candidate id (a total order)."""
    import polars as pl

    usable_mask = (
        (pl.col("status") == "ok") & pl.col("reward").is_not_null() & pl.col("reward").cast(pl.Float64).is_finite()
        & pl.col("prompt_id").is_not_null() & pl.col("candidate_id").is_not_null()
    )
    columns = [
        pl.col("candidate_id").cast(pl.Utf8),
        pl.col("prompt_id").cast(pl.Utf8),
        pl.col("reward").cast(pl.Float64),
        *([pl.col("image_sha256").cast(pl.Utf8)] if has_sha else []),
        *[pl.col(d).cast(pl.Float64).fill_nan(None).alias(f"dim{i}") for i, d in enumerate(dimensions)],
    ]
    order = ["prompt_id", "reward", "candidate_id"]
    # eager: measured cheaper than the same query run lazily (polars 2.1)
    cands = labels.filter(usable_mask).select(columns).sort(order, descending=[False, True, False])
    drops["not_ok"] = labels.height - cands.height
    # Distinct 64-bit hashes prove the ids distinct (equal ids hash alike) and are cheaper to count than strings;
    # the hash's values never reach the output, so its instability across polars versions does not matter.
    ids_distinct = cands["candidate_id"].hash().n_unique() == cands.height
    if not ids_distinct and cands["candidate_id"].n_unique() < cands.height:
        # Rare: a candidate labelled twice. Keep one row, chosen by every column so the input order never matters.
        rest = [c for c in cands.columns if c not in order]
        full_order = cands.sort([*order, *rest], descending=[False, True, False, *([False] * len(rest))],
                                nulls_last=True)
        deduped = full_order.unique(subset=["candidate_id"], keep="first", maintain_order=True)
        drops["duplicate_candidate"] = cands.height - deduped.height
        cands = deduped
    return cands


def _same_image(sha: Any, first: Any, second: Any) -> Any:
    """Whether rows ``first[i]`` and ``second[i]`` of the string Series ``sha`` hold the same non-null value. Compares
    64-bit hashes (equal strings hash alike; the values never leave this function, so polars' hash being unstable
    across versions does not matter) and the strings themselves only where the hashes agree."""
    import numpy as np

    hashes = sha.hash().to_numpy()
    known = sha.is_not_null().to_numpy()
    maybe = np.flatnonzero(known[first] & known[second] & (hashes[first] == hashes[second]))
    same = np.zeros(first.size, dtype=bool)
    if maybe.size:
        same[maybe] = (sha.gather(first[maybe]) == sha.gather(second[maybe])).to_numpy()
    return same


def _best_vs_worst(cands: Any, has_sha: bool, sizes: Any, row_start: Any, pos: Any,
                   drops: dict[str, int]) -> tuple[Any, Any]:
    """Per prompt: its first row against its last row whose image differs from the first one's."""
    import numpy as np

    eligible = pos > 0
    if has_sha:
        eligible &= ~_same_image(cands["image_sha256"], np.arange(pos.size), row_start)
    rows = np.flatnonzero(eligible)
    group_of = row_start[rows]
    last_of_group = np.ones(rows.size, dtype=bool)
    last_of_group[:-1] = group_of[1:] != group_of[:-1]
    worst = rows[last_of_group]
    drops["identical_image"] += int((sizes >= 2).sum()) - worst.size
    return row_start[worst], worst


def _within_group_offsets(counts: Any) -> Any:
    """For blocks of the given lengths laid end to end: each element's offset inside its block."""
    import numpy as np

    total = int(counts.sum())
    block_start = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(block_start, counts)


def _all_pairs(row_start: Any, row_size: Any, pos: Any) -> tuple[Any, Any]:
    """Every (i, j) with i before j in the same prompt, ordered by (i, j)."""
    import numpy as np

    partners = row_size - pos - 1
    first = np.repeat(np.arange(pos.size, dtype=np.int64), partners)
    return first, first + 1 + _within_group_offsets(partners)


def _top_bottom_k(row_start: Any, row_size: Any, pos: Any, k: int) -> tuple[Any, Any]:
    """The first ``m`` of each prompt against its last ``m``, ``m = min(k, n // 2)``."""
    import numpy as np

    m = np.minimum(k, row_size // 2)
    top = np.flatnonzero(pos < m)
    first = np.repeat(top, m[top])
    bottom_start = row_start[first] + row_size[first] - m[first]
    return first, bottom_start + _within_group_offsets(m[top])


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
    *,
    top_k: int = 1,
    dimensions: list[str] | None = None,
    margin_on: str = "reward",
) -> tuple[Any, dict[str, int]]:
    """Build preference pairs from a labels ``polars.DataFrame`` (``candidate_id, prompt_id, reward, status``,
    optionally ``image_sha256`` and, for ``pareto``, the ``dimensions`` score columns). See the module docstring for
    the strategies, margins, ties, label modes and drop reasons. ``top_k`` is used by ``top_bottom_k`` only,
    ``dimensions`` by ``pareto`` only. Deterministic for a given table and arguments, whatever its row order."""
    import numpy as np
    import polars as pl

    _validate(labels, strategy, min_margin, tau, tie_policy, label_mode, max_pairs_per_prompt, top_k, dimensions,
              margin_on)
    drops = {reason: 0 for reason in DROP_REASONS}
    has_sha = "image_sha256" in labels.columns
    dims = list(dimensions) if strategy == "pareto" else []
    cands = _usable_candidates(labels, has_sha, dims, drops)
    if cands.height == 0:
        return pl.DataFrame(schema=pairs_schema()), drops

    # Prompt blocks of the sorted table: each row's block start, block size and rank inside its block.
    group = cands["prompt_id"].rle_id().to_numpy()
    is_start = np.ones(group.size, dtype=bool)
    is_start[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(is_start)
    sizes = np.diff(np.append(starts, group.size))
    row_start = np.repeat(starts, sizes)
    row_size = np.repeat(sizes, sizes)
    pos = np.arange(group.size, dtype=np.int64) - row_start
    drops["single_candidate"] = int((sizes < 2).sum())

    # Candidate pairs as row indices: ``first`` is the higher in the prompt's order, ``second`` the lower.
    if strategy == "best_vs_worst":
        first, second = _best_vs_worst(cands, has_sha, sizes, row_start, pos, drops)
    elif strategy == "top_bottom_k":
        first, second = _top_bottom_k(row_start, row_size, pos, top_k)
    else:
        first, second = _all_pairs(row_start, row_size, pos)

    alive = np.ones(first.size, dtype=bool)

    def drop(reason: str, failing: Any) -> None:
        hit = alive & failing
        drops[reason] += int(hit.sum())
        alive[hit] = False

    if has_sha and strategy != "best_vs_worst":
        drop("identical_image", _same_image(cands["image_sha256"], first, second))

    rewards = cands["reward"].to_numpy()
    if strategy == "pareto":
        # NaN (missing) compares false both ways, so a pair with a missing dimension dominates neither way.
        first_ge = second_ge = np.ones(first.size, dtype=bool)
        first_gt = second_gt = np.zeros(first.size, dtype=bool)
        for i in range(len(dims)):
            score = cands[f"dim{i}"].to_numpy(allow_copy=True).astype(np.float64)
            a, b = score[first], score[second]
            first_ge, second_ge = first_ge & (a >= b), second_ge & (b >= a)
            first_gt, second_gt = first_gt | (a > b), second_gt | (b > a)
        first_dominates, second_dominates = first_ge & first_gt, second_ge & second_gt
        drop("not_pareto", ~(first_dominates | second_dominates))
        first, second = np.where(second_dominates, second, first), np.where(second_dominates, first, second)
        margin = rewards[first] - rewards[second]
        drop("reward_disagrees", margin < -tie_margin)
        tie = np.abs(margin) <= tie_margin
    else:
        margin = rewards[first] - rewards[second]
        tie = margin <= tie_margin
    if tie_policy == "drop":
        drop("tie", tie)
    p_first = np.asarray(bt_probability(rewards[first], rewards[second], tau), dtype=np.float64)
    clearance = margin if margin_on == "reward" else p_first - 0.5
    drop("below_margin", ~tie & (clearance < min_margin))

    keep = np.flatnonzero(alive)
    first, second, margin, tie, p_first = first[keep], second[keep], margin[keep], tie[keep], p_first[keep]
    ids = cands["candidate_id"]
    if max_pairs_per_prompt is not None and first.size:
        ranked = pl.DataFrame({
            "block": row_start[first],
            "neg_margin": -margin,
            "first_id": ids.gather(pl.Series(first)),
            "second_id": ids.gather(pl.Series(second)),
            "index": np.arange(first.size, dtype=np.int64),
        }).sort(["block", "neg_margin", "first_id", "second_id"])
        block = ranked["block"].to_numpy()
        order = ranked["index"].to_numpy()
        block_is_start = np.ones(block.size, dtype=bool)
        block_is_start[1:] = block[1:] != block[:-1]
        block_starts = np.flatnonzero(block_is_start)
        rank = np.arange(block.size) - np.repeat(block_starts, np.diff(np.append(block_starts, block.size)))
        within_cap = rank < max_pairs_per_prompt
        drops["capped"] += int((~within_cap).sum())
        order = order[within_cap]
        first, second, margin, tie, p_first = first[order], second[order], margin[order], tie[order], p_first[order]

    prompt_ids = cands["prompt_id"].gather(pl.Series(first))
    chosen, rejected = first, second
    p_chosen = np.where(tie, 0.5, p_first)
    label = np.where(tie, 0.5, p_first if label_mode == "soft" else 1.0)
    if label_mode == "sampled":
        upset = np.zeros(first.size, dtype=bool)
        contest = np.flatnonzero(~tie)
        if contest.size:
            draws = _pair_uniforms(seed, prompt_ids.gather(pl.Series(contest)),
                                   ids.gather(pl.Series(first[contest])), ids.gather(pl.Series(second[contest])))
            upset[contest] = draws >= p_first[contest]
        chosen, rejected = np.where(upset, second, first), np.where(upset, first, second)
        p_chosen = np.where(upset, 1.0 - p_chosen, p_chosen)
        margin = np.where(upset, rewards[chosen] - rewards[rejected], margin)

    chosen_ids = ids.gather(pl.Series(chosen))
    rejected_ids = ids.gather(pl.Series(rejected))
    return pl.DataFrame(
        {
            "pair_id": _content_ids(prompt_ids, chosen_ids, rejected_ids, strategy),
            "prompt_id": prompt_ids,
            "chosen_id": chosen_ids,
            "rejected_id": rejected_ids,
            "p_chosen": p_chosen,
            "margin": margin,
            "strategy": pl.repeat(strategy, chosen.size, dtype=pl.Utf8, eager=True),
            "label": label,
        },
        schema=pairs_schema(),
    ), drops
