"""fit_bradley_terry: recovery on simulated data, finiteness with the prior, components, ties, hand-computed cases."""

import numpy as np
import pytest

from labelers.bradley_terry import connected_components, fit_bradley_terry


def simulate(true, n_comparisons, rng):
    n = len(true)
    i = rng.integers(0, n, n_comparisons)
    j = rng.integers(0, n - 1, n_comparisons)
    j = np.where(j >= i, j + 1, j)  # j != i
    p = 1.0 / (1.0 + np.exp(-(true[i] - true[j])))
    i_wins = rng.random(n_comparisons) < p
    return np.where(i_wins, i, j), np.where(i_wins, j, i)


def test_recovers_known_strengths_on_a_connected_graph():
    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 1.0, 20)
    winners, losers = simulate(true, 2000, rng)
    fit = fit_bradley_terry(20, winners, losers)
    assert fit.converged and fit.iterations < 30
    assert np.corrcoef(fit.strengths, true)[0, 1] > 0.95
    assert abs(fit.strengths.mean()) < 1e-9
    # the strengths are on the scale of the truth (centred), within a few standard errors
    z = (fit.strengths - (true - true.mean())) / fit.std_errors
    assert np.all(np.isfinite(fit.std_errors)) and np.all(fit.std_errors > 0)
    assert np.mean(np.abs(z) < 3) >= 0.9
    # fitted probabilities agree with the model
    assert fit.probability(0, 1) == pytest.approx(1 / (1 + np.exp(-(fit.strengths[0] - fit.strengths[1]))))


def test_standard_errors_shrink_with_more_data():
    rng = np.random.default_rng(1)
    true = rng.normal(0.0, 1.0, 10)
    small = fit_bradley_terry(10, *simulate(true, 300, rng))
    large = fit_bradley_terry(10, *simulate(true, 3000, rng))
    assert np.all(large.std_errors < small.std_errors)
    assert np.mean(large.std_errors) == pytest.approx(np.mean(small.std_errors) / np.sqrt(10), rel=0.25)


def test_undefeated_item_is_finite_and_strongest():
    # item 0 beats everyone; the others are mixed
    winners = [0, 0, 0, 0, 0, 1, 2, 3, 2]
    losers = [1, 2, 3, 1, 2, 2, 3, 1, 1]
    fit = fit_bradley_terry(4, winners, losers)
    assert fit.converged
    assert np.all(np.isfinite(fit.strengths)) and np.all(np.isfinite(fit.std_errors))
    assert np.argmax(fit.strengths) == 0
    assert fit.strengths[0] < 10  # the prior keeps it finite and moderate
    # a weaker prior lets it run further, still finite
    weak = fit_bradley_terry(4, winners, losers, prior=1e-3)
    assert weak.converged and np.isfinite(weak.strengths[0]) and weak.strengths[0] > fit.strengths[0]


def test_disconnected_components_each_have_mean_zero():
    # component {0, 1, 2}, component {3, 4}, isolated item 5
    winners = np.array([0, 0, 1, 2, 3, 3, 4])
    losers = np.array([1, 2, 2, 1, 4, 4, 3])
    fit = fit_bradley_terry(6, winners, losers)
    assert fit.converged
    assert list(fit.components) == [0, 0, 0, 3, 3, 5]
    assert fit.strengths[:3].sum() == pytest.approx(0.0, abs=1e-9)
    assert fit.strengths[3:5].sum() == pytest.approx(0.0, abs=1e-9)
    assert fit.strengths[5] == 0.0 and fit.std_errors[5] == np.inf
    assert fit.strengths[0] == max(fit.strengths[:3]) and fit.strengths[3] > fit.strengths[4]
    # the same without the prior: centred per component explicitly
    ml = fit_bradley_terry(6, winners, losers, prior=0.0)
    assert ml.strengths[:3].sum() == pytest.approx(0.0, abs=1e-9)
    assert ml.strengths[3:5].sum() == pytest.approx(0.0, abs=1e-9)


def test_two_items_hand_computed_without_prior():
    # 7 wins, 3 losses: p = 7/10 = σ(s0 - s1)  =>  s0 - s1 = log(7/3), centred: ±log(7/3)/2
    winners = [0] * 7 + [1] * 3
    losers = [1] * 7 + [0] * 3
    fit = fit_bradley_terry(2, winners, losers, prior=0.0)
    assert fit.converged
    assert fit.strengths[0] - fit.strengths[1] == pytest.approx(np.log(7 / 3), abs=1e-9)
    assert fit.strengths[0] == pytest.approx(np.log(7 / 3) / 2, abs=1e-9)
    # Fisher information of the difference: n p (1-p) = 10 * 0.21; each centred strength is half the difference
    assert fit.std_errors[0] == pytest.approx(0.5 / np.sqrt(10 * 0.21), rel=1e-6)


