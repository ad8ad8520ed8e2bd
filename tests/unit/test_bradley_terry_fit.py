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
