"""Label diagnostics against hand-computed values: score histograms, parse-error rate, judge/CLIP agreement,
position bias of pairwise verdicts, and the Markdown summary."""

import polars as pl
import pytest

from labelers.diagnostics import (
    diagnostics_markdown,
    judge_clip_agreement,
    parse_error_rate,
    position_bias_counts,
    position_bias_rate,
    score_histograms,
    status_counts,
)

DIMS = ["quality", "fit"]


def labels(rows, dims=DIMS):
    """rows: (candidate_id, prompt_id, *scores per dim, lambda_harmonic, status)."""
    schema = {"candidate_id": pl.Utf8, "prompt_id": pl.Utf8}
    schema.update({d: pl.Float64 for d in dims})
    schema.update({"lambda_harmonic": pl.Float64, "status": pl.Utf8})
    return pl.DataFrame(rows, schema=schema, orient="row")


# judge mean = mean of the non-null dims
LABELS = labels([
    ("a1", "p1", 5.0, 3.0, 0.9, "ok"),           # mean 4.0
    ("a2", "p1", 2.0, 2.0, 0.5, "ok"),           # mean 2.0
    ("a3", "p1", 4.0, None, 0.1, "ok"),          # mean 4.0 (fit null)
    ("a4", "p1", 5.0, 5.0, 0.7, "parse_error"),  # not ok: counts nowhere but the parse-error rate
    ("b1", "p2", 1.0, 0.0, 0.2, "ok"),           # mean 0.5
    ("b2", "p2", 3.0, 4.0, 0.6, "ok"),           # mean 3.5
    ("b3", "p2", 0.0, 1.0, 0.3, "ok"),           # mean 0.5
    ("b4", "p2", None, None, None, "image_error"),
    ("c1", "p3", 5.0, 5.0, None, "ok"),          # no CLIP score: not comparable
    ("c2", "p3", 3.0, 3.0, 0.4, "ok"),           # alone in its prompt then
    ("d1", "p4", 2.0, 4.0, 0.5, "ok"),           # mean 3.0
    ("d2", "p4", 4.0, 2.0, 0.8, "ok"),           # mean 3.0
    ("d3", "p4", 1.0, 2.0, 0.5, "ok"),           # mean 1.5
])


def test_score_histograms_count_ok_rows_per_integer_score():
    hist = score_histograms(LABELS, DIMS)
    # quality over ok rows: 5,2,4,1,3,0,5,3,2,4,1 ; fit (non-null): 3,2,0,4,1,5,3,4,2,2
    assert hist == {"quality": [1, 2, 2, 2, 2, 2], "fit": [1, 1, 3, 2, 2, 1]}
    assert sum(hist["quality"]) == 11 and sum(hist["fit"]) == 10


def test_score_histograms_round_halves_up_and_reject_out_of_range():
    frame = labels([("x", "p", 2.5, 0.0, 0.1, "ok"), ("y", "p", 2.49, 4.6, 0.2, "ok")])
    assert score_histograms(frame, DIMS) == {"quality": [0, 0, 1, 1, 0, 0], "fit": [1, 0, 0, 0, 0, 1]}
    with pytest.raises(ValueError, match="outside"):
        score_histograms(labels([("x", "p", 6.0, 1.0, 0.1, "ok")]), DIMS)
    with pytest.raises(ValueError, match="lacks column"):
        score_histograms(LABELS, ["quality", "nope"])


def test_score_histograms_default_dimensions_are_the_rubric_columns_present():
    dims = ["prompt_alignment", "visual_quality"]
    frame = labels([("x", "p", 1.0, 5.0, 0.1, "ok"), ("y", "p", 1.0, None, 0.2, "ok")], dims=dims)
    frame = frame.with_columns(pl.lit(0.3).alias("reward"))  # not a dimension
    assert score_histograms(frame) == {"prompt_alignment": [0, 2, 0, 0, 0, 0], "visual_quality": [0, 0, 0, 0, 0, 1]}


def test_parse_error_rate_over_judged_rows():
    assert status_counts(LABELS) == {"ok": 11, "parse_error": 1, "image_error": 1, "reward_error": 0}
    assert parse_error_rate(LABELS) == pytest.approx(1 / 12)  # image_error never reached the judge
    only_images = labels([("x", "p", None, None, None, "image_error")])
    assert parse_error_rate(only_images) is None
    assert parse_error_rate(labels([("x", "p", None, None, 0.2, "parse_error")])) == 1.0


def test_judge_clip_agreement_hand_computed():
    # p1: a1>a2 judge and clip (agree); a1~a3 judge tie; a3>a2 judge, a2>a3 clip (disagree)
    # p2: b2>b1 agree; b1~b3 judge tie; b2>b3 agree      p3: only c2 has both scores -> no pair
    # p4: d1~d2 judge tie; d1>d3 judge, equal clip (clip tie); d2>d3 agree
    out = judge_clip_agreement(LABELS, dimensions=DIMS)
    assert out == {"agreement": 0.8, "comparable_pairs": 5, "agreeing_pairs": 4, "judge_ties": 3, "clip_ties": 1,
                   "prompts": 3}


