"""labelers.filters: image checks, pHash, the near-duplicate filter (exact, pHash, CLIP cosine; greedy keep-first,
blocking, seeding), label-row filters, drop counting and the NSFW classifier wrapper on a tiny random ViT."""

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from labelers.filters import (
    BELOW_REWARD_THRESHOLD,
    EXACT_DUPLICATE,
    MISSING_REWARD,
    NEAR_DUPLICATE_CLIP,
    NEAR_DUPLICATE_PHASH,
    NSFW,
    UNDECODABLE_IMAGE,
    UNDERSIZED_IMAGE,
    NearDuplicateFilter,
    NsfwClassifier,
    apply,
    as_phash_array,
    check_image,
    count_drops,
    hamming_distance,
    judge_failure,
    perceptual_hash,
    popcount64,
    reward_at_least,
)


def smooth_image(seed: int, size: int = 128) -> Image.Image:
    """A natural-ish image: low-resolution noise upscaled smoothly (pHash needs low-frequency structure)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# check_image
# ----------------------------------------------------------------------------------------------------------------
def test_check_image_keeps_a_valid_image_bytes_and_pil():
    img = smooth_image(0, 64)
    assert check_image(encode(img), min_side=32) == (True, None)
    assert check_image(encode(img, "JPEG", quality=90), min_side=64) == (True, None)
    assert check_image(img, min_side=64) == (True, None)


def test_check_image_drops_undersized():
    tiny = Image.new("RGB", (200, 8))
    assert check_image(encode(tiny), min_side=16) == (False, UNDERSIZED_IMAGE)
    assert check_image(tiny, min_side=16) == (False, UNDERSIZED_IMAGE)
    assert check_image(tiny, min_side=8) == (True, None)  # the bound is inclusive
    assert check_image(tiny, min_side=0) == (True, None)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_check_image_drops_truncated_bytes(fmt):
    rng = np.random.default_rng(1)
    noisy = Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8))
    data = encode(noisy, fmt)
    assert check_image(data, min_side=1) == (True, None)
    assert check_image(data[: len(data) // 2], min_side=1) == (False, UNDECODABLE_IMAGE)


def test_check_image_drops_garbage_and_nothing():
    assert check_image(b"definitely not an image" * 10, min_side=1) == (False, UNDECODABLE_IMAGE)
    assert check_image(b"", min_side=1) == (False, UNDECODABLE_IMAGE)
    assert check_image(None, min_side=1) == (False, UNDECODABLE_IMAGE)
    assert check_image("a string", min_side=1) == (False, UNDECODABLE_IMAGE)


# ----------------------------------------------------------------------------------------------------------------
# pHash and hamming distances
# ----------------------------------------------------------------------------------------------------------------
def test_phash_is_robust_to_recompression_and_brightness_and_separates_images():
    import imagehash

    img = smooth_image(2)
    h = perceptual_hash(img)
    assert isinstance(h, int) and 0 <= h < 2**64
    assert np.array([h], dtype=np.uint64)[0] == h
    assert perceptual_hash(encode(img)) == h  # bytes and PIL give the same hash

    copy = ImageEnhance.Brightness(img).enhance(1.08)
    copy = Image.open(io.BytesIO(encode(copy, "JPEG", quality=60)))
    h_copy = perceptual_hash(copy)
    near = int(hamming_distance(h, h_copy))
    assert near <= 6
    assert near == imagehash.phash(img) - imagehash.phash(copy)  # same bits as imagehash

    others = [perceptual_hash(smooth_image(seed)) for seed in range(10, 20)]
    far = hamming_distance(np.uint64(h), as_phash_array(others))
    assert far.min() > 12


def test_hamming_vectorised_matches_python_popcount():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**64, size=50, dtype=np.uint64)
    b = rng.integers(0, 2**64, size=40, dtype=np.uint64)
    b[:3] = [0, 2**64 - 1, a[0]]
    d = hamming_distance(a[:, None], b[None, :])
    assert d.shape == (50, 40)
    expected = np.array([[bin(int(x) ^ int(y)).count("1") for y in b] for x in a])
    np.testing.assert_array_equal(d, expected)
    assert popcount64(np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)).tolist() == [0, 1, 1, 64]
    # signed int64 storage and hex strings are the same hashes
    signed = a.view(np.int64)
    np.testing.assert_array_equal(as_phash_array(signed), a)
    np.testing.assert_array_equal(as_phash_array([int(x) for x in signed]), a)
    np.testing.assert_array_equal(as_phash_array([f"{int(x):016x}" for x in a]), a)


# ----------------------------------------------------------------------------------------------------------------
# NearDuplicateFilter
# ----------------------------------------------------------------------------------------------------------------
def reasons(verdicts):
    return [reason for _, reason in verdicts]


def test_exact_duplicates_across_and_within_batches():
    f = NearDuplicateFilter()
    assert reasons(f.filter_batch(["a", "b", "c"], sha256s=["x", "y", "x"])) == [None, None, EXACT_DUPLICATE]
    assert reasons(f.filter_batch(["d", "e", "f"], sha256s=["y", "z", None])) == [EXACT_DUPLICATE, None, None]
    assert f.kept_keys == ["a", "b", "e", "f"] and len(f) == 4


def test_phash_duplicates_across_and_within_batches():
    base = [perceptual_hash(smooth_image(s)) for s in range(4)]
    flip_one = [h ^ 1 for h in base]  # one bit away
    f = NearDuplicateFilter(phash_max_distance=4)
    out = f.filter_batch(["a0", "a1", "a0'"], phashes=[base[0], base[1], flip_one[0]])
    assert reasons(out) == [None, None, NEAR_DUPLICATE_PHASH]
    out = f.filter_batch(["a1'", "a2", "a3"], phashes=[flip_one[1], base[2], base[3]])
    assert reasons(out) == [NEAR_DUPLICATE_PHASH, None, None]


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def near_copy(v, cosine, rng):
    """A unit vector at exactly ``cosine`` from unit vector ``v``."""
    r = rng.normal(size=v.shape)
    r -= (r @ v) * v
    r /= np.linalg.norm(r)
    return cosine * v + np.sqrt(1 - cosine**2) * r


def test_clip_duplicates_across_and_within_batches():
    rng = np.random.default_rng(4)
    base = unit(rng.normal(size=(6, 64)))  # random 64-d vectors: pairwise cosines ~ ±0.3
    copies = np.stack([near_copy(v, 0.99, rng) for v in base])
    f = NearDuplicateFilter(cosine_threshold=0.95)
    batch1 = np.concatenate([base[:3], copies[:1]])  # a within-batch copy
    assert reasons(f.filter_batch(list("ABCa"), embeddings=batch1 * 3.0)) == [None, None, None, NEAR_DUPLICATE_CLIP]
    batch2 = np.concatenate([copies[1:3], base[3:]])  # copies of the first batch, then new items
    out = f.filter_batch(["b", "c", "D", "E", "F"], embeddings=batch2)
    assert reasons(out) == [NEAR_DUPLICATE_CLIP, NEAR_DUPLICATE_CLIP, None, None, None]
    assert f.kept_keys == list("ABCDEF")


def chain_embeddings():
    """A~B and B~C (cosine 0.866), A≁C (cosine 0.5) for a threshold of 0.8."""
    angles = np.deg2rad([0.0, 30.0, 60.0])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_greedy_chain_keeps_a_and_c_within_a_batch_and_across_batches():
    emb = chain_embeddings()
    f = NearDuplicateFilter(cosine_threshold=0.8)
    assert reasons(f.filter_batch(list("ABC"), embeddings=emb)) == [None, NEAR_DUPLICATE_CLIP, None]

    f = NearDuplicateFilter(cosine_threshold=0.8)
    assert reasons(f.filter_batch(["A"], embeddings=emb[:1])) == [None]
    assert reasons(f.filter_batch(["B", "C"], embeddings=emb[1:])) == [NEAR_DUPLICATE_CLIP, None]

    # the same with pHashes: A=0, B=2 bits set, C=4 bits set (A~B, B~C at distance 2, A≁C at 4) for max 3
    f = NearDuplicateFilter(phash_max_distance=3)
    assert reasons(f.filter_batch(list("ABC"), phashes=[0, 0b11, 0b1111])) == [None, NEAR_DUPLICATE_PHASH, None]


def brute_force(sha256s, phashes, embeddings, phash_max, cosine):
    """Reference greedy: O(N²) in pure Python/numpy, one item at a time."""
    seen, kept, out = set(), [], []
    emb = unit(embeddings) if embeddings is not None else None
    for i in range(len(sha256s)):
        if sha256s[i] in seen:
            out.append(EXACT_DUPLICATE)
            continue
        seen.add(sha256s[i])
        if any(bin(int(phashes[i]) ^ int(phashes[k])).count("1") <= phash_max for k in kept):
            out.append(NEAR_DUPLICATE_PHASH)
        elif any(float(emb[i] @ emb[k]) >= cosine for k in kept):
            out.append(NEAR_DUPLICATE_CLIP)
        else:
            kept.append(i)
            out.append(None)
    return out


def make_dataset(n, rng, dim=32):
    """Random items with near copies (cosine ~0.99, some chained), pHash near copies and exact copies."""
    emb = unit(rng.normal(size=(n, dim)))
    ph = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    sha = [f"sha{i}" for i in range(n)]
    for i in range(n):
        src = int(rng.integers(0, max(1, i))) if i else 0
        kind = rng.random()
        if i and kind < 0.2:
            emb[i] = near_copy(emb[src], rng.uniform(0.95, 0.995), rng)
        elif i and kind < 0.3:
            ph[i] = ph[src] ^ np.uint64(1 << int(rng.integers(0, 64)))
        elif i and kind < 0.35:
            sha[i] = sha[src]
            emb[i], ph[i] = emb[src], ph[src]
    return sha, ph, emb


def test_blocked_equals_brute_force_for_any_block_size_and_batching():
    rng = np.random.default_rng(5)
    sha, ph, emb = make_dataset(300, rng)
    expected = brute_force(sha, ph, emb, phash_max=2, cosine=0.97)
    assert {EXACT_DUPLICATE, NEAR_DUPLICATE_PHASH, NEAR_DUPLICATE_CLIP, None} <= set(expected)

    keys = [f"k{i}" for i in range(300)]
    for block_size in (1, 7, 64, 4096):
        f = NearDuplicateFilter(phash_max_distance=2, cosine_threshold=0.97, block_size=block_size)
        assert reasons(f.filter_batch(keys, sha, ph, emb)) == expected, block_size
    # the same set fed in uneven batches
    f = NearDuplicateFilter(phash_max_distance=2, cosine_threshold=0.97, block_size=16)
    got = []
    for lo, hi in ((0, 1), (1, 90), (90, 91), (91, 300)):
        got += reasons(f.filter_batch(keys[lo:hi], sha[lo:hi], ph[lo:hi], emb[lo:hi]))
    assert got == expected
    assert len(f) == expected.count(None)


def test_add_kept_seeds_memory_without_filtering():
    rng = np.random.default_rng(6)
    old = unit(rng.normal(size=(3, 16)))
    f = NearDuplicateFilter(phash_max_distance=1, cosine_threshold=0.95)
    # seeding two identical items is fine: add_kept does not filter
    f.add_kept(["o1", "o2", "o3"], sha256s=["s1", "s1", "s3"], phashes=[0, 0, 1 << 40], embeddings=old)
    assert len(f) == 3
    new = np.concatenate([near_copy(old[2], 0.99, rng)[None], unit(rng.normal(size=(3, 16)))])
    out = f.filter_batch(["n1", "n2", "n3", "n4"], sha256s=["x1", "s1", "x3", "x4"],
                         phashes=[0xFFFF, 0xFFFF_0000, 1, 0xFFFF_0000_0000], embeddings=new)
    assert reasons(out) == [NEAR_DUPLICATE_CLIP, EXACT_DUPLICATE, NEAR_DUPLICATE_PHASH, None]


def test_disabled_thresholds_and_missing_inputs_keep_everything():
    rng = np.random.default_rng(7)
    emb = np.repeat(unit(rng.normal(size=(1, 8))), 4, axis=0)  # four identical embeddings
    f = NearDuplicateFilter(phash_max_distance=None, cosine_threshold=None)
    assert all(keep for keep, _ in f.filter_batch(list("abcd"), phashes=[0, 0, 0, 0], embeddings=emb))
    f = NearDuplicateFilter(phash_max_distance=4, cosine_threshold=0.9)
    assert all(keep for keep, _ in f.filter_batch(list("abcd")))  # nothing to compare
    assert f.filter_batch([]) == []


def test_near_duplicate_filter_rejects_bad_inputs():
    with pytest.raises(ValueError, match="phash_max_distance"):
        NearDuplicateFilter(phash_max_distance=65)
    with pytest.raises(ValueError, match="cosine_threshold"):
        NearDuplicateFilter(cosine_threshold=1.5)
    f = NearDuplicateFilter(cosine_threshold=0.9)
    with pytest.raises(ValueError, match="entries for 2 keys"):
        f.filter_batch(["a", "b"], embeddings=np.ones((3, 4)))
    f.filter_batch(["a"], embeddings=np.ones((1, 4)))
    with pytest.raises(ValueError, match="embedding width"):
        f.filter_batch(["b"], embeddings=np.ones((1, 5)))
    with pytest.raises(ValueError, match="NaN"):
        f.filter_batch(["c"], embeddings=np.full((1, 4), np.nan))


# ----------------------------------------------------------------------------------------------------------------
# Label rows and counting
# ----------------------------------------------------------------------------------------------------------------
def test_label_filters_and_counting():
    rows = [
        {"status": "ok", "reward": 0.9},
        {"status": "parse_error", "reward": None},
        {"status": "image_error", "reward": None},
        {"status": "ok", "reward": None},
        {"status": "ok", "reward": float("nan")},
        {"status": "ok", "reward": 0.2},
        {"status": "ok", "reward": 0.5},
    ]
    filters = [judge_failure, reward_at_least(0.5)]
    counter = Counter()
    kept = [row for row in rows if apply(filters, row, counter)]
    assert kept == [rows[0], rows[6]]
    assert counter == {"label_parse_error": 1, "label_image_error": 1, MISSING_REWARD: 2,
                       BELOW_REWARD_THRESHOLD: 1}
    assert reward_at_least(0.0)({"reward": None}) == (False, MISSING_REWARD)

    counter = Counter()
    mask = count_drops([(True, None), (False, NSFW), (False, NSFW), (False, EXACT_DUPLICATE)], counter)
    assert mask == [True, False, False, False]
    assert counter == {NSFW: 2, EXACT_DUPLICATE: 1}


# ----------------------------------------------------------------------------------------------------------------
# NsfwClassifier
# ----------------------------------------------------------------------------------------------------------------
def save_tiny_vit(path, id2label):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_nsfw_model(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("nsfw"), {0: "normal", 1: "NSFW"})


def test_nsfw_classifier_probabilities_and_thresholds(tiny_nsfw_model):
    images = [smooth_image(s, 48) for s in range(5)] + [encode(smooth_image(9, 40))]
    clf = NsfwClassifier(tiny_nsfw_model, batch_size=4)
    assert clf.model is None  # lazy
    probs = clf.process_batch(images)
    assert len(probs) == 6 and all(0.0 <= p <= 1.0 for p in probs)
    assert clf.model is not None and clf.label_indices == [1]

    drop_all = NsfwClassifier(tiny_nsfw_model, threshold=0.0)
    assert drop_all.filter_batch(images) == [(False, NSFW)] * 6
    keep_all = NsfwClassifier(tiny_nsfw_model, threshold=1.01)
    assert keep_all.filter_batch(images) == [(True, None)] * 6
    # the verdict is p >= threshold, consistent with process_batch
    mid = NsfwClassifier(tiny_nsfw_model, threshold=float(np.median(probs)))
    assert [not keep for keep, _ in mid.filter_batch(images)] == [p >= mid.threshold for p in probs]


def test_nsfw_classifier_without_nsfw_labels_raises(tmp_path):
    path = save_tiny_vit(tmp_path / "plain", {0: "cat", 1: "dog"})
    clf = NsfwClassifier(path)
    with pytest.raises(ValueError, match=r"none of the labels.*'nsfw'.*its labels: \['cat', 'dog'\]"):
        clf.process_batch([smooth_image(0, 32)])
    assert clf.model is None
    # naming the model's own classes makes it usable
    assert len(NsfwClassifier(path, nsfw_labels=("Dog",)).process_batch([smooth_image(0, 32)])) == 1
