"""Flow-matching losses in trainers.losses (SDE steps with log-probs, training σ's, GDPO, DyRef DAR, velocity KL)
against hand-computed values; the arithmetic is written out next to each expectation."""

from __future__ import annotations

import math

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

torch = pytest.importorskip("torch")

from trainers import losses as L  # noqa: E402

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)  # 0.9189385332

# The running scalar example: x = 1, v = 0.5, σ = 0.8 -> σ_next = 0.6 (dt = -0.2), η = 0.7.
X, V, SIG, SIG_NEXT, ETA = 1.0, 0.5, 0.8, 0.6, 0.7
# flow_sde:  σ_t = 0.7·√(0.8/(1-0.8)) = 0.7·2 = 1.4, σ_t² = 1.96
#            mean = 1·(1 + 1.96/1.6·(-0.2)) + 0.5·(1 + 1.96·0.2/1.6)·(-0.2) = (1 - 0.245) + 0.5·1.245·(-0.2)
#                 = 0.755 - 0.1245 = 0.6305
#            std  = 1.4·√0.2 = 0.6260990
# dance_sde: x̂0 = 1 - 0.8·0.5 = 0.6; score = -(1 - 0.6·0.2)/0.64 = -0.88/0.64 = -1.375
#            mean = 1 + (-0.2)·0.5 + (-0.5·0.49·(-1.375))·(-0.2) = 0.9 + 0.336875·(-0.2) = 0.9 - 0.067375 = 0.832625
#            std  = 0.7·√0.2 = 0.3130495
# cps:       std = 0.6·sin(0.35π) = 0.6·0.8910065 = 0.5346039
#            x̂0 = 0.6, x̂1 = 1 + (1-0.8)·0.5 = 1.1, √(0.6² - std²) = 0.6·cos(0.35π) = 0.6·0.4539905 = 0.2723943
#            mean = 0.6·(1-0.6) + 1.1·0.2723943 = 0.24 + 0.2996337 = 0.5396337
# ode:       mean = 1 + (-0.2)·0.5 = 0.9, std = 0
HAND = {
    "flow_sde": (0.6305, 0.6260990),
    "dance_sde": (0.832625, 0.3130495),
    "cps": (0.5396337, 0.5346039),
    "ode": (0.9, 0.0),
}