def test_judge_clip_agreement_min_margin():
    # margin 1.0: every judge difference above is 1.5 or more -> unchanged
    assert judge_clip_agreement(LABELS, min_margin=1.0, dimensions=DIMS)["comparable_pairs"] == 5
    # margin 1.5: d2-d3 and d1-d3 (difference exactly 1.5) become judge ties
    out = judge_clip_agreement(LABELS, min_margin=1.5, dimensions=DIMS)
    assert out == {"agreement": 0.75, "comparable_pairs": 4, "agreeing_pairs": 3, "judge_ties": 5, "clip_ties": 0,
                   "prompts": 2}


def test_judge_clip_agreement_nothing_comparable():
    clip_only = labels([("x", "p", None, None, 0.1, "ok"), ("y", "p", None, None, 0.9, "ok")])
    assert judge_clip_agreement(clip_only, dimensions=DIMS)["agreement"] is None
    assert judge_clip_agreement(LABELS, dimensions=[])["comparable_pairs"] == 0
    two_prompts = labels([("x", "p", 1.0, 1.0, 0.1, "ok"), ("y", "q", 5.0, 5.0, 0.9, "ok")])
    assert judge_clip_agreement(two_prompts, dimensions=DIMS)["comparable_pairs"] == 0  # never across prompts


VERDICTS = pl.DataFrame(
    {
        "first_order": ["A", "B", "A", "B", "tie", "tie", "A", None],
        "second_order": ["B", "A", "A", "B", "A", "tie", None, None],
    },
    schema={"first_order": pl.Utf8, "second_order": pl.Utf8},
)


def test_position_bias_rate_hand_computed():
    # complete pairs: (A,B) (B,A) consistent; (A,A) (B,B) same position; (tie,A) (tie,tie) ties -> 2 of 6
    assert position_bias_counts(VERDICTS) == {"pairs": 6, "same_position": 2, "consistent": 2, "ties": 2}
    assert position_bias_rate(VERDICTS) == pytest.approx(2 / 6)
    assert position_bias_rate(VERDICTS.head(2)) == 0.0
    assert position_bias_rate(VERDICTS.slice(6)) is None  # no pair with both answers


def test_position_bias_rate_rejects_unknown_answers_and_columns():
    with pytest.raises(ValueError, match="not one of"):
        position_bias_rate(pl.DataFrame({"first_order": ["A", "C"], "second_order": ["B", "A"]}))
    with pytest.raises(ValueError, match="lack column"):
        position_bias_rate(pl.DataFrame({"first_order": ["A"]}))


def test_diagnostics_markdown_table():
    md = diagnostics_markdown(LABELS, DIMS, verdicts=VERDICTS)
    lines = md.splitlines()
    assert lines[0] == "| metric | value |"
    assert "| rows | 13 (ok 11, parse_error 1, image_error 1, reward_error 0) |" in lines
    assert "| parse errors | 8.3% of 12 judged |" in lines
    assert "| judge ↔ CLIP agreement | 80.0% of 5 pairs (3 prompts; ties: judge 3, CLIP 1) |" in lines
    assert "| position bias | 33.3% of 6 pairs (2 same position) |" in lines
    # means of the counted scores: quality 30/11 = 2.727..., fit 26/10
    assert "| quality | 1 | 2 | 2 | 2 | 2 | 2 | 11 | 2.73 |" in lines
    assert "| fit | 1 | 1 | 3 | 2 | 2 | 1 | 10 | 2.60 |" in lines


def test_diagnostics_markdown_skips_empty_dimensions_and_verdicts():
    frame = LABELS.with_columns(pl.lit(None, dtype=pl.Float64).alias("unused"))
    md = diagnostics_markdown(frame, DIMS + ["unused"])
    assert "| unused |" not in md and "position bias" not in md
    empty = labels([])
    md = diagnostics_markdown(empty, DIMS)
    assert "| parse errors | n/a of 0 judged |" in md and "| quality |" not in md


def test_pair_order_counts_agreement_ties_and_skips_equal_truth_and_nan():
    from labelers.diagnostics import pair_order

    nan = float("nan")
    order = pair_order([
        [(1.0, 0.9), (0.5, 0.2), (0.5, 0.8)],  # truth-tied pair skipped; 0.9>0.2 agrees, 0.9>0.8 agrees
        [(1.0, 0.3), (0.0, 0.3)],              # told apart, scores tied
        [(1.0, 0.1), (0.0, 0.6)],              # ordered the wrong way
        [(1.0, nan), (0.0, 0.6)],              # no score: counted nowhere
    ])
    assert order == (2, 3, 1, 4)
    assert order.agreement == 2 / 3 and order.tie_rate == 1 / 4
    assert pair_order([]).agreement is None and pair_order([]).tie_rate is None
