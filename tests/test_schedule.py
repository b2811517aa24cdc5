import math

import pytest
import torch

from ddpm.schedule import NoiseSchedule

# alpha_bar_t (t = 0..T-1, the paper's 1..T), computed once from this code and checked by hand where a closed
# form exists (linear: alpha_bar_0 = 1 - beta_0; cosine: f(t+1)/f(0) below). A change here changes every model.
GOLDEN = {
    ("linear", 1000): {0: 0.9999, 1: 0.9997800920720721, 250: 0.5214230306185275, 500: 0.07779665836502389,
                       999: 4.0358297653756754e-05},
    ("linear", 50): {0: 0.998, 10: 0.6169446144842399, 25: 0.05492151159660928, 49: 7.744765699226731e-06},
    ("cosine", 1000): {0: 0.999958715775178, 1: 0.9999125759273678, 250: 0.8458879864968829,
                       500: 0.4922851724488026, 999: 2.4287669070348542e-09},
    ("cosine", 10): {0: 0.972092737113969, 1: 0.8987059205995089, 5: 0.3408096397593241, 9: 2.4091724140085884e-05},
    ("sigmoid", 1000): {0: 0.9996997208025897, 1: 0.9993978073713092, 250: 0.8498630103525684,
                        500: 0.4983428217896729, 999: 3.002869867999664e-07},
    ("sigmoid", 10): {0: 0.9605072175812485, 1: 0.8956798617163835, 5: 0.33908017169627835,
                      9: 3.949279020814134e-05},
}
CASES = sorted(GOLDEN)


@pytest.mark.parametrize("name,T", CASES)
def test_alpha_bar_golden_values(name, T):
    ab = NoiseSchedule.from_name(name, T).alpha_bar
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    for t, expected in GOLDEN[name, T].items():
        assert float(ab[t]) == pytest.approx(expected, rel=1e-6), f"{name} T={T} t={t}"


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_matches_its_closed_form_away_from_the_clamp(T):
    """Nichol & Dhariwal 2021, eq. 17, evaluated independently: alpha_bar_t = f(t+1) / f(0)."""
    s = 0.008
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = NoiseSchedule.from_name("cosine", T).alpha_bar
    for t in range(T - 1):  # the last beta is clamped at 0.999
        assert float(ab[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)


@pytest.mark.parametrize("name,T", CASES)
def test_alpha_bar_is_decreasing_inside_the_unit_interval(name, T):
    s = NoiseSchedule.from_name(name, T)
    assert bool(((s.alpha_bar > 0) & (s.alpha_bar < 1)).all())
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert torch.allclose(s.alpha_bar, torch.cumprod(1 - s.betas, 0), rtol=1e-12, atol=0)
    assert float(s.alpha_bar_prev[0]) == 1.0 and torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])


@pytest.mark.parametrize("name,T", CASES)
def test_posterior_is_the_gaussian_conditional_of_the_forward_process(name, T):
    """q(x_{t-1} | x_t, x_0) from the joint of x_{t-1} ~ q(x_{t-1}|x_0) and x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z.

    Means and variances of the marginals come from ``q_sample`` itself (zero noise -> mean, zero x_0 and
    unit noise -> std), the cross-covariance from one forward step: sqrt(alpha_t) Var(x_{t-1}).
    """
    s = NoiseSchedule.from_name(name, T)
    t = torch.arange(T)
    x0 = torch.linspace(-1, 1, T, dtype=torch.float64).view(T, 1, 1, 1)
    x_t = torch.linspace(2, -2, T, dtype=torch.float64).view(T, 1, 1, 1)
    zero, one = torch.zeros_like(x0), torch.ones_like(x0)
    mean_t, std_t = s.q_sample(x0, t, zero), s.q_sample(zero, t, one)
    prev = (t - 1).clamp(min=0)
    mean_prev = torch.where(t.view(-1, 1, 1, 1) > 0, s.q_sample(x0, prev, zero), x0)  # x_{-1} is x_0
    var_prev = torch.where(t.view(-1, 1, 1, 1) > 0, s.q_sample(zero, prev, one) ** 2, zero)
    cov = s.at(s.alphas, t, x0).sqrt() * var_prev
    expected_mean = mean_prev + cov / std_t**2 * (x_t - mean_t)
    expected_var = var_prev - cov**2 / std_t**2

    mean, var = s.posterior(x0, x_t, t)
    assert mean.shape == var.shape == (T, 1, 1, 1)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-9, atol=1e-12)
    assert float(var[0]) == 0.0 and torch.allclose(mean[0], x0[0])  # t=0 lands on x_0 exactly


