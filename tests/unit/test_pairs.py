"""Pair selection: strategies, margins, ties, identical images, drops, Bradley-Terry probabilities."""

import math

import polars as pl
import pytest

from labelers.hashing import content_id
from labelers.pairs import DROP_REASONS, PAIR_COLUMNS, select_pairs


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def labels(rows):
    """rows: (candidate_id, prompt_id, reward, status, image_sha256)."""
    return pl.DataFrame(
        rows,
        schema={"candidate_id": pl.Utf8, "prompt_id": pl.Utf8, "reward": pl.Float64, "status": pl.Utf8,
                "image_sha256": pl.Utf8},
        orient="row",
    )


BASE = labels([
    ("a1", "pa", 0.9, "ok", "s1"),
    ("a2", "pa", 0.5, "ok", "s2"),
    ("a3", "pa", 0.1, "ok", "s3"),
    ("a4", "pa", None, "parse_error", "s4"),
    ("a5", "pa", None, "image_error", None),
    ("b1", "pb", 0.7, "ok", "t1"),
    ("b2", "pb", 0.2, "parse_error", "t2"),  # not ok even with a reward
])


def test_best_vs_worst_hand_computed():
    pairs, drops = select_pairs(BASE, tau=0.1)
    assert tuple(pairs.columns) == PAIR_COLUMNS
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert (row["prompt_id"], row["chosen_id"], row["rejected_id"]) == ("pa", "a1", "a3")
    assert row["margin"] == pytest.approx(0.8)
    assert row["p_chosen"] == pytest.approx(sig(0.8 / 0.1))  # σ(8) = 0.99966
    assert row["label"] == 1.0 and row["strategy"] == "best_vs_worst"
    assert row["pair_id"] == content_id("pa", "a1", "a3", "best_vs_worst")
    assert set(drops) == set(DROP_REASONS)
    assert drops["not_ok"] == 3 and drops["single_candidate"] == 1
    assert drops["tie"] == drops["below_margin"] == drops["identical_image"] == drops["capped"] == 0
    assert pairs.schema["p_chosen"] == pl.Float64 and pairs.schema["label"] == pl.Float64


def test_independent_of_row_order():
    a, _ = select_pairs(BASE, strategy="all_pairs")
    b, _ = select_pairs(BASE.reverse(), strategy="all_pairs")
    assert a.equals(b)


def test_all_pairs_and_cap():
    pairs, drops = select_pairs(BASE, strategy="all_pairs", tau=1.0)
    got = {(r["chosen_id"], r["rejected_id"]): r for r in pairs.iter_rows(named=True)}
    assert set(got) == {("a1", "a2"), ("a1", "a3"), ("a2", "a3")}
    assert got[("a1", "a2")]["p_chosen"] == pytest.approx(sig(0.4))
    assert got[("a2", "a3")]["margin"] == pytest.approx(0.4)
    capped, drops = select_pairs(BASE, strategy="all_pairs", max_pairs_per_prompt=2)
    # keeps the largest margins: a1-a3 (0.8) then a1-a2 / a2-a3 (0.4 each; ids break the tie)
    assert [(r["chosen_id"], r["rejected_id"]) for r in capped.iter_rows(named=True)] == [("a1", "a3"), ("a1", "a2")]
    assert drops["capped"] == 1


def test_identical_images_never_paired():
    df = labels([
        ("c1", "pc", 0.9, "ok", "same"),
        ("c2", "pc", 0.4, "ok", "other"),
        ("c3", "pc", 0.1, "ok", "same"),  # worst but identical to the best
        ("d1", "pd", 0.8, "ok", "dup"),
        ("d2", "pd", 0.3, "ok", "dup"),
    ])
    pairs, drops = select_pairs(df)
    assert [(r["chosen_id"], r["rejected_id"]) for r in pairs.iter_rows(named=True)] == [("c1", "c2")]
    assert drops["identical_image"] == 1
    allp, drops = select_pairs(df, strategy="all_pairs")
    assert {(r["chosen_id"], r["rejected_id"]) for r in allp.iter_rows(named=True)} == {("c1", "c2"), ("c2", "c3")}
    assert drops["identical_image"] == 2  # c1-c3 and d1-d2
    # without the image_sha256 column nothing is treated as identical
    nosha, _ = select_pairs(df.drop("image_sha256"), strategy="all_pairs")
    assert nosha.height == 4


def test_min_margin_and_ties():
    df = labels([
        ("e1", "pe", 0.50, "ok", "1"),
        ("e2", "pe", 0.50, "ok", "2"),  # exact tie with e1
        ("f1", "pf", 0.52, "ok", "3"),
        ("f2", "pf", 0.50, "ok", "4"),  # margin 0.02
    ])
    pairs, drops = select_pairs(df, min_margin=0.05)
    assert pairs.height == 0 and drops["tie"] == 1 and drops["below_margin"] == 1
    kept, drops = select_pairs(df, min_margin=0.05, tie_policy="keep")
    assert kept.height == 1 and drops["tie"] == 0 and drops["below_margin"] == 1
    row = kept.row(0, named=True)
    assert row["label"] == 0.5 and row["p_chosen"] == 0.5 and row["margin"] == 0.0
    assert (row["chosen_id"], row["rejected_id"]) == ("e1", "e2")  # ids order ties deterministically
    loose, _ = select_pairs(df, tie_margin=0.05, tie_policy="keep")
    assert loose["label"].to_list() == [0.5, 0.5]


def test_label_modes():
    soft, _ = select_pairs(BASE, label_mode="soft", tau=1.0)
    assert soft["label"][0] == pytest.approx(sig(0.8))
    # sampled: reproducible for a seed; upset frequency follows p_chosen
    rows = [(f"x{i}", f"p{i}", 0.6, "ok", f"h{i}") for i in range(1500)]
    rows += [(f"y{i}", f"p{i}", 0.5, "ok", f"k{i}") for i in range(1500)]
    df = labels(rows)
    s1, _ = select_pairs(df, label_mode="sampled", tau=0.1, seed=7)
    s2, _ = select_pairs(df, label_mode="sampled", tau=0.1, seed=7)
    s3, _ = select_pairs(df, label_mode="sampled", tau=0.1, seed=8)
    assert s1.equals(s2) and not s1.equals(s3)
    upsets = s1.filter(pl.col("chosen_id").str.starts_with("y"))
    p = sig(1.0)  # σ(0.1/0.1)
    assert abs(upsets.height / 1500 - (1 - p)) < 0.04
    assert (upsets["margin"] < 0).all() and (upsets["p_chosen"] - (1 - p)).abs().max() < 1e-12
    assert (s1["label"] == 1.0).all()


def test_empty_and_errors():
    empty, drops = select_pairs(BASE.head(0))
    assert empty.height == 0 and tuple(empty.columns) == PAIR_COLUMNS and sum(drops.values()) == 0
    with pytest.raises(ValueError):
        select_pairs(BASE, strategy="random")
    with pytest.raises(ValueError):
        select_pairs(BASE.drop("reward"))
    with pytest.raises(ValueError):
        select_pairs(BASE, tau=0)
