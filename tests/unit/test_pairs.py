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


# -- strategies beyond best_vs_worst / all_pairs -------------------------------------------------------------------
def scored(rows):
    """rows: (candidate_id, prompt_id, reward, image_sha256, d1, d2), all status ok."""
    return pl.DataFrame(
        [(c, p, r, "ok", s, d1, d2) for c, p, r, s, d1, d2 in rows],
        schema={"candidate_id": pl.Utf8, "prompt_id": pl.Utf8, "reward": pl.Float64, "status": pl.Utf8,
                "image_sha256": pl.Utf8, "d1": pl.Float64, "d2": pl.Float64},
        orient="row",
    )


def pair_set(pairs):
    return {(r["chosen_id"], r["rejected_id"]) for r in pairs.iter_rows(named=True)}


def test_top_bottom_k_hand_computed():
    df = labels([
        # five candidates, k=2: {g1, g2} x {g4, g5}
        ("g1", "pg", 0.9, "ok", "1"), ("g2", "pg", 0.7, "ok", "2"), ("g3", "pg", 0.5, "ok", "3"),
        ("g4", "pg", 0.3, "ok", "4"), ("g5", "pg", 0.1, "ok", "5"),
        # three candidates, k=2: disjoint halves of 3 // 2 = 1, the middle h2 is left out
        ("h1", "ph", 0.8, "ok", "6"), ("h2", "ph", 0.6, "ok", "7"), ("h3", "ph", 0.2, "ok", "8"),
        # four candidates, k=2, one top/bottom pair shares an image
        ("i1", "pi", 0.8, "ok", "same"), ("i2", "pi", 0.6, "ok", "9"), ("i3", "pi", 0.4, "ok", "10"),
        ("i4", "pi", 0.2, "ok", "same"),
    ])
    pairs, drops = select_pairs(df, strategy="top_bottom_k", top_k=2, tau=1.0)
    assert pair_set(pairs) == {("g1", "g4"), ("g1", "g5"), ("g2", "g4"), ("g2", "g5"), ("h1", "h3"),
                               ("i1", "i3"), ("i2", "i3"), ("i2", "i4")}
    assert drops["identical_image"] == 1  # i1-i4
    assert (pairs["strategy"] == "top_bottom_k").all()
    got = {(r["chosen_id"], r["rejected_id"]): r for r in pairs.iter_rows(named=True)}
    assert got[("g2", "g4")]["margin"] == pytest.approx(0.4)
    assert got[("g2", "g4")]["p_chosen"] == pytest.approx(sig(0.4))
    assert got[("h1", "h3")]["pair_id"] == content_id("ph", "h1", "h3", "top_bottom_k")
    # k=1 is best vs worst without the identical-image fallback
    one, drops = select_pairs(df, strategy="top_bottom_k")
    assert pair_set(one) == {("g1", "g5"), ("h1", "h3")} and drops["identical_image"] == 1
    fallback, _ = select_pairs(df)
    assert pair_set(fallback) == {("g1", "g5"), ("h1", "h3"), ("i1", "i3")}
    with pytest.raises(ValueError):
        select_pairs(df, strategy="top_bottom_k", top_k=0)


PARETO = scored([
    ("A", "pp", 0.90, "a", 3.0, 3.0),
    ("B", "pp", 0.50, "b", 2.0, 3.0),
    ("C", "pp", 0.40, "c", 3.0, 1.0),
    ("D", "pp", 0.10, "d", 1.0, None),  # missing d2: comparable with nobody
    ("E", "pp", 0.95, "e", 1.0, 1.0),  # dominated by A, B and C but has the highest reward
    ("H", "pq", 0.50, "h", 1.0, 1.0),
    ("I", "pq", 0.50, "i", 2.0, 1.0),  # dominates H with the same reward: a tie
    ("J", "pr", 0.70, "j", 2.0, 2.0),
    ("K", "pr", 0.20, "k", 2.0, 2.0),  # equal on every dimension: not a Pareto pair
])


