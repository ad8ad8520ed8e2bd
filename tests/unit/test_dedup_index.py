"""Near-duplicate filtering through indexes (issue 15): the exact pHash multi-index hashing, the faiss CLIP index,
and the corpus built with ``filters.dedup.exact`` true and false."""

from collections import Counter

import numpy as np
import pytest

from labelers.dedup_index import PHashIndex, choose_chunks
from labelers.filters import (
    EXACT_DUPLICATE,
    NEAR_DUPLICATE_CLIP,
    NEAR_DUPLICATE_PHASH,
    NearDuplicateFilter,
    hamming_distance,
)
from pipelines.corpora import ShardLimits, build_corpus
from pipelines.corpus_sources import CorpusFilters


def reasons(verdicts):
    return [reason for _, reason in verdicts]


def clustered_codes(n, rng, max_flips, centres):
    """Codes around a few centres (skewed chunk values, like real pHashes), many within ``max_flips`` bits."""
    codes = centres[rng.integers(0, 8, size=n)]
    for _ in range(max_flips):
        bit = rng.integers(0, 64, size=n).astype(np.uint64)
        codes = np.where(rng.random(n) < 0.5, codes ^ (np.uint64(1) << bit), codes)
    return codes


@pytest.mark.parametrize("d", [0, 1, 2, 4, 5, 8])
def test_phash_index_finds_exactly_the_codes_within_the_radius(d):
    rng = np.random.default_rng(d)
    m, r, _ = choose_chunks(d)
    assert m * (r + 1) > d  # pigeonhole: some chunk is within r bits of a code within d bits
    centres = rng.integers(0, 2**64, size=8, dtype=np.uint64)
    memory = clustered_codes(3000, rng, d + 3, centres)
    queries = clustered_codes(500, rng, d + 3, centres) ^ rng.integers(0, 2**64, size=500, dtype=np.uint64) * (
        rng.random(500) < 0.3).astype(np.uint64)  # 30 % far from everything
    index = PHashIndex(d)
    for hi in (1, 40, 41, 700, 1500, 3000):  # uneven syncs: runs of many sizes, merged
        got = index.hits(queries, memory[:hi])
        expected = (hamming_distance(queries[:, None], memory[None, :hi]) <= d).any(axis=1)
        assert np.array_equal(got, expected), hi
    assert 0 < expected.sum() < len(queries)
    assert len(index.runs) <= 12


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def dataset(n, rng, dim=32):
    """Items with CLIP near copies (cosine 0.975-0.995), pHash near copies (1-2 bits) and byte copies."""
    emb = unit(rng.normal(size=(n, dim)))
    ph = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    sha = [f"sha{i}" for i in range(n)]
    for i in range(1, n):
        src = int(rng.integers(0, i))
        kind = rng.random()
        if kind < 0.2:
            r = rng.normal(size=dim)
            r -= (r @ emb[src]) * emb[src]
            c = rng.uniform(0.975, 0.995)
            emb[i] = c * emb[src] + np.sqrt(1 - c * c) * r / np.linalg.norm(r)
        elif kind < 0.3:
            ph[i] = ph[src] ^ np.uint64(1 << int(rng.integers(0, 64))) ^ np.uint64(1 << int(rng.integers(0, 64)))
        elif kind < 0.35:
            sha[i], emb[i], ph[i] = sha[src], emb[src], ph[src]
    return sha, ph, emb


def run(f, keys, sha, ph, emb, cuts):
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        out += reasons(f.filter_batch(keys[lo:hi], sha[lo:hi], ph[lo:hi], emb[lo:hi]))
    return out


def test_indexed_filter_matches_brute_force_while_exact():
    """pHash through the multi-index hash and CLIP below ``ann_min_items``: verdicts identical to exact=True."""
    rng = np.random.default_rng(11)
    n = 1500
    sha, ph, emb = dataset(n, rng)
    keys = [f"k{i}" for i in range(n)]
    expected = run(NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97), keys, sha, ph, emb, [0, n])
    assert {EXACT_DUPLICATE, NEAR_DUPLICATE_PHASH, NEAR_DUPLICATE_CLIP, None} <= set(expected)
    for block_size in (None, 1, 64):
        f = NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97, exact=False, block_size=block_size)
        assert run(f, keys, sha, ph, emb, [0, 1, 300, 301, n]) == expected, block_size
    # pHash alone through the index, CLIP off: still identical
    only_ph = NearDuplicateFilter(phash_max_distance=4)
    f = NearDuplicateFilter(phash_max_distance=4, exact=False)
    assert run(f, keys, sha, ph, emb, [0, 700, n]) == run(only_ph, keys, sha, ph, emb, [0, n])


def test_indexed_filter_with_the_faiss_index_keeps_counts_within_recall():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(12)
    n = 3000
    sha, ph, emb = dataset(n, rng)
    keys = [f"k{i}" for i in range(n)]
    expected = run(NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97), keys, sha, ph, emb, [0, n])
    ann = dict(exact=False, ann_min_items=100, block_size=64, ann_list_size=16, ann_nprobe=4)
    f = NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97, **ann)
    got = run(f, keys, sha, ph, emb, [0, 1000, 2000, n])
    assert f._clip_index.builds >= 2  # the index was built and rebuilt as the memory grew
    exp_counts, got_counts = Counter(expected), Counter(got)
    assert got_counts[EXACT_DUPLICATE] == exp_counts[EXACT_DUPLICATE]  # exact stays exact
    drops = sum(v for k, v in exp_counts.items() if k is not None)
    got_drops = sum(v for k, v in got_counts.items() if k is not None)
    assert 0.98 * drops <= got_drops <= drops  # a miss keeps an item, it never drops one more
    agree = sum(a == b for a, b in zip(expected, got) if a is not None)
    assert agree >= 0.98 * drops
    # deterministic: the same stream again gives the same verdicts
    again = NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97, **ann)
    assert run(again, keys, sha, ph, emb, [0, 1000, 2000, n]) == got