def _full(value, shape=(1, 1, 1, 1)):
    return torch.full(shape, value, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- mean / std
@pytest.mark.parametrize("sde_type", L.FLOW_SDE_TYPES)
def test_flow_sde_mean_std_hand_computed(sde_type):
    mean, std = L.flow_sde_mean_std(_full(V), SIG, SIG_NEXT, _full(X), ETA, sde_type)
    exp_mean, exp_std = HAND[sde_type]
    assert mean.dtype == torch.float32 and mean.shape == (1, 1, 1, 1)
    assert mean.item() == pytest.approx(exp_mean, abs=1e-6)
    assert float(std) == pytest.approx(exp_std, abs=1e-6)


@pytest.mark.parametrize("sde_type", L.FLOW_SDE_TYPES)
def test_flow_sde_batched_sigmas_match_per_sample(sde_type):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v = torch.randn(3, 4, 5, 5, generator=g)
    sig = torch.tensor([1.0, 0.8, 0.3])
    sig_next = torch.tensor([0.9, 0.6, 0.0])
    mean_b, std_b = L.flow_sde_mean_std(v, sig, sig_next, x, ETA, sde_type)
    assert std_b.shape == (3, 1, 1, 1)
    for i in range(3):
        m_i, s_i = L.flow_sde_mean_std(v[i : i + 1], float(sig[i]), float(sig_next[i]), x[i : i + 1], ETA, sde_type)
        torch.testing.assert_close(mean_b[i : i + 1], m_i)
        assert std_b[i].item() == pytest.approx(float(s_i), rel=1e-6, abs=1e-12)


def test_flow_sde_sigma_one_uses_sigma_max():
    # σ = 1 -> σ_next = 0.9 (dt = -0.1), η = 0.5, sigma_max = 0.95 (Flow-GRPO passes the schedule's sigmas[1]):
    #   σ_t = 0.5·√(1/(1-0.95)) = 0.5·√20 = 2.2360680 ; std = 2.2360680·√0.1 = 0.7071068
    #   mean = x·(1 + 5/2·(-0.1)) + v·(1 + 5·0/2)·(-0.1) = 0.75·x - 0.1·v = 0.75 - 0.05 = 0.7   (x = 1, v = 0.5)
    mean, std = L.flow_sde_mean_std(_full(0.5), 1.0, 0.9, _full(1.0), 0.5, "flow_sde", sigma_max=0.95)
    assert float(std) == pytest.approx(0.7071068, abs=1e-6)
    assert mean.item() == pytest.approx(0.7, abs=1e-6)
    # the default sigma_max = 0.9999: σ_t = 0.5·√(1/1e-4) = 50 (finite) ; std = 50·√0.1 = 15.811388
    mean, std = L.flow_sde_mean_std(_full(0.5), 1.0, 0.9, _full(1.0), 0.5, "flow_sde")
    assert float(std) == pytest.approx(15.811388, rel=1e-3)  # 1 - 0.9999 is inexact in float32
    assert torch.isfinite(mean).all()
    # below sigma_max the clamp does nothing: σ = 0.8 with sigma_max = 0.95 is the hand example above
    _, std = L.flow_sde_mean_std(_full(V), SIG, SIG_NEXT, _full(X), ETA, "flow_sde", sigma_max=0.95)
    assert float(std) == pytest.approx(HAND["flow_sde"][1], abs=1e-6)


def test_flow_sde_unknown_type_raises():
    with pytest.raises(ValueError):
        L.flow_sde_mean_std(_full(V), SIG, SIG_NEXT, _full(X), ETA, "sde")


# --------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("sde_type", L.FLOW_SDE_TYPES)
def test_flow_log_prob_is_gaussian_density(sde_type):
    shape = (2, 3, 4, 4)
    g = torch.Generator().manual_seed(1)
    exp_mean, exp_std = HAND[sde_type]
    min_std = 1e-3  # ODE: std 0 is floored at min_std
    scale = exp_std if exp_std > 0 else min_std
    prev = exp_mean + scale * torch.randn(shape, generator=g)
    prev_out, lp = L.flow_sde_step_with_log_prob(
        _full(V, shape), SIG, SIG_NEXT, _full(X, shape), ETA, sde_type, prev_sample=prev, min_std=min_std
    )
    assert torch.equal(prev_out, prev)
    expected = torch.distributions.Normal(torch.full(shape, exp_mean), scale).log_prob(prev).mean(dim=(1, 2, 3))
    assert lp.shape == (2,)
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-4)
    # reduce="sum" sums instead
    _, lp_sum = L.flow_sde_step_with_log_prob(
        _full(V, shape), SIG, SIG_NEXT, _full(X, shape), ETA, sde_type, prev_sample=prev, min_std=min_std,
        reduce="sum",
    )
    torch.testing.assert_close(lp_sum, expected * 48, rtol=1e-5, atol=1e-3)


def test_flow_sde_log_prob_scalar_hand_computed():
    # flow_sde example, x_next = mean + 0.1: std² = 1.96·0.2 = 0.392
    #   -0.01/(2·0.392) - log(0.6260990) - ½log 2π = -0.0127551 + 0.4682467 - 0.9189385 = -0.4634469
    _, lp = L.flow_sde_step_with_log_prob(
        _full(V), SIG, SIG_NEXT, _full(X), ETA, "flow_sde", prev_sample=_full(HAND["flow_sde"][0] + 0.1)
    )
    assert lp.item() == pytest.approx(-0.4634469, abs=1e-5)


