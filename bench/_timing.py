"""Timing shared by the benchmarks: the ways under comparison run alternately in one process, so background
load on a shared machine hits each alike; every run's wall and CPU seconds are kept (callers report the best)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def alternate(runs: dict[str, Callable[[], Any]], repeats: int):
    """Run each of ``runs`` once per round for ``repeats`` rounds. Returns (last result, walls, cpus) by name."""
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            last[name] = run()
            walls[name].append(time.perf_counter() - w0)
            cpus[name].append(time.process_time() - c0)
    return last, walls, cpus