def test_ties_count_half_a_win_each_way():
    # 3 wins, 1 loss, 2 ties  =>  effective 4 wins, 2 losses  =>  diff = log(2)
    winners = [0, 0, 0, 1, 0, 1]
    losers = [1, 1, 1, 0, 1, 0]
    ties = np.array([False, False, False, False, True, True])
    fit = fit_bradley_terry(2, winners, losers, ties=ties, prior=0.0)
    assert fit.strengths[0] - fit.strengths[1] == pytest.approx(np.log(2), abs=1e-9)
    # ties as an (m, 2) array of tied pairs give the same fit
    pairs = fit_bradley_terry(2, [0, 0, 0, 1], [1, 1, 1, 0], ties=np.array([[0, 1], [1, 0]]), prior=0.0)
    assert pairs.strengths == pytest.approx(fit.strengths, abs=1e-9)
    # only ties: equal strengths
    only = fit_bradley_terry(3, [0, 1], [1, 2], ties=np.array([True, True]))
    assert only.strengths == pytest.approx(np.zeros(3), abs=1e-12)


def test_prior_shrinks_and_inputs_are_validated():
    winners, losers = [0] * 7 + [1] * 3, [1] * 7 + [0] * 3
    d0 = np.diff(fit_bradley_terry(2, winners, losers, prior=0.0).strengths)[0]
    d1 = np.diff(fit_bradley_terry(2, winners, losers, prior=1.0).strengths)[0]
    assert abs(d1) < abs(d0)
    empty = fit_bradley_terry(3, [], [])
    assert empty.converged and empty.iterations == 0 and list(empty.strengths) == [0, 0, 0]
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [0, 1], [1])
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [0], [0])
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [0], [2])
    with pytest.raises(ValueError):
        fit_bradley_terry(2, [0], [1], prior=-1.0)


def test_connected_components_long_chain():
    n = 50
    a, b = np.arange(n - 1), np.arange(1, n)
    assert np.all(connected_components(n, a[::-1], b[::-1]) == 0)
    labels = connected_components(6, [5, 1], [4, 2])
    assert list(labels) == [0, 1, 1, 3, 4, 4]


def test_without_prior_an_undefeated_item_does_not_converge():
    fit = fit_bradley_terry(3, [0, 0, 1], [1, 2, 2], prior=0.0, max_iter=50)
    assert not fit.converged and fit.iterations == 50
    assert fit.strengths[0] > 10 and np.all(np.isfinite(fit.strengths))


# ----------------------------------------------------------------------------------------------------------------
# The scalable path: matrix-free Newton-CG, per-component standard errors
# ----------------------------------------------------------------------------------------------------------------
def grouped_comparisons(group_sizes, per_item, rng, tie_rate=0.1):
    """Comparisons within consecutive groups of items (like per-prompt candidate groups), ties marked."""
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
    true = rng.normal(0.0, 1.0, int(np.sum(group_sizes)))
    winners, losers = [], []
    for start, size in zip(starts, group_sizes):
        w, lo = simulate(true[start:start + size], per_item * size, rng)
        winners.append(w + start)
        losers.append(lo + start)
    winners, losers = np.concatenate(winners), np.concatenate(losers)
    return true, winners, losers, rng.random(winners.size) < tie_rate


def test_cg_solver_matches_dense_on_a_mid_size_graph():
    rng = np.random.default_rng(2)
    _, winners, losers, ties = grouped_comparisons([120, 50, 20, 3, 2], 4, rng)
    n = 120 + 50 + 20 + 3 + 2 + 5  # and five items without comparisons
    dense = fit_bradley_terry(n, winners, losers, ties=ties, solver="dense")
    cg = fit_bradley_terry(n, winners, losers, ties=ties, solver="cg")
    auto = fit_bradley_terry(n, winners, losers, ties=ties)
    assert (dense.solver, cg.solver, auto.solver) == ("dense", "cg", "cg")
    assert dense.converged and cg.converged
    np.testing.assert_allclose(cg.strengths, dense.strengths, atol=1e-9)
    np.testing.assert_allclose(cg.std_errors, dense.std_errors, rtol=1e-7)
    assert np.array_equal(cg.components, dense.components)
    assert np.all(np.isinf(cg.std_errors[-5:])) and np.all(cg.strengths[-5:] == 0.0)
    assert cg.std_error_method == "exact"