def test_pareto_hand_computed():
    pairs, drops = select_pairs(PARETO, strategy="pareto", dimensions=["d1", "d2"], tau=1.0)
    assert pair_set(pairs) == {("A", "B"), ("A", "C")}
    got = {(r["chosen_id"], r["rejected_id"]): r for r in pairs.iter_rows(named=True)}
    assert got[("A", "C")]["margin"] == pytest.approx(0.5) and got[("A", "C")]["p_chosen"] == pytest.approx(sig(0.5))
    assert got[("A", "B")]["pair_id"] == content_id("pp", "A", "B", "pareto")
    # pp: 10 pairs = 2 kept + A-D, B-C, B-D, C-D, D-E not comparable + A-E, B-E, C-E contradicted by the reward
    assert drops["not_pareto"] == 5 + 1 and drops["reward_disagrees"] == 3 and drops["tie"] == 1
    kept, drops = select_pairs(PARETO, strategy="pareto", dimensions=["d1", "d2"], tie_policy="keep")
    tie = kept.filter(pl.col("prompt_id") == "pq").row(0, named=True)
    assert (tie["chosen_id"], tie["rejected_id"], tie["label"], tie["p_chosen"]) == ("I", "H", 0.5, 0.5)
    # on d1 alone (D's d1 is known): A-C and D-E are equal, A, B and C dominate E against the reward, and so
    # does C (3) over B (2) with the lower reward (0.4 < 0.5)
    single, drops = select_pairs(PARETO, strategy="pareto", dimensions=["d1"])
    assert pair_set(single.filter(pl.col("prompt_id") == "pp")) == {("A", "B"), ("A", "D"), ("B", "D"), ("C", "D")}
    assert drops["reward_disagrees"] == 4 and drops["not_pareto"] == 2 + 1  # + J-K
    with pytest.raises(ValueError, match="dimensions"):
        select_pairs(PARETO, strategy="pareto")
    with pytest.raises(ValueError, match="nope"):
        select_pairs(PARETO, strategy="pareto", dimensions=["d1", "nope"])


def test_pareto_nan_dimension_is_missing():
    df = PARETO.with_columns(pl.when(pl.col("candidate_id") == "B").then(float("nan")).otherwise(pl.col("d1"))
                             .alias("d1"))
    pairs, _ = select_pairs(df, strategy="pareto", dimensions=["d1", "d2"])
    assert pair_set(pairs) == {("A", "C")}


def test_margin_on_probability():
    df = labels([
        ("m1", "pm", 0.52, "ok", "1"), ("m2", "pm", 0.50, "ok", "2"),  # Δ 0.02: p = σ(0.2) = 0.550
        ("n1", "pn", 0.60, "ok", "3"), ("n2", "pn", 0.50, "ok", "4"),  # Δ 0.1: p = σ(1) = 0.731
        ("o1", "po", 0.80, "ok", "5"), ("o2", "po", 0.50, "ok", "6"),  # Δ 0.3: p = σ(3) = 0.953
    ])
    pairs, drops = select_pairs(df, tau=0.1, margin_on="probability", min_margin=0.2)  # p_chosen >= 0.7
    assert pairs["prompt_id"].to_list() == ["pn", "po"] and drops["below_margin"] == 1
    strict, drops = select_pairs(df, tau=0.1, margin_on="probability", min_margin=0.45)  # p_chosen >= 0.95
    assert strict["prompt_id"].to_list() == ["po"] and drops["below_margin"] == 2
    on_reward, _ = select_pairs(df, tau=0.1, min_margin=0.2)  # the same number on the reward difference
    assert on_reward["prompt_id"].to_list() == ["po"]
    with pytest.raises(ValueError):
        select_pairs(df, margin_on="probability", min_margin=0.5)
    with pytest.raises(ValueError):
        select_pairs(df, margin_on="logit")


