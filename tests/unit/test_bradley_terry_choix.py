"""fit_bradley_terry against the choix library (a test-only dependency) on random comparison sets.

choix's ``opt_pairwise(n, data, alpha=a)`` minimises the negative log-likelihood plus ``a·‖θ‖²``, i.e. our
objective with ``prior = 2a``, so with ``alpha = prior / 2`` both solve the same MAP problem; with ``prior = 0``
and a strongly connected graph, ``ilsr_pairwise`` / ``mm_pairwise`` (``alpha=0``) give the same maximum
likelihood estimate. choix's strengths are centred over all items; ours per connected component, hence the
Pearson correlations and the explicit centring below.
"""

import numpy as np
import pytest

from labelers.bradley_terry import DENSE_SOLVER_MAX_ITEMS, connected_components, fit_bradley_terry

choix = pytest.importorskip("choix")


def simulate(true, n_comparisons, rng, items=None):
    """BT outcomes of ``n_comparisons`` random distinct pairs among ``items`` (default: all of ``true``)."""
    items = np.arange(len(true)) if items is None else np.asarray(items)
    k = len(items)
    a = rng.integers(0, k, n_comparisons)
    b = rng.integers(0, k - 1, n_comparisons)
    b = np.where(b >= a, b + 1, b)
    i, j = items[a], items[b]
    i_wins = rng.random(n_comparisons) < 1.0 / (1.0 + np.exp(-(true[i] - true[j])))
    return np.where(i_wins, i, j), np.where(i_wins, j, i)


def as_choix_data(winners, losers):
    return list(zip(np.asarray(winners).tolist(), np.asarray(losers).tolist()))


def pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("n_items, per_item, seed", [(50, 6, 0), (200, 4, 1), (500, 5, 3)])
def test_map_strengths_match_choix_opt_pairwise(n_items, per_item, seed):
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 1.0, n_items)
    winners, losers = simulate(true, per_item * n_items, rng)
    assert np.all(connected_components(n_items, winners, losers) == 0)  # connected at these densities and seeds
    prior = 0.1
    ours = fit_bradley_terry(n_items, winners, losers, prior=prior)
    theirs = choix.opt_pairwise(n_items, as_choix_data(winners, losers), alpha=prior / 2, method="Newton-CG")
    assert ours.converged
    assert ours.solver == ("dense" if n_items <= DENSE_SOLVER_MAX_ITEMS else "cg")
    assert pearson(ours.strengths, theirs) >= 0.999
    # the same optimum, not merely correlated: with prior > 0 both sum to 0 already; centre anyway
    np.testing.assert_allclose(ours.strengths, theirs - theirs.mean(), atol=1e-4)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_maximum_likelihood_matches_choix_ilsr_and_mm(solver):
    rng = np.random.default_rng(3)
    n = 100 if solver == "dense" else DENSE_SOLVER_MAX_ITEMS + 20
    true = rng.normal(0.0, 1.0, n)
    winners, losers = simulate(true, 8 * n, rng)
    # a cycle of wins (i beats i+1, the last beats the first) makes the graph strongly connected: the MLE exists
    winners = np.concatenate([winners, np.arange(n)])
    losers = np.concatenate([losers, np.roll(np.arange(n), -1)])
    ours = fit_bradley_terry(n, winners, losers, prior=0.0, solver=solver)
    assert ours.converged
    data = as_choix_data(winners, losers)
    for theirs in (choix.ilsr_pairwise(n, data, alpha=0.0), choix.mm_pairwise(n, data, alpha=0.0)):
        assert pearson(ours.strengths, theirs) >= 0.999
        np.testing.assert_allclose(ours.strengths, theirs - theirs.mean(), atol=1e-4)


def test_disconnected_graph_matches_choix_per_component():
    rng = np.random.default_rng(4)
    n = 260
    true = rng.normal(0.0, 1.0, n)
    # three components of different sizes (items 0-149, 150-229, 230-254) and five isolated items (255-259)
    blocks = [np.arange(0, 150), np.arange(150, 230), np.arange(230, 255)]
    pairs = [simulate(true, 6 * len(items), rng, items) for items in blocks]
    winners = np.concatenate([w for w, _ in pairs])
    losers = np.concatenate([lo for _, lo in pairs])
    order = rng.permutation(winners.size)  # interleave the components' comparisons
    winners, losers = winners[order], losers[order]
    prior = 0.1
    fit = fit_bradley_terry(n, winners, losers, prior=prior)
    assert fit.converged and fit.solver == "cg"
    assert sorted(set(fit.components[:255])) == [0, 150, 230]
    assert np.all(fit.strengths[255:] == 0.0) and np.all(np.isinf(fit.std_errors[255:]))
    for items in blocks:
        # choix on the component alone, re-indexed from 0
        index = {int(item): k for k, item in enumerate(items)}
        inside = np.isin(winners, items)
        data = [(index[int(a)], index[int(b)]) for a, b in zip(winners[inside], losers[inside])]
        theirs = choix.opt_pairwise(len(items), data, alpha=prior / 2, method="Newton-CG")
        assert fit.strengths[items].sum() == pytest.approx(0.0, abs=1e-9)
        assert pearson(fit.strengths[items], theirs) >= 0.999
        np.testing.assert_allclose(fit.strengths[items], theirs - theirs.mean(), atol=1e-4)


def test_item_that_wins_every_comparison_stays_finite_and_matches_choix():
    rng = np.random.default_rng(5)
    n = 120
    true = rng.normal(0.0, 1.0, n)
    winners, losers = simulate(true, 5 * n, rng)
    # item 7 wins every one of its comparisons
    involved = (winners == 7) | (losers == 7)
    other = np.where(winners == 7, losers, winners)
    winners = np.where(involved, 7, winners)
    losers = np.where(involved, other, losers)
    assert np.sum(involved) >= 5 and not np.any(losers == 7)
    prior = 0.1
    fit = fit_bradley_terry(n, winners, losers, prior=prior)
    assert fit.converged and fit.solver == "cg"
    assert np.all(np.isfinite(fit.strengths)) and np.all(np.isfinite(fit.std_errors))
    assert np.argmax(fit.strengths) == 7 and fit.strengths[7] < 10
    theirs = choix.opt_pairwise(n, as_choix_data(winners, losers), alpha=prior / 2, method="Newton-CG")
    assert pearson(fit.strengths, theirs) >= 0.999
    assert fit.strengths[7] == pytest.approx(theirs[7] - theirs.mean(), abs=1e-4)


def test_std_errors_equal_the_inverse_of_choix_hessian():
    # choix's Hessian of its penalised negative log-likelihood is our negative Hessian when alpha = prior / 2
    from choix.opt import PairwiseFcts

    rng = np.random.default_rng(6)
    n = 40
    true = rng.normal(0.0, 1.0, n)
    winners, losers = simulate(true, 10 * n, rng)
    prior = 0.1
    hessian = PairwiseFcts(as_choix_data(winners, losers), prior / 2).hessian
    for solver in ("dense", "cg"):
        fit = fit_bradley_terry(n, winners, losers, prior=prior, solver=solver)
        centring = np.eye(n) - 1.0 / n
        expected = np.sqrt(np.diag(centring @ np.linalg.inv(hessian(fit.strengths)) @ centring))
        assert fit.std_error_method == "exact"
        np.testing.assert_allclose(fit.std_errors, expected, rtol=1e-8)
