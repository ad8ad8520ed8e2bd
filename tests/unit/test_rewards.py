"""λ-Harmonic, DRS, Bradley-Terry and the aggregate reward against hand-computed numbers."""

import math

import numpy as np
import pytest

from labelers.bradley_terry import bt_probability, stable_sigmoid
from labelers.rewards import aggregate_reward, drs_clip_i, drs_k, drs_sharpen, lambda_harmonic


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# -- λ-Harmonic ------------------------------------------------------------------------------------------------
def test_lambda_harmonic_hand_computed():
    # 1 / (0.5/0.8 + 0.5/0.2) = 1 / (0.625 + 2.5) = 0.32
    assert lambda_harmonic(0.8, 0.2, 0.5) == pytest.approx(0.32)
    # 1 / (0.25/0.6 + 0.75/0.3) = 1 / (0.41666… + 2.5) = 0.342857…
    assert lambda_harmonic(0.6, 0.3, 0.25) == pytest.approx(1 / (0.25 / 0.6 + 0.75 / 0.3))
    assert lambda_harmonic(0.6, 0.3, 0.25) == pytest.approx(0.3428571428571)


def test_lambda_harmonic_edge_cases():
    assert lambda_harmonic(0.8, 0.2, 0.0) == pytest.approx(0.2)  # λ=0 -> CLIP_T
    assert lambda_harmonic(0.8, 0.2, 1.0) == pytest.approx(0.8)  # λ=1 -> CLIP_I
    assert lambda_harmonic(None, 0.2, 0.7) == pytest.approx(0.2)  # no references -> CLIP_T
    assert lambda_harmonic(0.5, 0.5, 0.3) == pytest.approx(0.5)  # equal inputs -> same value
    # cosines <= 0 are clamped to eps: 1 / (0.5/1e-6 + 0.5/0.2) = 1 / 500002.5
    assert lambda_harmonic(-0.3, 0.2, 0.5) == pytest.approx(1 / 500002.5)
    assert lambda_harmonic(0.8, -0.1, 0.0) == pytest.approx(1e-6)
    assert lambda_harmonic(1.7, 1.2, 0.5) == pytest.approx(1.0)  # clamped to 1
    assert math.isfinite(lambda_harmonic(0.0, 0.0, 0.5))
    with pytest.raises(ValueError):
        lambda_harmonic(0.5, 0.5, 1.5)


def test_lambda_harmonic_vectorised():
    out = lambda_harmonic(np.array([0.8, 0.6]), np.array([0.2, 0.3]), 0.5)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.32, 0.4])  # 1/(0.5/0.6+0.5/0.3) = 1/2.5 = 0.4
    assert isinstance(lambda_harmonic(0.8, 0.2, 0.5), float)


# -- DRS ------------------------------------------------------------------------------------------------------
def test_drs_hand_computed():
    """DyRef's DRS with its released defaults: k = k0 + k1·(n_refs - 2) with k0 = 10, k1 = 3; τ = 0.65."""
    assert drs_k(4) == 16.0 and drs_k(2) == 10.0 and drs_k(1) == 7.0
    # n_refs=4: k = 10 + 3*2 = 16; s=0.7 -> σ(16 * 0.05) = σ(0.8) = 1/(1+e^-0.8)
    assert drs_sharpen(0.7, 4) == pytest.approx(sig(0.8))
    assert drs_sharpen(0.7, 4) == pytest.approx(0.6899744811)
    assert drs_sharpen(0.65, 2) == pytest.approx(0.5)  # s = τ -> 0.5 whatever k
    # n_refs=3: k=13; s=0.5 -> σ(13 * -0.15) = σ(-1.95) = 0.1245534
    assert drs_sharpen(0.5, 3) == pytest.approx(sig(-1.95))
    assert drs_sharpen(0.5, 3) == pytest.approx(0.1245534, abs=1e-7)
    assert drs_sharpen(0.9, 2, k0=5.0, k1=1.0, tau=0.68) == pytest.approx(sig(5 * 0.22))


def test_drs_elementwise_and_mean():
    sims = [0.7, 0.5, 0.9]
    out = drs_sharpen(sims, 3)
    np.testing.assert_allclose(out, [sig(13 * 0.05), sig(13 * -0.15), sig(13 * 0.25)])
    assert drs_clip_i(sims) == pytest.approx(float(np.mean(out)))
    assert drs_clip_i([]) is None
    # sharpening widens gaps around τ
    assert drs_sharpen(0.75, 4) - drs_sharpen(0.65, 4) > 0.75 - 0.65


# -- Bradley-Terry --------------------------------------------------------------------------------------------
def test_bt_probability_hand_computed():
    assert bt_probability(1.0, 0.0) == pytest.approx(0.7310585786)  # σ(1)
    assert bt_probability(0.6, 0.4, tau=0.1) == pytest.approx(sig(2.0))  # σ(0.2/0.1) = 0.880797
    assert bt_probability(0.6, 0.4, tau=0.1) == pytest.approx(0.8807970780)
    assert bt_probability(0.3, 0.3) == 0.5
    assert bt_probability(0.2, 0.9, 0.5) + bt_probability(0.9, 0.2, 0.5) == pytest.approx(1.0)


def test_bt_probability_stable_and_vectorised():
    assert bt_probability(1e4, -1e4, tau=1e-3) == 1.0
    assert bt_probability(-1e4, 1e4, tau=1e-3) == 0.0
    out = bt_probability(np.array([1.0, 0.0, 800.0, -800.0]), np.zeros(4))
    assert out.shape == (4,) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [sig(1.0), 0.5, 1.0, 0.0])
    np.testing.assert_allclose(stable_sigmoid([-1.0, 1.0]), [sig(-1.0), sig(1.0)])
    with pytest.raises(ValueError):
        bt_probability(1.0, 0.0, tau=0.0)


# -- aggregate ------------------------------------------------------------------------------------------------
def test_aggregate_reward_hand_computed():
    # mean(4, 2) = 3 -> 3/5 = 0.6; 0.5*0.6 + 0.5*0.32 = 0.46
    assert aggregate_reward({"a": 4, "b": 2}, 0.32) == pytest.approx(0.46)
    # 0.7*0.6 + 0.3*0.32 = 0.516
    assert aggregate_reward({"a": 4, "b": 2}, 0.32, judge_weight=0.7, clip_weight=0.3) == pytest.approx(0.516)
    assert aggregate_reward({"a": 5.0, "b": 5.0, "c": 5.0}, 1.0) == pytest.approx(1.0)
    assert aggregate_reward({"a": 0, "b": 0}, 0.0) == 0.0


def test_aggregate_reward_without_judge_renormalises_to_clip():
    assert aggregate_reward(None, 0.32) == pytest.approx(0.32)
    assert aggregate_reward({}, 0.32) == pytest.approx(0.32)
    assert aggregate_reward(None, 0.32, judge_weight=0.7, clip_weight=0.3) == pytest.approx(0.32)
    with pytest.raises(ValueError):
        aggregate_reward({"a": 1}, 0.3, judge_weight=0.0, clip_weight=0.0)
    with pytest.raises(ValueError):
        aggregate_reward({"a": 1}, 0.3, judge_weight=-1.0)