def test_add_kept_rebuilds_the_index_from_stored_rows():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(13)
    n = 2000
    sha, ph, emb = dataset(n, rng)
    keys = [f"k{i}" for i in range(n)]
    args = dict(phash_max_distance=4, cosine_threshold=0.97, exact=False, ann_min_items=100, ann_list_size=16)
    whole = NearDuplicateFilter(**args)
    first = run(whole, keys, sha, ph, emb, [0, 1200])
    rest = run(whole, keys, sha, ph, emb, [1200, n])
    kept = [i for i, r in enumerate(first) if r is None]
    refreshed = NearDuplicateFilter(**args)  # a refresh: the kept items of the first partitions, seeded
    refreshed.add_kept([keys[i] for i in kept], [sha[i] for i in kept], ph[kept], emb[kept])
    refreshed._seen_sha.update(sha[:1200])  # every seen sha256 (dropped ones too), as the filter remembers them
    assert run(refreshed, keys, sha, ph, emb, [1200, n]) == rest


class FilterSource:
    """A corpus source the way SftSource uses the duplicate filter: one filter_batch per partition, kept items
    re-seeded with add_kept when a partition's segment is reused."""

    def __init__(self, data, exact, **ann):
        self.data = data
        self.filters = CorpusFilters({"dedup": {"phash_max_distance": 4, "clip_cosine": 0.97, "exact": exact}})
        if ann:
            self.filters.duplicates = NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.97,
                                                          exact=exact, **ann)
        self.dedup_mode = {"exact": self.filters.dedup_exact}

    def samples(self, partition, drops):
        keys, sha, ph, emb = self.data[partition]
        for i, (ok, reason) in enumerate(self.filters.duplicates.filter_batch(keys, sha, ph, emb)):
            if not ok:
                drops[reason] += 1
                continue
            yield {"__key__": keys[i], "txt": "x"}, {"task": "t2i", "i": i}

    def reused(self, partition, rows):
        keys, sha, ph, emb = self.data[partition]
        kept = rows["i"].to_list()
        self.filters.duplicates.add_kept([keys[i] for i in kept], [sha[i] for i in kept], ph[kept], emb[kept])


def partitions(n_parts=3, per=400, seed=14):
    rng = np.random.default_rng(seed)
    sha, ph, emb = dataset(n_parts * per, rng)
    keys = [f"k{i}" for i in range(len(sha))]
    return {f"p{p}": (keys[p * per:(p + 1) * per], sha[p * per:(p + 1) * per], ph[p * per:(p + 1) * per],
                      emb[p * per:(p + 1) * per]) for p in range(n_parts)}


def test_corpus_built_with_exact_true_and_false_is_identical_on_small_inputs(tmp_path):
    data = partitions()
    inputs = {p: f"fp-{p}" for p in data}
    builds = {exact: build_corpus(tmp_path / str(exact), "sft", inputs, {"exact": exact},
                                  FilterSource(data, exact), ShardLimits(max_samples=100))
              for exact in (True, False)}
    manifests = {exact: b.manifest for exact, b in builds.items()}
    assert manifests[True]["dedup"] == {"exact": True} and manifests[False]["dedup"] == {"exact": False}
    assert manifests[True]["drops"] == manifests[False]["drops"]
    assert set(manifests[True]["drops"]) == {EXACT_DUPLICATE, NEAR_DUPLICATE_PHASH, NEAR_DUPLICATE_CLIP}
    assert manifests[True]["segments"]["p2"]["drops"] == manifests[False]["segments"]["p2"]["drops"]


def test_corpus_refresh_with_the_index_equals_a_build_from_scratch(tmp_path):
    pytest.importorskip("faiss")
    data = partitions(n_parts=4)
    ann = dict(ann_min_items=64, ann_list_size=16)
    first = {p: f"fp-{p}" for p in ("p0", "p1", "p2")}
    build_corpus(tmp_path / "refresh", "sft", first, {}, FilterSource(data, False, **ann), ShardLimits(100))
    refreshed = build_corpus(tmp_path / "refresh", "sft", {**first, "p3": "fp-p3"}, {},
                             FilterSource(data, False, **ann), ShardLimits(100))
    assert refreshed.reused == ["p0", "p1", "p2"] and refreshed.written == ["p3"]
    # the index was rebuilt from the seeded rows (not from images) and the refresh drops what the exact path
    # drops, within the recall (a byte copy of an item dropped in a reused partition may count as a near
    # duplicate instead: the memory holds the kept items' sha256s only, as before issue 15)
    exact = build_corpus(tmp_path / "exact", "sft", {**first, "p3": "fp-p3"}, {}, FilterSource(data, True),
                         ShardLimits(100))
    total = sum(exact.manifest["segments"]["p3"]["drops"].values())
    got = sum(refreshed.manifest["segments"]["p3"]["drops"].values())
    assert total > 20 and 0.98 * total <= got <= total
    assert refreshed.manifest["num_samples"] - exact.manifest["num_samples"] == total - got
