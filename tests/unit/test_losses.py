"""trainers.losses against hand-computed values (the arithmetic is written out next to each expectation)."""

from __future__ import annotations

import math

import pytest

import trainers  # noqa: F401  (torchvision shim before diffusers)

torch = pytest.importorskip("torch")

from trainers import losses as L  # noqa: E402

LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)  # 0.9189385332


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- Diffusion-DPO
def test_dpo_loss_hand_computed():
    # beta = 2
    # sample 0: model (w - l) = 0.5 - 0.3 = 0.2, ref (w - l) = 0.4 - 0.4 = 0 -> inside = -0.5*2*(0.2 - 0) = -0.2
    # sample 1: model (w - l) = 0.2 - 0.4 = -0.2, ref = 0.3 - 0.3 = 0      -> inside = -0.5*2*(-0.2)   = +0.2
    # -logsigmoid(x) = log(1 + e^-x):  log(1 + e^0.2) = log(2.2214028) = 0.7981389
    #                                   log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    # loss = (0.7981389 + 0.5981389) / 2 = 0.6981389; implicit_acc = 1/2 (only sample 1 > 0); margin = (-0.2+0.2)/2 = 0
    loss, acc, margin = L.diffusion_dpo_loss(t(0.5, 0.2), t(0.3, 0.4), t(0.4, 0.3), t(0.4, 0.3), beta=2.0)
    assert loss.item() == pytest.approx(0.6981389, abs=1e-6)
    assert acc.item() == pytest.approx(0.5)
    assert margin.item() == pytest.approx(0.0, abs=1e-7)


def test_dpo_loss_reference_cancels():
    # model (w-l) = 1.0 - 0.0 = 1.0; ref (w-l) = 2.0 - 0.5 = 1.5 -> inside = -0.5*10*(1.0 - 1.5) = 2.5 > 0
    # loss = log(1 + e^-2.5) = log(1.0820850) = 0.0788897; acc = 1; margin = 2.5
    loss, acc, margin = L.diffusion_dpo_loss(t(1.0), t(0.0), t(2.0), t(0.5), beta=10.0)
    assert loss.item() == pytest.approx(0.0788897, abs=1e-6)
    assert acc.item() == 1.0
    assert margin.item() == pytest.approx(2.5)


def test_dpo_loss_is_log2_when_model_equals_reference():
    g = torch.Generator().manual_seed(0)
    w, l_ = torch.rand(8, generator=g), torch.rand(8, generator=g)
    loss, acc, margin = L.diffusion_dpo_loss(w, l_, w.clone(), l_.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert acc.item() == 0.0  # inside == 0 is not "> 0"
    assert margin.item() == 0.0


def test_dpo_loss_gradient_prefers_lowering_winner_error():
    mw = t(0.5).requires_grad_()
    ml = t(0.5).requires_grad_()
    loss, _, _ = L.diffusion_dpo_loss(mw, ml, t(0.5), t(0.5), beta=2.0)
    loss.backward()
    # d loss / d inside = -(1 - σ(0)) = -0.5; d inside / d mw = -0.5*beta = -1 -> d loss / d mw = +0.5
    assert mw.grad.item() == pytest.approx(0.5)
    assert ml.grad.item() == pytest.approx(-0.5)


# --------------------------------------------------------------------------------------------- GRPO advantages
def test_group_advantages_hand_computed():
    # group 0 = [1, 2, 3]: mean 2, population std sqrt(((-1)^2 + 0 + 1^2)/3) = sqrt(2/3) = 0.8164966
    #   -> advantages (-1, 0, 1) / 0.8164966 = (-1.2247449, 0, 1.2247449)
    # group 1 = [5, 5, 5]: mean 5, std 0 -> (0, 0, 0) / (0 + eps) = 0
    # groups interleaved: ids [0, 1, 0, 1, 0, 1]
    adv = L.group_advantages(t(1, 5, 2, 5, 3, 5), torch.tensor([0, 1, 0, 1, 0, 1]), eps=1e-6)
    expected = [-1.2247449, 0.0, 0.0, 0.0, 1.2247449, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)


def test_group_advantages_arbitrary_labels_and_zero_mean():
    adv = L.group_advantages(t(0.1, 0.4, 0.9, 0.3), torch.tensor([7, 7, 42, 42]))
    # group 7: mean 0.25, std 0.15 -> (-1, 1); group 42: mean 0.6, std 0.3 -> (1, -1)
    assert adv.tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0], abs=1e-4)


