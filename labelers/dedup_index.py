"""Sub-quadratic memory lookups for :class:`labelers.filters.NearDuplicateFilter` (``exact=False``, issue 15).

Both indexes answer one question for a block of queries: is each query near *any* item of the kept memory? They
never hold the memory themselves: the filter appends kept rows to its own arrays and calls ``sync(memory)``
before a query, which indexes the rows added since the last call (kept items of earlier blocks, or rows seeded
with ``add_kept`` on a refresh: the index is rebuilt from the stored rows in linear time, nothing is recomputed
from images).

* :class:`PHashIndex`: multi-index hashing of 64-bit pHashes, **exact**. The 64 bits are split into ``m`` chunks;
  if two codes are within hamming distance ``d``, some chunk differs in at most ``r = d // m`` bits (pigeonhole),
  so probing each chunk's buckets with every value within ``r`` bits of the query's chunk finds every candidate,
  and each candidate is verified on the whole code. ``m`` (and so ``r``) is picked by a small cost model (for
  ``d = 4``: 3 chunks of 21-22 bits, radius 1; ``r = 0`` is the classic ``m = d + 1``). Buckets are CSR tables
  over runs of the memory merged like a log-structured merge tree (a run at most half the size of the one
  before it), so indexing is ``O(N log N)`` and a query costs ``O(m · probes · runs)`` plus its true
  chunk collisions.
* :class:`ClipIndex`: cosine (inner product of L2-normalised float32 rows) through faiss, **approximate**. Below
  ``min_items`` kept rows it declines (the caller's exact brute force runs); from there an IVF index whose
  centroids are ``nlist = rows // list_size`` evenly spaced memory rows (no k-means: deterministic and linear),
  found through an HNSW graph over the centroids, searched with ``nprobe`` lists. It is rebuilt from the memory
  whenever the memory has grown ``rebuild_factor`` times since the last build (amortised linear), so list sizes
  stay bounded and a query costs about ``log(nlist) + nprobe · list_size · rebuild_factor · D`` flops whatever
  the memory's size. A near duplicate is missed only when its kept twin lies in none of the ``nprobe`` lists
  searched: recall is measured by ``bench/dedup.py``. Results are deterministic: the centroid graph is built on
  one thread, and searches are independent per query.

numpy only at import; faiss loads inside :class:`ClipIndex`.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

import numpy as np

_FOLD = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing for chunks wider than a run's table
_MAX_TABLE_BITS = 22  # widest bucket table of a run: 4M entries


def _popcount64(x: np.ndarray) -> np.ndarray:
    from labelers.filters import popcount64

    return popcount64(x)


def _probes(width: int, radius: int) -> int:
    return sum(math.comb(width, i) for i in range(radius + 1))


def _widths(m: int) -> list[int]:
    """Widths of ``m`` chunks covering 64 bits, widest first."""
    return [64 // m + (1 if i < 64 % m else 0) for i in range(m)]


def choose_chunks(max_distance: int, capacity: int = 1 << 20, runs: int = 8) -> tuple[int, int, float]:
    """``(m, r, cost)``: chunks and per-chunk probe radius minimising the expected work per query against ``capacity``
    kept codes in about ``runs`` runs: probes ``m · Σ_{i≤r} C(w, i)`` per run, each touching about
    ``capacity / 2^w`` true chunk collisions (``w`` the narrowest chunk, bucket tables of up to 2^22 entries)."""
    d = int(max_distance)
    best = None
    for m in range(1, min(d + 1, 16) + 1):
        r = d // m
        w = min(_widths(m))
        probes = m * _probes(w, r)
        cost = probes * (runs + capacity / 2.0 ** min(w, _MAX_TABLE_BITS))
        if best is None or cost < best[0]:
            best = (cost, m, r)
    return best[1], best[2], best[0]


class _Run:
    """CSR bucket tables of memory rows ``[lo, hi)``, one per chunk."""

    __slots__ = ("lo", "hi", "tables")

    def __init__(self, lo: int, hi: int, tables: list[tuple[int, np.ndarray, np.ndarray]]):
        self.lo, self.hi, self.tables = lo, hi, tables

    @property
    def size(self) -> int:
        return self.hi - self.lo


class PHashIndex:
    """Exact hamming-radius lookup of 64-bit codes (multi-index hashing; see the module docstring)."""

    def __init__(self, max_distance: int, capacity: int = 1 << 20):
        self.max_distance = int(max_distance)
        self.m, self.radius, self.cost = choose_chunks(self.max_distance, capacity)
        # brute force compares each query with every kept code: the index pays off below that
        self.worthwhile = self.cost < capacity / 4
        self.widths = _widths(self.m)
        self.shifts = [int(s) for s in np.cumsum([0] + self.widths[:-1])]
        # per chunk: every XOR pattern of at most `radius` bits within the chunk's width
        self.patterns = []
        for w in self.widths:
            pats = [0]
            for k in range(1, self.radius + 1):
                pats += [sum(1 << b for b in bits) for bits in combinations(range(w), k)]
            self.patterns.append(np.array(pats, dtype=np.uint64))
        self.runs: list[_Run] = []
        self.indexed = 0

    def _keys(self, codes: np.ndarray, c: int) -> np.ndarray:
        w = self.widths[c]
        mask = np.uint64((1 << w) - 1)
        return (codes >> np.uint64(self.shifts[c])) & mask

    def _slots(self, keys: np.ndarray, c: int, bits: int) -> np.ndarray:
        """Table slot of chunk values: the value itself when the table is as wide as the chunk, else hashed."""
        if bits >= self.widths[c]:
            return keys.astype(np.int64)
        return ((keys * _FOLD) >> np.uint64(64 - bits)).astype(np.int64)

    def _build(self, memory: np.ndarray, lo: int, hi: int) -> _Run:
        codes = memory[lo:hi]
        size = hi - lo
        tables = []
        for c, w in enumerate(self.widths):
            bits = min(w, _MAX_TABLE_BITS, max(1, math.ceil(math.log2(size)) + 2))
            slots = self._slots(self._keys(codes, c), c, bits)
            order = np.argsort(slots, kind="stable").astype(np.int64) + lo
            starts = np.zeros((1 << bits) + 1, dtype=np.int64)
            np.cumsum(np.bincount(slots, minlength=1 << bits), out=starts[1:])
            tables.append((bits, order, starts))
        return _Run(lo, hi, tables)

    def sync(self, memory: np.ndarray) -> None:
        """Index the rows of ``memory`` added since the last call (a run, then merges)."""
        n = len(memory)
        if n <= self.indexed:
            return
        self.runs.append(self._build(memory, self.indexed, n))
        self.indexed = n
        while len(self.runs) >= 2 and self.runs[-2].size <= 2 * self.runs[-1].size:
            right = self.runs.pop()
            left = self.runs.pop()
            self.runs.append(self._build(memory, left.lo, right.hi))

    def hits(self, queries: np.ndarray, memory: np.ndarray) -> np.ndarray:
        """Whether each query code is within ``max_distance`` bits of some row of ``memory`` (synced first)."""
        self.sync(memory)
        n = len(queries)
        hit = np.zeros(n, dtype=bool)
        if n == 0 or not self.runs:
            return hit
        d = self.max_distance
        for run in self.runs:
            for c, (bits, order, starts) in enumerate(run.tables):
                todo = np.flatnonzero(~hit)
                if len(todo) == 0:
                    return hit
                pats = self.patterns[c]
                probes = (self._keys(queries[todo], c)[:, None] ^ pats[None, :]).reshape(-1)
                slots = self._slots(probes, c, bits)
                s = starts[slots]
                cnt = starts[slots + 1] - s
                nz = np.flatnonzero(cnt)
                if len(nz) == 0:
                    continue
                s, cnt = s[nz], cnt[nz]
                qid = todo[nz // len(pats)]
                total = int(cnt.sum())
                first = np.cumsum(cnt) - cnt
                pos = np.repeat(s - first, cnt) + np.arange(total, dtype=np.int64)
                qrep = np.repeat(qid, cnt)
                ok = _popcount64(memory[order[pos]] ^ queries[qrep]) <= d
                hit[qrep[ok]] = True
        return hit


class ClipIndex:
    """Approximate "some kept row has cosine >= threshold" through a faiss IVF index (module docstring)."""

    def __init__(self, threshold: float, min_items: int = 4096, list_size: int = 256, nprobe: int = 8,
                 rebuild_factor: float = 4.0, graph_m: int = 32, ef_add: int = 16, ef_search: int = 32):
        self.threshold = np.float32(threshold)
        self.min_items = max(1, int(min_items))
        self.list_size = max(1, int(list_size))
        self.nprobe = max(1, int(nprobe))
        self.rebuild_factor = float(rebuild_factor)
        self.graph_m, self.ef_add, self.ef_search = int(graph_m), int(ef_add), int(ef_search)
        self.index: Any = None
        self.quantizer: Any = None
        self.built_at = 0  # memory rows when the index was last built
        self.indexed = 0
        self.builds = 0

    def _build(self, memory: np.ndarray) -> None:
        import faiss

        n, dim = memory.shape
        nlist = max(1, n // self.list_size)
        centroids = np.ascontiguousarray(memory[(np.arange(nlist, dtype=np.int64) * n) // nlist])
        quantizer = faiss.IndexHNSWFlat(dim, self.graph_m, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efConstruction = 40
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # the graph depends on insertion order only when built on one thread
        try:
            quantizer.add(centroids)
        finally:
            faiss.omp_set_num_threads(threads)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True  # centroids are given, not trained
        self.quantizer, self.index = quantizer, index  # the IVF index does not own its quantizer: keep both alive
        self.index.nprobe = self.nprobe
        self.built_at = n
        self.indexed = 0
        self.builds += 1

    def sync(self, memory: np.ndarray) -> bool:
        """Index the rows added since the last call (rebuilding after enough growth); False while the memory is
        below ``min_items`` rows (the caller compares exactly)."""
        n = len(memory)
        if n < self.min_items:
            return False
        if self.index is None or n >= self.rebuild_factor * self.built_at:
            self._build(memory)
        if n > self.indexed:
            self.quantizer.hnsw.efSearch = self.ef_add
            self.index.add(np.ascontiguousarray(memory[self.indexed : n], dtype=np.float32))
            self.indexed = n
        return True

    def hits(self, queries: np.ndarray, memory: np.ndarray) -> np.ndarray | None:
        """Whether each query (L2-normalised rows) has a neighbour with inner product >= threshold among the
        indexed memory rows; None while the memory is too small for the index."""
        if not self.sync(memory):
            return None
        if len(queries) == 0:
            return np.zeros(0, dtype=bool)
        self.quantizer.hnsw.efSearch = self.ef_search
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        return (ids[:, 0] >= 0) & (sims[:, 0] >= self.threshold)