def random_labels(n_prompts=80, seed=0):
    """A messy table: 1-6 candidates per prompt, repeated rewards, shared images, missing scores, bad rows and a
    candidate labelled twice."""
    import random

    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for c in range(rng.randint(1, 6)):
            status = rng.choice(["ok"] * 9 + ["parse_error"])
            reward = rng.choice([round(rng.random(), 1), rng.random(), None])
            sha = rng.choice([None, "shared", f"img{p}_{c}", f"img{p}_{c}", f"img{p}_{c}"])
            d1, d2 = rng.choice([None, 0.0, 1.0, 2.0, 3.0]), float(rng.randint(0, 5))
            rows.append((f"c{p}_{c}", f"p{p}", reward, status, sha, d1, d2))
    rows.append(("c0_0", "p0", 0.33, "ok", "again", 1.0, 1.0))
    return pl.DataFrame(rows, schema={"candidate_id": pl.Utf8, "prompt_id": pl.Utf8, "reward": pl.Float64,
                                      "status": pl.Utf8, "image_sha256": pl.Utf8, "d1": pl.Float64,
                                      "d2": pl.Float64}, orient="row")


STRATEGY_ARGS = [
    {"strategy": "best_vs_worst"},
    {"strategy": "all_pairs"},
    {"strategy": "top_bottom_k", "top_k": 2},
    {"strategy": "pareto", "dimensions": ["d1", "d2"]},
]


@pytest.mark.parametrize("kwargs", STRATEGY_ARGS, ids=lambda k: k["strategy"])
@pytest.mark.parametrize("label_mode", ["deterministic", "sampled", "soft"])
def test_every_strategy_independent_of_row_order(kwargs, label_mode):
    df = random_labels()
    extra = {"tie_policy": "keep", "max_pairs_per_prompt": 3, "label_mode": label_mode, "seed": 3}
    base, drops = select_pairs(df, **kwargs, **extra)
    assert base.height > 0 and drops["duplicate_candidate"] == 1
    for shuffle_seed in range(3):
        again, drops_again = select_pairs(df.sample(fraction=1.0, shuffle=True, seed=shuffle_seed), **kwargs, **extra)
        assert again.equals(base) and drops_again == drops
    assert base["pair_id"].n_unique() == base.height


@pytest.mark.parametrize("kwargs", STRATEGY_ARGS, ids=lambda k: k["strategy"])
def test_every_strategy_never_pairs_identical_images(kwargs):
    df = random_labels(seed=1)
    pairs, drops = select_pairs(df, **kwargs, tie_policy="keep")
    sha = dict(zip(df["candidate_id"], df["image_sha256"]))  # c0_0's duplicate row is not the one kept
    sha["c0_0"] = df.filter(pl.col("candidate_id") == "c0_0")["image_sha256"][0]
    for r in pairs.iter_rows(named=True):
        a, b = sha[r["chosen_id"]], sha[r["rejected_id"]]
        assert a is None or a != b
    assert drops["identical_image"] > 0


@pytest.mark.parametrize("kwargs", STRATEGY_ARGS, ids=lambda k: k["strategy"])
def test_cap_applies_to_every_strategy(kwargs):
    df = random_labels(seed=2)
    free, free_drops = select_pairs(df, **kwargs)
    capped, drops = select_pairs(df, **kwargs, max_pairs_per_prompt=1)
    per_prompt = free.group_by("prompt_id").agg(pl.col("margin").max(), pl.len().alias("n"))
    assert capped.height == per_prompt.height
    assert drops["capped"] == int((per_prompt["n"] - 1).sum())
    best = dict(zip(per_prompt["prompt_id"], per_prompt["margin"]))
    assert all(r["margin"] == best[r["prompt_id"]] for r in capped.iter_rows(named=True))
    assert {k: v for k, v in drops.items() if k != "capped"} == {k: v for k, v in free_drops.items() if k != "capped"}


def test_top_bottom_k_cap_keeps_largest_margins():
    df = labels([("q1", "pq", 0.9, "ok", "1"), ("q2", "pq", 0.6, "ok", "2"), ("q3", "pq", 0.5, "ok", "3"),
                 ("q4", "pq", 0.1, "ok", "4")])
    capped, drops = select_pairs(df, strategy="top_bottom_k", top_k=2, max_pairs_per_prompt=2)
    # margins: q1-q4 0.8, q2-q4 0.5, q1-q3 0.4, q2-q3 0.1
    assert [(r["chosen_id"], r["rejected_id"]) for r in capped.iter_rows(named=True)] == [("q1", "q4"), ("q2", "q4")]
    assert drops["capped"] == 2


