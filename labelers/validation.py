"""Checks of a labels table against the labels contract (DESIGN.md), as a list of problems (empty: valid)."""

from __future__ import annotations

import math
import numbers

from labelers.judge.protocol import STATUS_OK, STATUSES
from labelers.rubrics import all_dimensions, load_rubric

REQUIRED = ("candidate_id", "prompt_id", "judge_id", "clip_t", "clip_i", "clip_i_per_ref", "lambda_harmonic",
            "reward", "status", "error")


def label_problems(labels, task_by_prompt: dict[str, str], max_examples: int = 5) -> list[str]:
    """Missing columns, unknown statuses, ok rows without a reward or with a score outside 0–5 on one of their
    task's dimensions, ok rows holding a non-finite number (NaN, ±inf) in any column or list entry, failed rows
    without an error message, duplicate (candidate_id, judge_id) keys."""
    import polars as pl

    columns = list(REQUIRED) + [c for d in all_dimensions() for c in (d, f"{d}_feedback")]
    missing = [c for c in columns if c not in labels.columns]
    if missing:
        return [f"missing columns {missing}"]
    problems = []
    unknown = sorted(set(labels["status"].unique().to_list()) - set(STATUSES))
    if unknown:
        problems.append(f"unknown statuses {unknown}")
    duplicates = len(labels) - labels.select("candidate_id", "judge_id").n_unique()
    if duplicates:
        problems.append(f"{duplicates} duplicate (candidate_id, judge_id) rows")
    failed = labels.filter((pl.col("status") != STATUS_OK) & pl.col("error").is_null())
    if len(failed):
        problems.append(f"{len(failed)} failed rows without an error, e.g. {failed['candidate_id'].head(max_examples).to_list()}")
    ok = labels.filter(pl.col("status") == STATUS_OK)
    if ok["reward"].null_count():
        problems.append(f"{ok['reward'].null_count()} ok rows without a reward")
    dims_by_task: dict[str, tuple[str, ...]] = {}
    bad: list[str] = []
    non_finite: list[str] = []
    for row in ok.iter_rows(named=True):
        found = [f"{name}={value!r}" for name, value in _non_finite(row)]
        if found:
            non_finite.append(f"{row['candidate_id']}: {', '.join(found)}")
        task = task_by_prompt.get(row["prompt_id"])
        if task is None:
            bad.append(f"{row['candidate_id']}: prompt {row['prompt_id']} unknown")
            continue
        if task not in dims_by_task:
            dims_by_task[task] = load_rubric(task).dimension_names
        for dim in dims_by_task[task]:
            score = row[dim]
            if score is None or not 0.0 <= score <= 5.0 or not isinstance(row[f"{dim}_feedback"], str):
                bad.append(f"{row['candidate_id']}: {dim}={score!r}")
    if bad:
        problems.append(f"{len(bad)} ok rows with missing or out-of-range scores, e.g. {bad[:max_examples]}")
    if non_finite:
        problems.append(f"{len(non_finite)} ok rows with non-finite values (they should be reward_error), e.g. "
                        f"{non_finite[:max_examples]}")
    return problems


def _is_non_finite(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral):
        return False
    return not math.isfinite(value)


def _non_finite(row: dict) -> list[tuple[str, float]]:
    """``(column, value)`` of every NaN / ±inf in ``row``, list columns entry by entry (``column[k]``)."""
    out = []
    for name, value in row.items():
        if isinstance(value, (list, tuple)):
            out += [(f"{name}[{k}]", v) for k, v in enumerate(value) if _is_non_finite(v)]
        elif _is_non_finite(value):
            out.append((name, value))
    return out
