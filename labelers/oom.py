"""Out-of-memory backoff for batched GPU work: a batch that does not fit is retried in halves, and the smaller size
is kept for the rest of the work, instead of failing the whole partition (generation and judging use it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or other accelerator) out-of-memory, recognised by type where torch names one, else by message."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _free_cached_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def map_batches_with_oom_backoff(items: Sequence[T], batch_size: int, fn: Callable[[list[T]], list[R]],
                                 on_shrink: Callable[[int, int], Any] | None = None,
                                 min_batch_size: int = 1) -> tuple[list[R], int]:
    """``fn`` over ``items`` in batches of ``batch_size`` (one result per item, in order). A batch that raises an
    out-of-memory error is retried at half the size (cached memory released first), and later batches keep the
    smaller size; ``on_shrink(old, new)`` is told. Out of memory at ``min_batch_size`` re-raises, as does any
    other error. Returns the results and the batch size that worked last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[R] = []
    start, size = 0, batch_size
    while start < len(items):
        batch = list(items[start:start + size])
        try:
            out = fn(batch)
        except Exception as exc:  # noqa: BLE001 - anything but OOM is re-raised below
            if not is_out_of_memory(exc) or size <= min_batch_size:
                raise
            _free_cached_memory()
            new = max(min_batch_size, size // 2)
            if on_shrink is not None:
                on_shrink(size, new)
            size = new
            continue
        if len(out) != len(batch):
            raise ValueError(f"batch function returned {len(out)} results for {len(batch)} items")
        results.extend(out)
        start += len(batch)
    return results, size