# --------------------------------------------------------------------------------------------- DAR
def test_dar_weights_hand_computed():
    # p = (0, 0.5, 0.9, 0.99), gamma 2: (1-p)^2 = (1, 0.25, 0.01, 0.0001)
    # clip to [0.25, 4]: (1, 0.25, 0.25, 0.25); mean = 1.75 / 4 = 0.4375
    # renormalised: (1/0.4375, 0.25/0.4375, ...) = (2.2857143, 0.5714286, 0.5714286, 0.5714286)
    w = L.dar_weights(t(0.0, 0.5, 0.9, 0.99), gamma=2.0, w_min=0.25, w_max=4.0)
    assert w.tolist() == pytest.approx([2.2857143, 0.5714286, 0.5714286, 0.5714286], abs=1e-6)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_dar_weights_clip_bounds_and_mean_one():
    # p = (-2, 0.5): p is clipped to [0, 1] first -> (0, 0.5); (1-p)^2 = (1, 0.25) -> clip [0.25, 4] -> (1, 0.25)
    # mean 0.625 -> (1.6, 0.4). (Before p was clipped, p = -2 gave (1-p)^2 = 9 -> 4 and (1.8823529, 0.1176471).)
    w = L.dar_weights(t(-2.0, 0.5), gamma=2.0, w_min=0.25, w_max=4.0)
    assert w.tolist() == pytest.approx([1.6, 0.4], abs=1e-6)
    # The bounds survive renormalisation as a ratio: max/min <= w_max/w_min.
    g = torch.Generator().manual_seed(1)
    p = torch.rand(64, generator=g) * 3 - 1.5
    w = L.dar_weights(p, gamma=2.0, w_min=0.25, w_max=4.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (w.max() / w.min()).item() <= 16.0 + 1e-4
    raw = (1 - p.clamp(0, 1)).pow(2)
    # groups with identical clipped raw weight get identical final weight; harder groups never weigh less
    order = torch.argsort(p)
    assert torch.all(w[order][1:] <= w[order][:-1] + 1e-6)
    assert raw.numel() == w.numel()


def test_dar_weights_uniform_when_all_equal():
    w = L.dar_weights(t(0.3, 0.3, 0.3))
    assert w.tolist() == pytest.approx([1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------- PPO
def test_ppo_clipped_loss_hand_computed():
    # clip 0.2; logp_old = 0
    # s0: ratio e^0 = 1,   A = +1: max(-1*1,   -1*clip(1))       = -1
    # s1: ratio 1.5,       A = +1: max(-1.5,   -1*1.2)            = -1.2   (clipped)
    # s2: ratio 0.5,       A = -1: max(+0.5,   +1*0.8)            = +0.8   (clipped)
    # mean = (-1 - 1.2 + 0.8) / 3 = -0.4666667; clip_frac = 2/3
    logp_new = t(0.0, math.log(1.5), math.log(0.5)).requires_grad_()
    logp_old = t(0.0, 0.0, 0.0)
    adv = t(1.0, 1.0, -1.0)
    loss, info = L.ppo_clipped_loss(logp_new, logp_old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.4 / 3, abs=1e-6)
    assert info["clip_frac"].item() == pytest.approx(2 / 3)
    loss.backward()
    # only the unclipped sample 0 has a gradient: d/dlogp (-A·e^logp)/3 = -1·1/3
    assert logp_new.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0], abs=1e-6)


def test_ppo_clipped_loss_weights():
    # same samples, weights (1, 2, 3): (-1*1 - 1.2*2 + 0.8*3) / 3 = (-1 - 2.4 + 2.4) / 3 = -1/3
    logp_new = t(0.0, math.log(1.5), math.log(0.5))
    loss, _ = L.ppo_clipped_loss(logp_new, t(0, 0, 0), t(1.0, 1.0, -1.0), 0.2, weights=t(1.0, 2.0, 3.0))
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-6)