@pytest.mark.parametrize("strategy", ["all_pairs", "pareto"])
def test_every_candidate_pair_is_kept_or_counted(strategy):
    df = random_labels(seed=4)
    pairs, drops = select_pairs(df, strategy=strategy, dimensions=["d1", "d2"], min_margin=0.1,
                                max_pairs_per_prompt=4)
    usable = df.filter((pl.col("status") == "ok") & pl.col("reward").is_not_null()).unique("candidate_id")
    sizes = usable.group_by("prompt_id").len()["len"].to_list()
    pair_reasons = ("identical_image", "not_pareto", "reward_disagrees", "tie", "below_margin", "capped")
    assert pairs.height + sum(drops[r] for r in pair_reasons) == sum(n * (n - 1) // 2 for n in sizes)
    assert drops["single_candidate"] == sum(n == 1 for n in sizes)
    assert drops["not_ok"] + drops["duplicate_candidate"] + sum(sizes) == df.height


def test_duplicate_candidate_rows_keep_one_whatever_the_order():
    df = labels([("r1", "pr", 0.9, "ok", "1"), ("r2", "pr", 0.2, "ok", "2"), ("r2", "pr", 0.4, "ok", "3")])
    for frame in (df, df.reverse()):
        pairs, drops = select_pairs(frame)
        assert drops["duplicate_candidate"] == 1
        assert pairs["margin"][0] == pytest.approx(0.5)  # the duplicate's higher-reward row is kept


@pytest.mark.parametrize("kwargs", STRATEGY_ARGS, ids=lambda k: k["strategy"])
def test_sampled_reproducible_per_seed(kwargs):
    df = random_labels(n_prompts=200, seed=5)
    s1, _ = select_pairs(df, **kwargs, label_mode="sampled", tau=0.3, seed=11)
    s2, _ = select_pairs(df, **kwargs, label_mode="sampled", tau=0.3, seed=11)
    s3, _ = select_pairs(df, **kwargs, label_mode="sampled", tau=0.3, seed=12)
    assert s1.equals(s2) and not s1.equals(s3)
    assert (s1["label"] == 1.0).all() and ((s1["p_chosen"] < 0.5) == (s1["margin"] < 0)).all()


def test_sampled_upset_rate_follows_p():
    # three reward gaps, 2000 prompts each: an upset (the lower reward chosen) happens with probability 1 - σ(Δ/τ)
    gaps = (0.05, 0.1, 0.2)
    rows = []
    for k, gap in enumerate(gaps):
        for i in range(2000):
            rows += [(f"w{k}_{i}", f"p{k}_{i}", 0.5 + gap, "ok", f"hw{k}_{i}"),
                     (f"l{k}_{i}", f"p{k}_{i}", 0.5, "ok", f"hl{k}_{i}")]
    pairs, _ = select_pairs(labels(rows), label_mode="sampled", tau=0.1, seed=2024)
    for k, gap in enumerate(gaps):
        mine = pairs.filter(pl.col("prompt_id").str.starts_with(f"p{k}_"))
        upsets = mine.filter(pl.col("chosen_id").str.starts_with("l")).height / mine.height
        assert abs(upsets - (1 - sig(gap / 0.1))) < 0.035, (gap, upsets)


def test_vectorised_hashes_match_the_per_pair_definitions():
    from labelers.pairs import _content_ids, _pair_uniform, _pair_uniforms

    odd = ['a"b', "c\\d", "e\nf", "g\x01h", "ü→😀", "x\x1fy", "\t", "plain", "", "'q'", "\x7f", "\u2028"]
    p, c, r = pl.Series(odd), pl.Series(odd[::-1]), pl.Series(odd[3:] + odd[:3])
    assert _content_ids(p, c, r, "all_pairs").to_list() == [content_id(*t, "all_pairs") for t in zip(p, c, r)]
    assert list(_pair_uniforms(9, p, c, r)) == [_pair_uniform(9, *t) for t in zip(p, c, r)]
    assert _pair_uniform(9, "p", "a", "b") == _pair_uniform(9, "p", "b", "a")