@pytest.mark.parametrize("sde_type", L.FLOW_SDE_TYPES)
def test_flow_sample_then_rescore_gives_ratio_one(sde_type):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 6, generator=g)
    v = torch.randn(2, 4, 6, 6, generator=g)
    sig, sig_next = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4])
    prev, lp = L.flow_sde_step_with_log_prob(v, sig, sig_next, x, ETA, sde_type,
                                             generator=torch.Generator().manual_seed(7))
    # the noise is torch.randn(shape, generator) on the CPU
    mean, std = L.flow_sde_mean_std(v, sig, sig_next, x, ETA, sde_type)
    z = torch.randn(prev.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(prev, mean + std * z)
    if sde_type != "ode":
        assert not torch.equal(prev, mean)
    # same seed -> same sample
    prev2, _ = L.flow_sde_step_with_log_prob(v, sig, sig_next, x, ETA, sde_type,
                                             generator=torch.Generator().manual_seed(7))
    assert torch.equal(prev, prev2)
    _, lp_again = L.flow_sde_step_with_log_prob(v, sig, sig_next, x, ETA, sde_type, prev_sample=prev)
    assert torch.equal(lp, lp_again)
    assert torch.exp(lp_again - lp).tolist() == [1.0, 1.0]
    # the mean is the most likely point
    if sde_type != "ode":
        _, lp_at_mean = L.flow_sde_step_with_log_prob(v, sig, sig_next, x, ETA, sde_type, prev_sample=mean)
        assert torch.all(lp_at_mean > lp)


@pytest.mark.parametrize("sde_type", ["flow_sde", "dance_sde", "cps"])
def test_flow_log_prob_gradient_flows_to_model_output(sde_type):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 4, generator=g)
    v = torch.randn(2, 4, 4, 4, generator=g).requires_grad_()
    prev = torch.randn(2, 4, 4, 4, generator=g)
    _, lp = L.flow_sde_step_with_log_prob(v, 0.7, 0.5, x, ETA, sde_type, prev_sample=prev)
    lp.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_flow_sde_log_prob_gradient_hand_computed():
    # d lp / d v = (x_next - mean)/std² · d mean/d v, with d mean/d v = (1 + σ_t²(1-σ)/(2σ))·dt = 1.245·(-0.2) = -0.249
    # x_next = mean + 0.1: 0.1/0.392·(-0.249) = -0.0635204
    v = _full(V).requires_grad_()
    _, lp = L.flow_sde_step_with_log_prob(v, SIG, SIG_NEXT, _full(X), ETA, "flow_sde",
                                          prev_sample=_full(HAND["flow_sde"][0] + 0.1))
    lp.sum().backward()
    assert v.grad.item() == pytest.approx(-0.0635204, abs=1e-5)


# --------------------------------------------------------------------------------------------- ODE limit / diffusers
def _flow_scheduler(steps=10, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    return s


def test_ode_step_matches_diffusers_flow_match_euler():
    s = _flow_scheduler()
    assert s.sigmas[0].item() == pytest.approx(1.0) and s.sigmas[-1].item() == 0.0
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, step_t in enumerate(s.timesteps):  # every step, down to σ_next = 0
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = s.step(out, step_t, x).prev_sample
        sig, sig_next = s.sigmas[i], s.sigmas[i + 1]
        ours, lp = L.flow_sde_step_with_log_prob(out, float(sig), float(sig_next), x, 0.0, "ode")
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        assert torch.isfinite(lp).all()
        # batched (B,) σ's and η = 0 with the stochastic types give the same Euler step
        for sde_type in ("ode", "flow_sde", "dance_sde"):
            mean, std = L.flow_sde_mean_std(out, sig.expand(2), sig_next.expand(2), x, 0.0, sde_type)
            torch.testing.assert_close(mean, ref, rtol=1e-6, atol=1e-6)
            assert torch.all(std == 0)
        x = ref


@pytest.mark.parametrize("sde_type", ["flow_sde", "dance_sde"])
def test_small_eta_mean_approaches_ode_mean(sde_type):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 6, generator=g)
    v = torch.randn(2, 4, 6, 6, generator=g)
    ode, _ = L.flow_sde_mean_std(v, 0.7, 0.6, x, 0.0, "ode")
    gaps = []
    for eta in (0.5, 0.1, 0.01, 0.001):
        mean, std = L.flow_sde_mean_std(v, 0.7, 0.6, x, eta, sde_type)
        gaps.append((mean - ode).abs().max().item())
        assert float(std) > 0
    # the drift correction is ∝ η²: each 10× smaller η shrinks the gap ~100×
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] < 1e-5
    assert gaps[2] / gaps[1] == pytest.approx(0.01, rel=0.05)


def test_cps_eta_zero_is_ddim_like_and_preserves_coefficients():
    # η = 0: std = 0 and mean = (1-σ_next)·x̂0 + σ_next·x̂1, which for the flow parametrisation equals the Euler step
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 4, generator=g)
    v = torch.randn(2, 3, 4, 4, generator=g)
    mean, std = L.flow_sde_mean_std(v, 0.7, 0.4, x, 0.0, "cps")
    ode, _ = L.flow_sde_mean_std(v, 0.7, 0.4, x, 0.0, "ode")
    torch.testing.assert_close(mean, ode)
    assert float(std) == 0.0
    # any η: coefficient on x̂1 squared plus std² equals σ_next² (the "coefficients-preserving" property)
    _, std = L.flow_sde_mean_std(v, 0.7, 0.4, x, 0.3, "cps")
    c1 = 0.4 * math.cos(0.3 * math.pi / 2)
    assert c1**2 + float(std) ** 2 == pytest.approx(0.16, abs=1e-6)