# --------------------------------------------------------------------------------------------- Gaussians
def test_gaussian_log_prob_hand_computed():
    # x = (1, 2), mean 0, std 2:
    #   dim 1: -1^2/(2*4) - log 2 - ½log 2π = -0.125 - 0.6931472 - 0.9189385 = -1.7370857
    #   dim 2: -2^2/(2*4) - log 2 - ½log 2π = -0.5   - 0.6931472 - 0.9189385 = -2.1120857
    #   sum = -3.8491714
    lp = L.gaussian_log_prob(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), 2.0)
    assert lp.shape == (1,)
    assert lp.item() == pytest.approx(-3.8491714, abs=1e-6)
    lp_mean = L.gaussian_log_prob(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), 2.0, reduce="mean")
    assert lp_mean.item() == pytest.approx(-3.8491714 / 2, abs=1e-6)


def test_gaussian_log_prob_of_mean_is_max():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 4, 8, 8, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0]).view(4, 1, 1, 1)
    at_mean = L.gaussian_log_prob(mean, mean, std)
    for _ in range(5):
        x = mean + 0.05 * torch.randn(mean.shape, generator=g)
        assert torch.all(L.gaussian_log_prob(x, mean, std) < at_mean)
    # at the mean: D * (-log σ - ½ log 2π), D = 256
    assert at_mean[2].item() == pytest.approx(256 * -LOG_2PI_HALF, rel=1e-6)


def test_kl_to_reference_hand_computed():
    # (1-0)^2/(2*4) + (2-0)^2/(2*4) = 0.125 + 0.5 = 0.625 ; second sample identical means -> 0
    kl = L.kl_to_reference(torch.tensor([[1.0, 2.0], [3.0, 3.0]]), torch.tensor([[0.0, 0.0], [3.0, 3.0]]), 2.0)
    assert kl.tolist() == pytest.approx([0.625, 0.0])
    assert L.kl_to_reference(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), 2.0, reduce="mean").item() == pytest.approx(
        0.3125
    )


# --------------------------------------------------------------------------------------------- DDIM step
def _toy_scheduler():
    from diffusers import DDIMScheduler

    # betas (0.1, 0.2, 0.3, 0.4) -> alphas (0.9, 0.8, 0.7, 0.6) -> alphas_cumprod (0.9, 0.72, 0.504, 0.3024)
    s = DDIMScheduler(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4], clip_sample=False,
                      set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0)
    s.set_timesteps(2)  # step ratio 4 // 2 = 2 -> timesteps (2, 0)
    return s


