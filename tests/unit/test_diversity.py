"""Fréchet distance without scipy, EMA feature moments, leave-one-out FID diversity."""

import numpy as np
import pytest

from labelers.diversity import FeatureMoments, frechet_distance, loo_fid_diversity, sqrtm_psd


def random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def brute_force_loo(x, ref):
    def moments(z):
        return z.mean(axis=0), np.cov(z, rowvar=False)

    full = frechet_distance(*moments(x), ref.mean, ref.cov)
    return np.array([frechet_distance(*moments(np.delete(x, i, axis=0)), ref.mean, ref.cov) - full
                     for i in range(len(x))])


# -- frechet_distance -------------------------------------------------------------------------------------------
def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=16), random_cov(rng, 16)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    # singular covariance (fewer samples than dimensions), as with CLIP features of a small group
    x = rng.normal(size=(5, 32))
    m, c = x.mean(axis=0), np.cov(x, rowvar=False)
    assert frechet_distance(m, c, m, c) == pytest.approx(0.0, abs=1e-9)


def test_frechet_shifted_identity_is_squared_shift():
    m = np.array([1.0, -2.0, 0.5])  # |m|² = 1 + 4 + 0.25
    assert frechet_distance(np.zeros(3), np.eye(3), m, np.eye(3)) == pytest.approx(5.25, abs=1e-12)


def test_frechet_hand_computed_diagonal_and_symmetric():
    # commuting diagonal covariances: tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½) = Σ (√a - √b)²
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())  # + |μ1 - μ2|² = 1
    assert frechet_distance(np.zeros(3), np.diag(a), np.array([0, 1.0, 0]), np.diag(b)) == pytest.approx(expected)
    # non-commuting covariances: symmetric in its arguments, and tr (Σ1Σ2)^½ matches a general eig
    rng = np.random.default_rng(1)
    c1, c2, m1, m2 = random_cov(rng, 6), random_cov(rng, 6), rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(frechet_distance(m2, c2, m1, c1), rel=1e-9)
    tr_sqrt = np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()  # eigenvalues of Σ1Σ2 are real and >= 0
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    s = sqrtm_psd(c1)
    assert s @ s == pytest.approx(c1, abs=1e-10)


# -- FeatureMoments -----------------------------------------------------------------------------------------------
def test_ema_update_hand_computed():
    m = FeatureMoments.from_features(np.array([[0.0, 0.0], [2.0, 2.0]]))
    assert m.mean == pytest.approx([1.0, 1.0]) and m.count == 2
    assert m.cov == pytest.approx(np.array([[2.0, 2.0], [2.0, 2.0]]))  # ddof=1
    # batch: μ_b = (4, 1), Σ_b = [[0, 0], [0, 2]], μ - μ_b = (-3, 0); decay 0.5:
    # μ' = (2.5, 1); Σ' = ½Σ + ½Σ_b + ¼(μ - μ_b)(μ - μ_b)ᵀ = [[1 + 2.25, 1], [1, 1 + 1]]
    out = m.ema_update(np.array([[4.0, 0.0], [4.0, 2.0]]), decay=0.5)
    assert out is m
    assert m.mean == pytest.approx([2.5, 1.0])
    assert m.cov == pytest.approx(np.array([[3.25, 1.0], [1.0, 2.0]]))
    assert m.count == 4


