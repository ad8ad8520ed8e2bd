"""Label diagnostics: is the judge healthy, and does it agree with CLIP? Pure functions over label tables.

* :func:`score_histograms`: per rubric dimension, how many ``ok`` rows scored 0, 1, ..., 5 (a judge that always
  answers 3, or never uses the ends of the scale, shows at a glance).
* :func:`parse_error_rate`: the fraction of judged rows whose answer stayed invalid after the retries
  (``reward_error`` rows — a judged row with a NaN / inf among its rewards — were judged and count as such).
* :func:`judge_clip_agreement`: over pairs of ``ok`` candidates of the same prompt, how often the candidate the
  judge scores higher (mean over its dimensions) is also the one with the higher ``lambda_harmonic``.
* :func:`position_bias_rate`: for pairwise verdicts asked in both orders, how often the two answers pick the same
  *position* — the judge preferring "the first image" (or the second), not an image.
* :func:`diagnostics_markdown`: all of it as a compact Markdown table (Dagster ``MetadataValue.md``).

``labels`` is the label table of DESIGN.md (``candidate_id``, ``prompt_id``, one float column per rubric
dimension, ``lambda_harmonic``, ``status``, ...). polars is imported inside the functions; no Dagster.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from labelers.judge.protocol import STATUS_OK, STATUS_PARSE_ERROR, STATUS_REWARD_ERROR, STATUSES
from labelers.rubrics import SCORE_MAX, SCORE_MIN

if TYPE_CHECKING:  # pragma: no cover
    import polars as pl

SCORES = tuple(range(int(SCORE_MIN), int(SCORE_MAX) + 1))  # 0..5
POSITIONS = ("A", "B", "tie")


def _require(labels: pl.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in labels.columns]
    if missing:
        raise ValueError(f"label table lacks column(s) {missing}")


def label_dimensions(labels: pl.DataFrame, dimensions: Sequence[str] | None = None) -> list[str]:
    """``dimensions`` checked against the table's columns; ``None``: every rubric dimension the table has."""
    if dimensions is not None:
        dims = list(dimensions)
        _require(labels, dims)
        return dims
    from labelers.rubrics import all_dimensions

    return [d for d in all_dimensions() if d in labels.columns]