def test_many_small_groups_in_one_fit_equal_separate_fits():
    # the common large graph: many per-prompt groups of different sizes; one fit, exact per-component errors
    rng = np.random.default_rng(3)
    sizes = rng.integers(2, 13, 300)
    _, winners, losers, ties = grouped_comparisons(sizes, 3, rng)
    joint = fit_bradley_terry(int(sizes.sum()), winners, losers, ties=ties)
    assert joint.solver == "cg" and joint.converged and joint.std_error_method == "exact"
    start = 0
    for size in sizes:
        inside = (winners >= start) & (winners < start + size)
        alone = fit_bradley_terry(int(size), winners[inside] - start, losers[inside] - start, ties=ties[inside])
        # a group may itself split into components; compare within the group
        np.testing.assert_allclose(joint.strengths[start:start + size], alone.strengths, atol=1e-8)
        np.testing.assert_allclose(joint.std_errors[start:start + size], alone.std_errors, rtol=1e-7)
        start += size


def test_std_errors_match_the_spread_over_repeated_experiments():
    # fixed design (which pairs are compared), outcomes redrawn: the reported errors ≈ the sampling spread
    rng = np.random.default_rng(4)
    n = 25
    true = rng.normal(0.0, 1.0, n)
    i = rng.integers(0, n, 600)
    j = (i + rng.integers(1, n, 600)) % n
    p = 1.0 / (1.0 + np.exp(-(true[i] - true[j])))
    fits = []
    for _ in range(300):
        i_wins = rng.random(600) < p
        fits.append(fit_bradley_terry(n, np.where(i_wins, i, j), np.where(i_wins, j, i)))
    spread = np.std([f.strengths for f in fits], axis=0)
    reported = np.mean([f.std_errors for f in fits], axis=0)
    assert np.all(np.abs(reported / spread - 1) < 0.25)
    assert np.mean(reported) / np.mean(spread) == pytest.approx(1.0, abs=0.08)


def random_graph_fit(n, per_item, seed, **kwargs):
    rng = np.random.default_rng(seed)
    return fit_bradley_terry(n, *simulate(rng.normal(0.0, 1.0, n), per_item * n, rng), **kwargs)


def test_large_components_get_belief_propagation_std_errors_close_to_exact():
    exact = random_graph_fit(600, 4, 5)
    approx = random_graph_fit(600, 4, 5, exact_std_errors_max_items=100)
    assert exact.std_error_method == "exact" and approx.std_error_method == "belief-propagation"
    assert np.array_equal(exact.strengths, approx.strengths)
    finite = np.isfinite(exact.std_errors)
    assert np.array_equal(finite, np.isfinite(approx.std_errors))
    ratio = approx.std_errors[finite] / exact.std_errors[finite]
    # on a random (locally tree-like) graph within ~1% (1/sqrt(H_ii) alone would be ~7% low)
    assert abs(np.median(ratio) - 1) < 0.01 and np.all(np.abs(ratio - 1) < 0.05)


def test_mixed_std_errors_keep_small_components_exact():
    rng = np.random.default_rng(6)
    _, winners, losers, ties = grouped_comparisons([400, 30, 8, 8, 5], 4, rng)
    n = 451
    exact = fit_bradley_terry(n, winners, losers, ties=ties)
    mixed = fit_bradley_terry(n, winners, losers, ties=ties, exact_std_errors_max_items=100)
    assert exact.std_error_method == "exact" and mixed.std_error_method == "mixed"
    np.testing.assert_allclose(mixed.std_errors[400:], exact.std_errors[400:], rtol=1e-10)
    assert np.all(np.abs(mixed.std_errors[:400] / exact.std_errors[:400] - 1) < 0.05)


def test_belief_propagation_is_exact_on_a_tree():
    from labelers.bradley_terry import _belief_propagation_variances, _PairTotals

    rng = np.random.default_rng(7)
    n, prior = 200, 0.1
    parent = np.array([rng.integers(0, k) for k in range(1, n)])  # item k + 1 hangs below parent[k]
    child = np.arange(1, n)
    pairs = _PairTotals(n, np.minimum(parent, child), np.maximum(parent, child), np.full(n - 1, 3.0),
                        np.full(n - 1, 1.5))
    weights = rng.uniform(0.1, 1.0, n - 1)
    diagonal = pairs.weighted_degree(weights) + prior
    h = pairs.dense_laplacian(weights) + prior * np.eye(n)
    approx = _belief_propagation_variances(pairs, weights, diagonal, np.arange(n))
    np.testing.assert_allclose(approx, np.diag(np.linalg.inv(h)), rtol=1e-8)


def test_solver_choice_and_degenerate_inputs():
    with pytest.raises(ValueError):
        fit_bradley_terry(3, [0], [1], solver="sparse")
    empty = fit_bradley_terry(500, [], [])
    assert empty.solver == "cg" and empty.converged and empty.iterations == 0
    assert empty.std_error_method == "none" and np.all(np.isinf(empty.std_errors))
    # only ties on the CG path: a zero gradient, equal strengths
    only = fit_bradley_terry(300, np.arange(299), np.arange(1, 300), ties=np.ones(299, dtype=bool), solver="cg")
    assert only.converged and only.strengths == pytest.approx(np.zeros(300), abs=1e-12)