def test_ema_update_equals_ema_of_raw_moments_and_first_batch_initialises():
    rng = np.random.default_rng(2)
    batches = [rng.normal(loc=i, size=(8, 3)) for i in range(4)]
    m = FeatureMoments.empty(3)
    m.ema_update(batches[0], decay=0.9)
    assert m.mean == pytest.approx(batches[0].mean(axis=0)) and m.cov == pytest.approx(np.cov(batches[0].T))
    first = batches[0].mean(axis=0)
    second = np.cov(batches[0].T) + np.outer(first, first)
    for b in batches[1:]:
        m.ema_update(b, decay=0.9)
        mb = b.mean(axis=0)
        first = 0.9 * first + 0.1 * mb
        second = 0.9 * second + 0.1 * (np.cov(b.T) + np.outer(mb, mb))
    assert m.mean == pytest.approx(first)
    assert m.cov == pytest.approx(second - np.outer(first, first))
    assert m.count == 32
    # a single feature still updates (zero batch covariance, the mean shift widens Σ)
    before = np.trace(m.cov)
    m.ema_update(np.full((1, 3), 10.0), decay=0.9)
    assert np.trace(m.cov) > before
    with pytest.raises(ValueError):
        m.ema_update(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        m.ema_update(np.zeros((2, 3)), decay=1.5)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    m = FeatureMoments.from_features(rng.normal(size=(20, 5)))
    m.ema_update(rng.normal(size=(7, 5)), decay=0.99)
    path = tmp_path / "moments" / "ref.safetensors"
    m.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["ref.safetensors"]  # no temporary left behind
    loaded = FeatureMoments.load(path)
    assert np.array_equal(loaded.mean, m.mean) and np.array_equal(loaded.cov, m.cov) and loaded.count == m.count
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:  # a plain safetensors file (no pickle)
        assert set(f.keys()) == {"mean", "cov", "count"}
        assert f.metadata()["format"] == "prefmill.feature_moments"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        FeatureMoments.load(tmp_path / "bad.safetensors")


# -- leave-one-out FID --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d", [(8, 32), (16, 16), (17, 16), (40, 6), (3, 2)])
def test_loo_matches_brute_force_in_both_spaces(n, d):
    rng = np.random.default_rng(n * 100 + d)
    ref = FeatureMoments.from_features(rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.2)
    x = rng.normal(size=(n, d))
    got = loo_fid_diversity(x, ref)
    assert got.shape == (n,)
    assert got == pytest.approx(brute_force_loo(x, ref), abs=1e-8)
    # tiny batches of the stacked eigendecompositions give the same numbers
    assert loo_fid_diversity(x, ref, max_batch_bytes=1) == pytest.approx(got, abs=1e-10)


def test_novel_sample_scores_higher_than_near_duplicate():
    rng = np.random.default_rng(4)
    ref = FeatureMoments(np.zeros(4), np.eye(4), count=10_000)  # the distribution to cover: N(0, I)
    collapsed = rng.normal(scale=0.3, size=(10, 4))  # a mode-collapsed group
    duplicate = collapsed[0] + 1e-3 * rng.normal(size=4)
    novel = np.array([2.0, -1.5, 0.0, 1.0])  # a plausible sample far from the others
    x = np.vstack([collapsed, duplicate, novel])
    scores = loo_fid_diversity(x, ref)
    dup, nov = scores[10], scores[11]
    assert nov > 0 and nov > dup + 0.1
    assert nov == scores.max()
    # an off-distribution outlier is not rewarded: removing it brings the set closer to the reference
    outlier = np.array([40.0, 40.0, 40.0, 40.0])
    scores = loo_fid_diversity(np.vstack([collapsed, novel, outlier]), ref)
    assert scores[-1] < 0 and scores[-1] == scores.min()


def test_loo_inputs_validated_and_torch_accepted():
    import torch

    rng = np.random.default_rng(5)
    ref = FeatureMoments.from_features(rng.normal(size=(50, 4)))
    x = rng.normal(size=(6, 4)).astype(np.float32)
    assert loo_fid_diversity(torch.from_numpy(x), ref) == pytest.approx(loo_fid_diversity(x, ref))
    with pytest.raises(ValueError):
        loo_fid_diversity(x[:2], ref)  # needs 3 samples
    with pytest.raises(ValueError):
        loo_fid_diversity(rng.normal(size=(6, 5)), ref)
    with pytest.raises(ValueError):
        loo_fid_diversity(x, FeatureMoments.empty(4))


def test_loo_on_clip_features_of_the_tiny_zoo():
    from PIL import Image

    from labelers.clip_scorer import ClipScorer

    scorer = ClipScorer("zoo:clip", cpu_threads=1).setup()
    colours = [((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256) for i in range(12)]
    ref_images = [Image.new("RGB", (32, 32), c) for c in colours]
    ref = FeatureMoments.empty(scorer.embed_dim).ema_update(scorer.embed_images(ref_images), decay=0.99)
    group = ref_images[:3] + [ref_images[0]] + [ref_images[7]]  # includes an exact duplicate
    scores = loo_fid_diversity(scorer.embed_images(group), ref)
    assert scores.shape == (5,) and np.all(np.isfinite(scores))
    assert scores[0] == pytest.approx(scores[3], abs=1e-9)  # identical images, identical scores