def _ok(labels: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    _require(labels, ["status"])
    return labels.filter(pl.col("status") == STATUS_OK)


def score_histograms(labels: pl.DataFrame, dimensions: Sequence[str] | None = None) -> dict[str, list[int]]:
    """``{dimension: [count of score 0, count of 1, ..., count of 5]}`` over the ``ok`` rows.

    Rows where a dimension is null (it belongs to another task's rubric) do not count for it. Scores are rounded
    to the nearest integer (halves up) before counting — the constrained judges only emit integers; a score
    outside 0..5 is an error (the label contract forbids it).
    """
    ok = _ok(labels)
    out: dict[str, list[int]] = {}
    for dim in label_dimensions(labels, dimensions):
        values = ok.get_column(dim).drop_nulls().cast(float).to_numpy()
        values = values[~np.isnan(values)]
        binned = np.floor(values + 0.5).astype(np.int64)
        if binned.size and (binned.min() < SCORES[0] or binned.max() > SCORES[-1]):
            raise ValueError(f"{dim}: scores outside {SCORES[0]}..{SCORES[-1]} in ok rows")
        counts = np.bincount(binned - SCORES[0], minlength=len(SCORES)) if binned.size else np.zeros(len(SCORES))
        out[dim] = [int(c) for c in counts]
    return out


def status_counts(labels: pl.DataFrame) -> dict[str, int]:
    """Rows per status, every known status present (0 when absent); unknown statuses are counted as they are."""
    _require(labels, ["status"])
    counts = {s: 0 for s in STATUSES}
    for status, n in labels.get_column("status").value_counts(sort=False).iter_rows():
        counts[str(status)] = counts.get(str(status), 0) + int(n)
    return counts


def _judged(counts: dict[str, int]) -> int:
    return counts[STATUS_OK] + counts[STATUS_PARSE_ERROR] + counts[STATUS_REWARD_ERROR]


def parse_error_rate(labels: pl.DataFrame) -> float | None:
    """``parse_error`` rows / rows that reached the judge (``ok`` + ``parse_error`` + ``reward_error``).

    ``image_error`` rows never reach the model, so they count neither way; a ``reward_error`` row's judgement
    parsed (its rewards did not), so it counts as judged. ``None`` when no row was judged.
    """
    counts = status_counts(labels)
    judged = _judged(counts)
    return counts[STATUS_PARSE_ERROR] / judged if judged else None


def judge_clip_agreement(labels: pl.DataFrame, min_margin: float = 0.0,
                         dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    """How often the judge and CLIP's λ-Harmonic order the candidates of a prompt the same way.

    Every pair of ``ok`` candidates of the same prompt is a candidate comparison; its judge score is the mean over
    the row's non-null dimension columns (``dimensions``, default every rubric dimension in the table). A pair
    is *comparable* when both rows have a judge mean and a ``lambda_harmonic``, their judge means differ by more
    than ``min_margin`` and their ``lambda_harmonic`` differ (ties on either side are excluded and counted).
    Returns ``{"agreement": agreeing / comparable (None when nothing is comparable), "comparable_pairs",
    "agreeing_pairs", "judge_ties", "clip_ties", "prompts"}`` — ``prompts`` counts prompts with a comparable pair.
    """
    import polars as pl

    _require(labels, ["candidate_id", "prompt_id", "lambda_harmonic", "status"])
    dims = label_dimensions(labels, dimensions)
    empty = {"agreement": None, "comparable_pairs": 0, "agreeing_pairs": 0, "judge_ties": 0, "clip_ties": 0,
             "prompts": 0}
    if not dims:
        return empty
    rows = (
        _ok(labels)
        .select(
            pl.col("prompt_id"),
            pl.col("candidate_id"),
            pl.mean_horizontal([pl.col(d).cast(pl.Float64) for d in dims]).alias("judge"),
            pl.col("lambda_harmonic").cast(pl.Float64).alias("clip"),
        )
        .drop_nulls()
        .filter(pl.col("judge").is_not_nan() & pl.col("clip").is_not_nan())
        .unique(subset=["candidate_id"], keep="first", maintain_order=True)
    )
    pairs = rows.join(rows, on="prompt_id", suffix="_b").filter(pl.col("candidate_id") < pl.col("candidate_id_b"))
    if pairs.height == 0:
        return empty
    dj = (pairs.get_column("judge") - pairs.get_column("judge_b")).to_numpy()
    dc = (pairs.get_column("clip") - pairs.get_column("clip_b")).to_numpy()
    tol = 1e-12  # judge means of integer scores are exact; this only absorbs float noise at min_margin
    judge_tie = np.abs(dj) <= float(min_margin) + tol
    clip_tie = ~judge_tie & (dc == 0)
    comparable = ~judge_tie & ~clip_tie
    agree = comparable & (np.sign(dj) == np.sign(dc))
    n = int(comparable.sum())
    prompts = pairs.get_column("prompt_id").to_numpy()[comparable]
    return {
        "agreement": int(agree.sum()) / n if n else None,
        "comparable_pairs": n,
        "agreeing_pairs": int(agree.sum()),
        "judge_ties": int(judge_tie.sum()),
        "clip_ties": int(clip_tie.sum()),
        "prompts": int(len(set(prompts.tolist()))),
    }


def _position_answers(verdicts: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The two orders' answers of the pairs where both are present (nulls: a parse/image error, skipped)."""
    import polars as pl

    missing = [c for c in ("first_order", "second_order") if c not in verdicts.columns]
    if missing:
        raise ValueError(f"verdicts lack column(s) {missing}")
    both = verdicts.select("first_order", "second_order").drop_nulls()
    for col in ("first_order", "second_order"):
        bad = both.filter(~pl.col(col).is_in(list(POSITIONS))).get_column(col).unique().to_list()
        if bad:
            raise ValueError(f"{col}: answers {sorted(map(str, bad))} are not one of {list(POSITIONS)}")
    return both.get_column("first_order").to_numpy(), both.get_column("second_order").to_numpy()


def position_bias_counts(verdicts: pl.DataFrame) -> dict[str, int]:
    """``{"pairs": pairs with both answers, "same_position": both "A" or both "B", "consistent": one "A" and
    one "B", "ties": at least one "tie"}``."""
    first, second = _position_answers(verdicts)
    same = (first == second) & (first != "tie")
    flipped = ((first == "A") & (second == "B")) | ((first == "B") & (second == "A"))
    return {"pairs": int(first.size), "same_position": int(same.sum()), "consistent": int(flipped.sum()),
            "ties": int(((first == "tie") | (second == "tie")).sum())}


def position_bias_rate(verdicts: pl.DataFrame) -> float | None:
    """The fraction of pairs (asked in both orders; ``first_order`` / ``second_order`` in {"A", "B", "tie"}, "A"
    = the first-shown image wins) whose two answers pick the same position — both "A" or both "B" — i.e. answers
    that contradict each other once the order is undone. Pairs missing an answer (null) are left out; ties count
    in the denominator. ``None`` when no pair has both answers."""
    counts = position_bias_counts(verdicts)
    return counts["same_position"] / counts["pairs"] if counts["pairs"] else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def diagnostics_markdown(labels: pl.DataFrame, dimensions: Sequence[str] | None = None,
                         verdicts: pl.DataFrame | None = None, min_margin: float = 0.0) -> str:
    """A compact Markdown summary: one table of headline figures (rows by status, parse-error rate, judge/CLIP
    agreement, position bias when ``verdicts`` are given), then one row per dimension with ``ok`` scores: the
    counts of 0..5, n and the mean of the counted scores."""
    counts = status_counts(labels)
    judged = _judged(counts)
    by_status = ", ".join(f"{s} {n}" for s, n in counts.items())
    agreement = judge_clip_agreement(labels, min_margin=min_margin, dimensions=dimensions)
    lines = [
        "| metric | value |",
        "| --- | --- |",
        f"| rows | {labels.height} ({by_status}) |",
        f"| parse errors | {_pct(parse_error_rate(labels))} of {judged} judged |",
        f"| judge ↔ CLIP agreement | {_pct(agreement['agreement'])} of {agreement['comparable_pairs']} pairs "
        f"({agreement['prompts']} prompts; ties: judge {agreement['judge_ties']}, CLIP {agreement['clip_ties']}) |",
    ]
    if verdicts is not None:
        pb = position_bias_counts(verdicts)
        rate = pb["same_position"] / pb["pairs"] if pb["pairs"] else None
        lines.append(f"| position bias | {_pct(rate)} of {pb['pairs']} pairs ({pb['same_position']} same position) |")
    hist = {d: c for d, c in score_histograms(labels, dimensions).items() if sum(c)}
    if hist:
        lines += ["", "| dimension | " + " | ".join(str(s) for s in SCORES) + " | n | mean |",
                  "| --- |" + " ---: |" * (len(SCORES) + 2)]
        for dim, c in hist.items():
            n = sum(c)
            mean = sum(s * k for s, k in zip(SCORES, c)) / n
            lines.append(f"| {dim} | " + " | ".join(str(k) for k in c) + f" | {n} | {mean:.2f} |")
    return "\n".join(lines)


__all__ = [
    "SCORES", "PairOrder", "diagnostics_markdown", "judge_clip_agreement", "label_dimensions", "pair_order",
    "parse_error_rate", "position_bias_counts", "position_bias_rate", "score_histograms", "status_counts",
    "verifier_agreement",
]


class PairOrder(NamedTuple):
    """How a score orders the same-group pairs a truth tells apart: ``agree`` of the ``ordered`` ones go the
    truth's way; ``tied`` more get equal scores (``told_apart`` = ordered + tied; NaN scores count in neither)."""

    agree: int
    ordered: int
    tied: int
    told_apart: int

    @property
    def agreement(self) -> float | None:
        return self.agree / self.ordered if self.ordered else None

    @property
    def tie_rate(self) -> float | None:
        return self.tied / self.told_apart if self.told_apart else None


def pair_order(groups: Iterable[Sequence[tuple[float, float]]]) -> PairOrder:
    """Compare ``(truth, score)`` items pairwise within each group (the candidates of one prompt): pairs with equal
    truth are skipped, pairs with equal scores counted as ties."""
    agree = ordered = tied = told_apart = 0
    for group in groups:
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (ta, sa), (tb, sb) = group[i], group[j]
                if ta == tb or np.isnan(sa) or np.isnan(sb):
                    continue
                told_apart += 1
                if sa == sb:
                    tied += 1
                else:
                    ordered += 1
                    agree += int((sa > sb) == (ta > tb))
    return PairOrder(agree, ordered, tied, told_apart)


def verifier_agreement(labels: pl.DataFrame, images: dict[str, Any],
                       prompts: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """How the labels agree with the proving ground's verifier (:mod:`labelers.verifier`) on world prompts.

    ``images``: candidate_id -> PIL image; ``prompts``: prompt_id -> (task, text). Candidates whose prompt the
    verifier cannot read (not the world's grammar) are skipped and counted. Returns ``exact`` / ``within_1``: the
    share of (candidate, dimension) judge scores equal to / within 1 of the verifier's; ``pairwise_<x>``: the share
    of same-prompt candidate pairs the verifier tells apart (different share of true facts) that ``x`` (``judge``:
    the mean judge score, ``clip``: CLIP_T, ``reward``: the aggregate reward) orders the same way, ties left out;
    ``pair_counts``: the same as :class:`PairOrder` counts per score."""
    from labelers.judge.protocol import JudgeItem
    from labelers.verifier import PromptParseError, verify

    ok = _ok(labels)
    exact = within = total = skipped = 0
    rows: list[tuple[str, float, float, float, float]] = []
    for row in ok.iter_rows(named=True):
        task, text = prompts.get(row["prompt_id"], (None, None))
        image = images.get(row["candidate_id"])
        if task != "t2i" or image is None or isinstance(image, Exception):
            skipped += 1
            continue
        try:
            v = verify(JudgeItem(key=row["candidate_id"], task=task, text=text, image=image))
        except PromptParseError:
            skipped += 1
            continue
        judged = [float(row[d]) for d in v.scores if row.get(d) is not None]
        for d in v.scores:
            if row.get(d) is None:
                continue
            total += 1
            exact += int(float(row[d]) == v.scores[d])
            within += int(abs(float(row[d]) - v.scores[d]) <= 1)
        share = v.fact_share
        rows.append((row["prompt_id"], share, float(np.mean(judged)) if judged else float("nan"),
                     float(row.get("clip_t") or float("nan")), float(row.get("reward") or float("nan"))))
    by_prompt: dict[str, list[tuple]] = {}
    for r in rows:
        by_prompt.setdefault(r[0], []).append(r)
    orders = {name: pair_order([[(r[1], r[k]) for r in group] for group in by_prompt.values()])
              for k, name in ((2, "judge"), (3, "clip"), (4, "reward"))}
    return {
        "candidates": len(rows),
        "skipped": skipped,
        "exact": exact / total if total else None,
        "within_1": within / total if total else None,
        "fully_correct": float(np.mean([r[1] == 1.0 for r in rows])) if rows else None,
        **{f"pairwise_{name}": order.agreement for name, order in orders.items()},
        "pairwise_n": orders["reward"].ordered,
        # counts, so batches can be pooled (proving_report): pairs ordered the verifier's way / ordered / tied
        "pair_counts": {name: order._asdict() for name, order in orders.items()},
    }
