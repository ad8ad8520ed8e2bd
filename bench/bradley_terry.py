"""Bradley-Terry fit at scale: ``fit_bradley_terry`` vs the ``choix`` library (issue 4).

    .venv/bin/python bench/bradley_terry.py [--items 250000] [--comparisons 1000000] [--seed 0]
                                            [--choix-tol 1e-6] [--repeats 3] [--survey]

Data: ``--items`` true log-strengths ~ N(0, 1), ``--comparisons`` comparisons between uniformly random pairs
(average degree 8 at the defaults: one giant component plus a few dozen isolated items), each outcome drawn
from the BT model, all from ``--seed``.

The problem both libraries solve. The only choix routine that runs at 250k items is ``choix.mm_pairwise``
(Hunter's MM algorithm, O(#comparisons) memory): ``opt_pairwise`` (Newton-CG and BFGS) builds a dense
``n × n`` Hessian or inverse-Hessian approximation and ``ilsr_pairwise`` / ``lsr_pairwise`` a dense ``n × n``
Markov chain, i.e. 500 GB at 250k items (``--survey`` times them all on a small set). MM's own regulariser
``alpha`` is a Gamma prior on the exponentiated strengths, not our Gaussian one (it lets all-loss items run
far below all-win ones), so fitting both with their own priors would compare two different estimators. Instead
both fit plain maximum likelihood (ours ``prior=0``, choix ``alpha=0``) on the same data extended by one
reference item that every item beats once and loses to once — the classic "virtual comparisons" regulariser,
expressible as data, so both solve exactly the same problem; it also makes every component strongly connected,
so the MLE exists. Our production setting (``prior=0.1``, no reference item) is fitted and reported as well,
untimed against choix.

Timing: wall seconds of one round of each, alternating (``bench/_timing.py``); ours is then repeated
``--repeats - 1`` more rounds and its best counts (one choix round takes minutes). choix gets its data as the
list of ``(winner, loser)`` tuples it expects, built outside the timing; ours times everything from the raw
index arrays, including aggregation, components and standard errors. choix runs to its own convergence test
with ``tol=--choix-tol`` (mean absolute change per iteration, default 1e-6). Its default tolerance 1e-8 needs
about 1.8× the iterations at the default size (several minutes more on a 2-core machine), so the printed ratio
is a lower bound of the ratio at choix's defaults; ours converges to a Newton step below 1e-8.

Prints the data's shape, both timings, the Pearson correlation of the two fits' strengths (items with
comparisons) and their largest / RMS difference after centring both on those items, each fit's Pearson
correlation with the true strengths, and last ``ratio=<choix seconds / our seconds>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _timing import alternate  # noqa: E402  (bench/ is on sys.path when the script runs)

from labelers.bradley_terry import connected_components, fit_bradley_terry  # noqa: E402


def simulate(n_items: int, n_comparisons: int, seed: int):
    """True strengths ~ N(0, 1) and BT-sampled outcomes of uniformly random distinct pairs."""
    rng = np.random.default_rng(seed)
    true = rng.normal(0.0, 1.0, n_items)
    i = rng.integers(0, n_items, n_comparisons)
    j = rng.integers(0, n_items - 1, n_comparisons)
    j = np.where(j >= i, j + 1, j)
    i_wins = rng.random(n_comparisons) < 1.0 / (1.0 + np.exp(-(true[i] - true[j])))
    return true, np.where(i_wins, i, j), np.where(i_wins, j, i)


def with_reference_item(n_items: int, winners: np.ndarray, losers: np.ndarray):
    """Append item ``n_items``, which every item beats once and loses to once (virtual comparisons)."""
    items = np.arange(n_items)
    reference = np.full(n_items, n_items)
    return (n_items + 1, np.concatenate([winners, items, reference]), np.concatenate([losers, reference, items]))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def survey(seed: int) -> None:
    """Every choix pairwise routine and ours on a small instance of the same (reference-item) problem."""
    import choix

    n_items, n_comparisons = 1000, 4000
    _, winners, losers = simulate(n_items, n_comparisons, seed)
    n, w, lo = with_reference_item(n_items, winners, losers)
    data = list(zip(w.tolist(), lo.tolist()))
    ours = fit_bradley_terry(n, w, lo, prior=0.0).strengths
    routines = {
        "ours (prior=0, incl. exact std errors)": lambda: fit_bradley_terry(n, w, lo, prior=0.0).strengths,
        "choix.mm_pairwise(alpha=0)": lambda: choix.mm_pairwise(n, data, alpha=0.0),
        "choix.ilsr_pairwise(alpha=0)": lambda: choix.ilsr_pairwise(n, data, alpha=0.0),
        "choix.opt_pairwise(Newton-CG, alpha=0)": lambda: choix.opt_pairwise(n, data, alpha=0.0, method="Newton-CG"),
        "choix.opt_pairwise(BFGS, alpha=0)": lambda: choix.opt_pairwise(n, data, alpha=0.0, method="BFGS"),
    }
    print(f"survey: {n_items} items + reference item, {len(data)} comparisons (one run each)")
    for name, run in routines.items():
        t0 = time.perf_counter()
        strengths = run()
        print(f"  {name:42s} {time.perf_counter() - t0:8.3f} s   pearson vs ours {pearson(strengths, ours):.8f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=250_000)
    parser.add_argument("--comparisons", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--choix-tol", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of our fit (choix runs once)")
    parser.add_argument("--survey", action="store_true", help="first time every choix routine on a small set")
    args = parser.parse_args(argv)

    import choix

    if args.survey:
        survey(args.seed)

    true, winners, losers = simulate(args.items, args.comparisons, args.seed)
    components = connected_components(args.items, np.minimum(winners, losers), np.maximum(winners, losers))
    sizes = np.bincount(components, minlength=args.items)
    sizes = sizes[sizes > 0]
    print(f"items={args.items} comparisons={args.comparisons} components={sizes.size} "
          f"(largest {sizes.max()}, isolated items {int(np.sum(sizes == 1))})")

    n, w, lo = with_reference_item(args.items, winners, losers)
    data = list(zip(w.tolist(), lo.tolist()))
    print(f"same problem for both: + a reference item that every item beats once and loses to once "
          f"({len(data)} comparisons over {n} items), plain maximum likelihood (ours prior=0, choix alpha=0)")

    last, walls, _ = alternate({
        "ours": lambda: fit_bradley_terry(n, w, lo, prior=0.0),
        "choix": lambda: choix.mm_pairwise(n, data, alpha=0.0, tol=args.choix_tol),
    }, repeats=1)
    if args.repeats > 1:
        _, more, _ = alternate({"ours": lambda: fit_bradley_terry(n, w, lo, prior=0.0)}, repeats=args.repeats - 1)
        walls["ours"] += more["ours"]
    fit, choix_strengths = last["ours"], np.asarray(last["choix"])
    ours_s, choix_s = min(walls["ours"]), walls["choix"][0]
    print(f"ours:  {ours_s:.2f} s (best of {len(walls['ours'])}: {', '.join(f'{x:.2f}' for x in walls['ours'])}; "
          f"solver {fit.solver}, {fit.iterations} Newton iterations, converged {fit.converged}, "
          f"std errors {fit.std_error_method})")
    print(f"choix: {choix_s:.2f} s (choix.mm_pairwise, alpha=0, tol={args.choix_tol:g}, one run)")

    rated = np.zeros(args.items, dtype=bool)  # items with real comparisons (not only the reference item's)
    rated[winners] = True
    rated[losers] = True
    a, b = fit.strengths[: args.items][rated], choix_strengths[: args.items][rated]
    diff = (a - a.mean()) - (b - b.mean())
    t = true[rated]
    print(f"pearson(ours, choix) = {pearson(a, b):.10f} on {int(rated.sum())} items with comparisons; "
          f"after centring both there: max |diff| = {np.max(np.abs(diff)):.2e}, rms = {np.sqrt(np.mean(diff**2)):.2e}")
    print(f"pearson vs true strengths: ours {pearson(a, t):.4f}, choix {pearson(b, t):.4f}")

    t0 = time.perf_counter()
    prod = fit_bradley_terry(args.items, winners, losers, prior=0.1)
    prod_s = time.perf_counter() - t0
    z = (prod.strengths[rated] - (t - t.mean())) / prod.std_errors[rated]
    print(f"ours, production setting (prior=0.1, no reference item): {prod_s:.2f} s, {prod.iterations} Newton "
          f"iterations, pearson vs true {pearson(prod.strengths[rated], t):.4f}, std errors "
          f"({prod.std_error_method}) cover the centred truth at 95%: {np.mean(np.abs(z) < 1.96):.3f}")
    print(f"ratio={choix_s / ours_s:.1f}")


if __name__ == "__main__":
    main()