@pytest.mark.parametrize("t", [1, 5, 9])
def test_forward_then_posterior_reproduces_the_forward_chain(t):
    """Monte Carlo: draw x_t with q_sample, then x_{t-1} from the posterior. The pair must look like the forward
    chain: x_{t-1} ~ N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}) and x_t - sqrt(alpha_t) x_{t-1} ~ N(0, beta_t),
    independent of x_{t-1}. 200k samples: standard errors ~0.003 on variances, tolerance 0.01."""
    s = NoiseSchedule.from_name("cosine", 10)
    g = torch.Generator().manual_seed(0)
    n, x0_value = 200_000, 0.6
    x0 = torch.full((n, 1, 1, 1), x0_value, dtype=torch.float64)
    tt = torch.full((n,), t)
    x_t = s.q_sample(x0, tt, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    mean, var = s.posterior(x0, x_t, tt)
    x_prev = mean + var.sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)

    ab_prev, alpha, beta = float(s.alpha_bar[t - 1]), float(s.alphas[t]), float(s.betas[t])
    assert float(x_prev.mean()) == pytest.approx(math.sqrt(ab_prev) * x0_value, abs=0.01)
    assert float(x_prev.var()) == pytest.approx(1 - ab_prev, abs=0.01)
    step_noise = x_t - math.sqrt(alpha) * x_prev
    assert float(step_noise.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(step_noise.var()) == pytest.approx(beta, abs=0.01)
    corr = torch.corrcoef(torch.stack([step_noise.flatten(), x_prev.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.01


@pytest.mark.parametrize("name,T", CASES)
def test_snr_is_alpha_bar_over_one_minus_alpha_bar(name, T):
    s = NoiseSchedule.from_name(name, T)
    t = torch.arange(T)
    snr = s.snr(t)
    assert snr.dtype == torch.float64 and snr.shape == (T,)
    torch.testing.assert_close(snr, s.alpha_bar / (1 - s.alpha_bar), rtol=1e-12, atol=0)
    assert bool((snr[1:] < snr[:-1]).all())


def test_snr_golden_value():
    s = NoiseSchedule.from_name("cosine", 1000)
    ab = GOLDEN["cosine", 1000][500]
    assert float(s.snr(torch.tensor([500]))[0]) == pytest.approx(ab / (1 - ab), rel=1e-9)
    assert float(s.snr(torch.tensor([500]))[0]) == pytest.approx(0.969608, rel=1e-5)


def test_q_sample_shape_and_value():
    s = NoiseSchedule.from_name("cosine", 10)
    x0 = torch.full((2, 3, 4, 4), 0.5)
    noise = torch.full((2, 3, 4, 4), -1.0)
    x_t = s.q_sample(x0, torch.tensor([0, 9]), noise)
    assert x_t.shape == x0.shape and x_t.dtype == torch.float32
    for i, t in enumerate((0, 9)):
        ab = GOLDEN["cosine", 10][t]
        assert float(x_t[i, 0, 0, 0]) == pytest.approx(math.sqrt(ab) * 0.5 - math.sqrt(1 - ab), rel=1e-6)


def test_unknown_schedule_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'quadratic'.*linear, cosine, sigmoid"):
        NoiseSchedule.from_name("quadratic", 1000)


def test_too_few_timesteps_is_an_error():
    with pytest.raises(ValueError, match="timesteps=1"):
        NoiseSchedule.from_name("cosine", 1)


def test_linear_schedule_with_tiny_T_says_why():
    # rescaled to T=10 the last beta would be 2.0: say so rather than fail on an out-of-range beta
    with pytest.raises(ValueError, match=r"linear schedule needs timesteps > 20, got 10"):
        NoiseSchedule.from_name("linear", 10)
    assert NoiseSchedule.from_name("linear", 21).T == 21


def test_betas_outside_unit_interval_are_rejected():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_rescaling(name):
    """Lin et al. 2024, alg. 1: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its first value."""
    plain = NoiseSchedule.from_name(name, 1000)
    zt = NoiseSchedule.from_name(name, 1000, zero_terminal_snr=True)
    assert float(zt.alpha_bar[-1]) == 0.0 and float(zt.betas[-1]) == 1.0 and float(zt.snr(torch.tensor([999]))) == 0
    assert float(zt.alpha_bar[0]) == pytest.approx(float(plain.alpha_bar[0]), rel=1e-12)
    assert bool((zt.alpha_bar[1:] < zt.alpha_bar[:-1]).all())
    s, s0, sT = plain.alpha_bar.sqrt(), plain.alpha_bar[0].sqrt(), plain.alpha_bar[-1].sqrt()
    t = torch.tensor([1, 250, 500, 998])
    assert torch.allclose(zt.alpha_bar[t].sqrt(), (s[t] - sT) * s0 / (s0 - sT), rtol=1e-12)


def test_zero_terminal_snr_golden_values():
    """Linear T=1000 rescaled; the same values as diffusers' rescale_zero_terminal_snr (checked once, 2e-16)."""
    ab = NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True).alpha_bar
    assert float(ab[499]) == pytest.approx(0.07602875054711475, rel=1e-9)
    assert float(ab[998]) == pytest.approx(4.2132624650880725e-09, rel=1e-6)


def test_only_the_last_beta_may_be_one():
    betas = torch.full((10,), 0.1, dtype=torch.float64)
    betas[3] = 1.0
    with pytest.raises(ValueError, match="the last in"):
        NoiseSchedule(betas)