# --------------------------------------------------------------------------------------------- training σ's
def test_flow_matching_time_shift_hand_computed():
    # shift 3: σ = 0.5 -> 1.5/(1 + 2·0.5) = 0.75 ; σ = 0.25 -> 0.75/1.5 = 0.5 ; endpoints fixed
    assert L.flow_matching_time_shift(0.5, 3.0) == pytest.approx(0.75)
    assert L.flow_matching_time_shift(0.25, 3.0) == pytest.approx(0.5)
    assert L.flow_matching_time_shift(0.0, 3.0) == 0.0 and L.flow_matching_time_shift(1.0, 3.0) == 1.0
    assert L.flow_matching_time_shift(0.3, 1.0) == pytest.approx(0.3)


def test_flow_matching_sigmas_uniform_and_shift():
    u = torch.rand(16, generator=torch.Generator().manual_seed(0)).double()
    sig = L.flow_matching_sigmas(16, torch.Generator().manual_seed(0), weighting="uniform", shift=3.0)
    assert sig.shape == (16,) and sig.dtype == torch.float32
    torch.testing.assert_close(sig, (3 * u / (1 + 2 * u)).float())
    sig1 = L.flow_matching_sigmas(16, torch.Generator().manual_seed(0), weighting="uniform")
    torch.testing.assert_close(sig1, u.float().clamp(1e-6, 1 - 1e-6))


def test_flow_matching_sigmas_logit_normal():
    n = torch.randn(8, generator=torch.Generator().manual_seed(1)).double()
    sig = L.flow_matching_sigmas(8, torch.Generator().manual_seed(1), logit_mean=0.5, logit_std=2.0, shift=2.0)
    u = torch.sigmoid(0.5 + 2.0 * n)
    torch.testing.assert_close(sig, (2 * u / (1 + u)).float())
    # range and median: the median of sigmoid(N(0, 1)) is 0.5, shifted by 3 -> 0.75
    big = L.flow_matching_sigmas(20000, torch.Generator().manual_seed(2), shift=3.0)
    assert bool((big > 0).all() and (big < 1).all())
    assert big.median().item() == pytest.approx(0.75, abs=0.01)
    # extreme logits still land strictly inside (0, 1)
    wide = L.flow_matching_sigmas(2000, torch.Generator().manual_seed(3), logit_std=50.0)
    assert bool((wide > 0).all() and (wide < 1).all())
    with pytest.raises(ValueError):
        L.flow_matching_sigmas(2, None, weighting="mode")


def test_flow_matching_noisy_and_target():
    x0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    noise = torch.tensor([[0.0, 1.0], [-1.0, 1.0]])
    # v = ε - x0 = [[-1, -1], [-4, -3]]
    assert L.flow_matching_target(x0, noise).tolist() == [[-1.0, -1.0], [-4.0, -3.0]]
    # σ = (0.25, 1): row 0 = 0.75·(1, 2) + 0.25·(0, 1) = (0.75, 1.75); row 1 = noise = (-1, 1)
    assert L.flow_matching_noisy(x0, noise, torch.tensor([0.25, 1.0])).tolist() == [[0.75, 1.75], [-1.0, 1.0]]
    # float σ; and x_σ moves along v: d x_σ / dσ = v
    assert L.flow_matching_noisy(x0, noise, 0.5).tolist() == [[0.5, 1.5], [1.0, 2.5]]
    a, b = L.flow_matching_noisy(x0, noise, 0.3), L.flow_matching_noisy(x0, noise, 0.7)
    torch.testing.assert_close((b - a) / 0.4, L.flow_matching_target(x0, noise))


# --------------------------------------------------------------------------------------------- GDPO
def test_gdpo_hand_computed_differs_from_summed_grpo():
    # two groups of two: ids (0, 0, 1, 1); reward "big" on a ×100 scale, "small" on a ×1 scale
    big = torch.tensor([100.0, 0.0, 50.0, 50.0])
    small = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1])
    # per-reward group normalisation:
    #   big:   group 0 (100, 0): mean 50, std 50 -> (1, -1); group 1 (50, 50): std 0 -> (0, 0)
    #   small: group 0 (0, 1): mean 0.5, std 0.5 -> (-1, 1); group 1 (0, 1) -> (-1, 1)
    # sum = (0, 0, -1, 1): samples 0 and 1 each win one reward and tie.
    raw = L.gdpo_advantages({"big": big, "small": small}, ids, batch_normalize=False)
    assert raw.tolist() == pytest.approx([0.0, 0.0, -1.0, 1.0], abs=1e-5)
    # batch standardisation: mean 0, population std √(2/4) = 0.7071068 -> (0, 0, -1.4142136, 1.4142136)
    adv = L.gdpo_advantages({"big": big, "small": small}, ids)
    assert adv.tolist() == pytest.approx([0.0, 0.0, -1.4142136, 1.4142136], abs=1e-5)
    # plain GRPO on the summed reward (100, 1, 50, 51): group 0 mean 50.5, std 49.5 -> (1, -1);
    # group 1 mean 50.5, std 0.5 -> (-1, 1): the ×100 reward decides group 0 alone.
    summed = L.group_advantages(big + small, ids)
    assert summed.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert not torch.allclose(adv, summed, atol=0.1)