def test_ddim_mean_std_hand_computed():
    s = _toy_scheduler()
    assert s.timesteps.tolist() == [2, 0]
    # t = 2, t' = 0: ᾱ_t = 0.504, ᾱ_t' = 0.9
    # σ² = (1-0.9)/(1-0.504) * (1 - 0.504/0.9) = 0.2016129 * 0.44 = 0.0887097 -> σ = 0.2978417 (eta = 1)
    # x_t = 1, ε = 0.5: x̂0 = (1 - √0.496·0.5)/√0.504 = (1 - 0.3521363)/0.7099296 = 0.9125746
    # μ = √0.9·0.9125746 + √(1 - 0.9 - 0.0887097)·0.5 = 0.8657455 + 0.1062558·0.5 = 0.9188722
    x = torch.ones(1, 1, 1, 1)
    eps = torch.full((1, 1, 1, 1), 0.5)
    mean, std = L.ddim_mean_std(s, eps, 2, x, eta=1.0)
    assert std.item() == pytest.approx(0.2978417, abs=1e-6)
    assert mean.item() == pytest.approx(0.9188722, abs=1e-6)
    # log-prob of x_{t-1} = μ + 0.1: -0.01/(2·0.0887097) - log 0.2978417 - 0.9189385
    #                               = -0.0563636 + 1.2111932 - 0.9189385 = 0.2358910
    prev, lp = L.ddim_step_with_log_prob(s, eps, 2, x, eta=1.0, prev_sample=mean + 0.1)
    assert lp.item() == pytest.approx(0.2358910, abs=1e-5)
    assert torch.equal(prev, mean + 0.1)
    # eta = 0.5 halves σ and changes the direction term: √(1 - 0.9 - 0.25·0.0887097)
    mean_h, std_h = L.ddim_mean_std(s, eps, 2, x, eta=0.5)
    assert std_h.item() == pytest.approx(0.2978417 / 2, abs=1e-6)
    assert mean_h.item() == pytest.approx(0.8657455 + math.sqrt(0.1 - 0.25 * 0.0887097) * 0.5, abs=1e-5)


def _sd_scheduler(steps=10):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_eta0_matches_diffusers(prediction_type):
    from diffusers import DDIMScheduler

    s = _sd_scheduler()
    s = DDIMScheduler.from_config(s.config, prediction_type=prediction_type)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for step_t in s.timesteps:  # includes the last step, whose t' < 0 uses final_alpha_cumprod
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = s.step(out, step_t, x, eta=0.0).prev_sample
        ours, lp = L.ddim_step_with_log_prob(s, out, step_t, x, eta=0.0)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(lp).all()
        x = ref


def test_ddim_step_eta1_matches_diffusers_with_same_generator():
    s = _sd_scheduler()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    out = torch.randn(2, 4, 8, 8, generator=g)
    t_ = s.timesteps[3]
    ref = s.step(out, t_, x, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours, _ = L.ddim_step_with_log_prob(s, out, t_, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_ddim_step_batched_timesteps_and_log_prob_max_at_mean():
    s = _sd_scheduler()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    ts = s.timesteps[[0, 4, 9]]
    mean_b, std_b = L.ddim_mean_std(s, out, ts, x, eta=1.0)
    assert std_b.shape == (3, 1, 1, 1) and torch.all(std_b > 0)
    for i in range(3):
        m_i, s_i = L.ddim_mean_std(s, out[i : i + 1], int(ts[i]), x[i : i + 1], eta=1.0)
        torch.testing.assert_close(mean_b[i : i + 1], m_i)
        assert std_b[i].item() == pytest.approx(s_i.item(), rel=1e-6)
    _, lp_at_mean = L.ddim_step_with_log_prob(s, out, ts, x, eta=1.0, prev_sample=mean_b)
    sampled, lp_sampled = L.ddim_step_with_log_prob(s, out, ts, x, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(lp_at_mean > lp_sampled)
    assert not torch.equal(sampled, mean_b)


def test_ddim_log_prob_gradient_flows_to_model_output():
    s = _sd_scheduler()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 4, 4, generator=g)
    out = torch.randn(2, 4, 4, 4, generator=g).requires_grad_()
    prev = torch.randn(2, 4, 4, 4, generator=g)
    _, lp = L.ddim_step_with_log_prob(s, out, s.timesteps[2], x, eta=1.0, prev_sample=prev)
    lp.sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0


def test_per_sample_mse_and_targets():
    pred = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    target = torch.zeros_like(pred)
    # (1 + 9)/2 = 5 ; 0
    assert L.per_sample_mse(pred, target).tolist() == [5.0, 0.0]
    s = _sd_scheduler()
    noise = torch.ones(1, 1, 1, 1)
    assert L.noise_prediction_target(s, torch.zeros(1, 1, 1, 1), noise, torch.tensor([10])) is noise