def test_gdpo_weights_and_validation():
    big = torch.tensor([100.0, 0.0, 50.0, 50.0])
    small = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ids = torch.tensor([0, 0, 1, 1])
    # weights big 2, small 1 (default): 2·(1, -1, 0, 0) + (-1, 1, -1, 1) = (1, -1, -1, 1); mean 0, std 1
    adv = L.gdpo_advantages({"big": big, "small": small}, ids, weights={"big": 2.0})
    assert adv.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert adv.dtype == torch.float32 and adv.shape == (4,)
    # a single reward without batch normalisation is plain group_advantages
    torch.testing.assert_close(L.gdpo_advantages({"r": big}, ids, batch_normalize=False), L.group_advantages(big, ids))
    with pytest.raises(KeyError):
        L.gdpo_advantages({"big": big}, ids, weights={"bgi": 1.0})
    with pytest.raises(ValueError):
        L.gdpo_advantages({}, ids)


# --------------------------------------------------------------------------------------------- DAR as DyRef runs it
def test_dyref_constants():
    assert (L.DYREF_DAR_W_MIN, L.DYREF_DAR_W_MAX, L.DYREF_DAR_GAMMA, L.DYREF_DRS_TAU) == (0.5, 5.0, 2.0, 0.65)


def test_dar_weights_dyref_bounds_hand_computed():
    # p = (1.3, -0.4, 0.5, 0.2, 0.9) -> clip to [0, 1] -> (1, 0, 0.5, 0.2, 0.9)
    # (1-p)^2 = (0, 1, 0.25, 0.64, 0.01) -> clip [0.5, 5] -> (0.5, 1, 0.5, 0.64, 0.5); mean 3.14/5 = 0.628
    # w = (0.5, 1, 0.5, 0.64, 0.5)/0.628 = (0.7961783, 1.5923567, 0.7961783, 1.0191083, 0.7961783)
    p = torch.tensor([1.3, -0.4, 0.5, 0.2, 0.9])
    w = L.dar_weights(p, gamma=L.DYREF_DAR_GAMMA, w_min=L.DYREF_DAR_W_MIN, w_max=L.DYREF_DAR_W_MAX)
    assert w.tolist() == pytest.approx([0.7961783, 1.5923567, 0.7961783, 1.0191083, 0.7961783], abs=1e-6)
    # without the clip p = -0.4 would give (1.4)^2 = 1.96 instead of 1: it is treated as p = 0
    assert w[1].item() == pytest.approx(L.dar_weights(torch.tensor([1.3, 0.0, 0.5, 0.2, 0.9]), 2.0, 0.5, 5.0)[1].item())
    # p > 1 is treated as p = 1 (fully easy -> floor weight)
    assert w[0].item() == pytest.approx(w[4].item())


# --------------------------------------------------------------------------------------------- velocity KL
def test_kl_velocity_hand_computed():
    v_new = torch.tensor([[[1.0, 2.0]], [[0.5, 0.5]]])
    v_ref = torch.tensor([[[0.0, 0.0]], [[0.5, 0.5]]])
    # sample 0: (1² + 2²)/2 = 2.5 ; sample 1: 0
    assert L.kl_velocity(v_new, v_ref).tolist() == [2.5, 0.0]
    assert L.kl_velocity(v_new, v_ref, reduce="sum").tolist() == [5.0, 0.0]
    # flow_sde means differ by c·(v_new - v_ref), c = (1 + σ_t²(1-σ)/(2σ))·dt = -0.249 in the running example, so
    # the latent-space KL (mean reduce) is c²/(2·std²)·kl_velocity = 0.062001/0.784·2.5 = 0.1977073
    x = torch.ones(2, 1, 2)
    m_new, std = L.flow_sde_mean_std(v_new, SIG, SIG_NEXT, x, ETA, "flow_sde")
    m_ref, _ = L.flow_sde_mean_std(v_ref, SIG, SIG_NEXT, x, ETA, "flow_sde")
    kl = L.kl_to_reference(m_new, m_ref, std, reduce="mean")
    assert kl.tolist() == pytest.approx([0.1977073, 0.0], abs=1e-6)
