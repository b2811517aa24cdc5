"""Samplers against an exact answer: data N(MU, S^2) per pixel, whose optimal denoiser is closed form.

For x_t = a x_0 + sig eps with a = sqrt(alpha_bar_t), sig = sqrt(1 - alpha_bar_t):
E[x_0 | x_t] = MU + a S^2 / (a^2 S^2 + sig^2) (x_t - a MU). With that denoiser a correct sampler returns
samples of N(MU, S^2), up to its own discretisation error and Monte-Carlo error.
"""

import math

import pytest
import torch

from ddpm.samplers import (ddim_sample, ddpm_sample, dpm_solver_pp_2m_sample, dpm_solver_pp_2m_sde_sample, sample,
                           timesteps)
from ddpm.schedule import NoiseSchedule

MU, S = 0.3, 0.5
N_IMAGES = 2000  # of 1x2x2: 8000 independent pixels
N = N_IMAGES * 4
# 4 standard errors: mean S/sqrt(N) = 0.0056, std S/sqrt(2N) = 0.0040
MEAN_TOL = 0.025
STD_MC_TOL = 0.016


def gaussian_denoiser(schedule: NoiseSchedule, objective: str = "eps", mu: float = MU, s: float = S):
    """model(x_t, t) -> the optimal network output for data N(mu, s^2), in the given objective."""
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = schedule.alpha_bar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        x0 = mu + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / sig
        if objective == "eps":
            return eps
        if objective == "x0":
            return x0
        return a * eps - sig * x0  # v
    return model


@pytest.fixture(scope="module")
def cosine1000():
    return NoiseSchedule.from_name("cosine", 1000)


# (sampler, steps, eta, std_bias_budget). The budget is the sampler's own shortfall in std, measured once with
# 400k pixels (cosine T=1000): ddpm 1000 -0.003 (beta_tilde variance omits Var[x0|x_t]), ddpm 100 -0.018,
# ddim 50 -0.015, ddim 50 eta=1 -0.032, dpm_solver++ 10 -0.024, dpm_solver++ 20 -0.001,
# dpm_solver++_sde 10 -0.013, 20 +0.015, 50 +0.008; rounded up.
# The std tolerance is that budget plus 4 standard errors.
SAMPLER_CASES = [
    ("ddpm", 1000, 0.0, 0.005),
    ("ddpm", 100, 0.0, 0.02),
    ("ddim", 50, 0.0, 0.02),
    ("ddim", 50, 1.0, 0.035),
    ("dpm_solver++", 10, 0.0, 0.025),
    ("dpm_solver++", 20, 0.0, 0.005),
    ("dpm_solver++_sde", 20, 0.0, 0.02),
]


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("name,steps,eta,bias", SAMPLER_CASES, ids=[f"{c[0]}-{c[1]}-eta{c[2]:g}" for c in SAMPLER_CASES])
def test_sampler_reproduces_a_known_gaussian(cosine1000, name, steps, eta, bias, objective):
    x = sample(name, gaussian_denoiser(cosine1000, objective), cosine1000, (N_IMAGES, 1, 2, 2),
               torch.Generator().manual_seed(0), steps, objective=objective, eta=eta, clip_x0=False)
    assert x.shape == (N_IMAGES, 1, 2, 2) and bool(torch.isfinite(x).all())
    mean, std = float(x.mean()), float(x.std())
    assert abs(mean - MU) < MEAN_TOL, f"mean {mean:.4f}"
    assert abs(std - S) < bias + STD_MC_TOL, f"std {std:.4f}"


def test_tolerance_catches_a_visibly_wrong_sampler(cosine1000):
    """Negative control: 10 DDIM steps shrink the std by ~0.07 (measured 0.428), well outside any budget above."""
    x = sample("ddim", gaussian_denoiser(cosine1000), cosine1000, (N_IMAGES, 1, 2, 2),
               torch.Generator().manual_seed(0), 10, clip_x0=False)
    assert float(x.std()) < S - 0.035 - STD_MC_TOL
    assert float(x.std()) == pytest.approx(0.428, abs=STD_MC_TOL)


def test_wrong_denoiser_is_caught(cosine1000):
    """Negative control: a denoiser for N(0.4, 0.6^2) gives samples outside the tolerances."""
    x = sample("dpm_solver++", gaussian_denoiser(cosine1000, mu=0.4, s=0.6), cosine1000, (N_IMAGES, 1, 2, 2),
               torch.Generator().manual_seed(0), 20)
    assert abs(float(x.mean()) - MU) > MEAN_TOL and abs(float(x.std()) - S) > 0.005 + STD_MC_TOL


def test_two_ddim_steps_by_hand():
    """Eq. 12 of Song et al. with eta=0, written out for T=10 trailing, 2 steps (t = 9, then 4)."""
    s = NoiseSchedule.from_name("cosine", 10)
    model = gaussian_denoiser(s)
    z = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    x = ddim_sample(model, s, (3, 1, 2, 2), torch.Generator().manual_seed(7), steps=2)

    def x0_eps(x_t, t):
        eps = model(x_t, torch.full((3,), t))
        ab = float(s.alpha_bar[t])
        return (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab), eps

    x0, eps = x0_eps(z, 9)
    ab4 = float(s.alpha_bar[4])
    x4 = math.sqrt(ab4) * x0 + math.sqrt(1 - ab4) * eps
    expected, _ = x0_eps(x4, 4)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


def test_dpm_solver_first_step_is_ddim(cosine1000):
    """DPM-Solver++(2M) starts first order (= DDIM) and ends on x0_hat, so with 2 steps both samplers agree."""
    model = gaussian_denoiser(cosine1000)
    a = dpm_solver_pp_2m_sample(model, cosine1000, (4, 1, 2, 2), torch.Generator().manual_seed(3), steps=2)
    b = ddim_sample(model, cosine1000, (4, 1, 2, 2), torch.Generator().manual_seed(3), steps=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c = dpm_solver_pp_2m_sample(model, cosine1000, (4, 1, 2, 2), torch.Generator().manual_seed(3), steps=5)
    d = ddim_sample(model, cosine1000, (4, 1, 2, 2), torch.Generator().manual_seed(3), steps=5)
    assert not torch.allclose(c, d, atol=1e-4)  # the second-order correction is really applied


def test_dpm_solver_sde_steps_by_hand():
    """DPM-Solver++(2M) SDE for T=10 trailing, 3 steps (t = 9, 6, 2), written out: a first-order SDE step,
    a second-order one with the midpoint correction, then x0_hat. (The same three lines agree with diffusers'
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") to 3e-7 on a 10-step cosine-1000 run.)"""
    s = NoiseSchedule.from_name("cosine", 10)
    model = gaussian_denoiser(s)
    g = torch.Generator().manual_seed(7)
    z, n1, n2 = (torch.randn((3, 1, 2, 2), generator=g) for _ in range(3))
    x = dpm_solver_pp_2m_sde_sample(model, s, (3, 1, 2, 2), torch.Generator().manual_seed(7), steps=3)

    def x0_of(x_t, t):
        ab = float(s.alpha_bar[t])
        return (x_t - math.sqrt(1 - ab) * model(x_t, torch.full((3,), t))) / math.sqrt(ab)

    def asl(t):
        ab = float(s.alpha_bar[t])
        return math.sqrt(ab), math.sqrt(1 - ab), 0.5 * math.log(ab / (1 - ab))

    (_, s9, l9), (a6, s6, l6), (a2, s2, l2) = asl(9), asl(6), asl(2)
    h1, h2 = l6 - l9, l2 - l6
    m9 = x0_of(z, 9)
    x6 = s6 / s9 * math.exp(-h1) * z + a6 * (1 - math.exp(-2 * h1)) * m9 + s6 * math.sqrt(1 - math.exp(-2 * h1)) * n1
    m6 = x0_of(x6, 6)
    d = m6 + 0.5 * (h2 / h1) * (m6 - m9)
    x2 = s2 / s6 * math.exp(-h2) * x6 + a2 * (1 - math.exp(-2 * h2)) * d + s2 * math.sqrt(1 - math.exp(-2 * h2)) * n2
    torch.testing.assert_close(x, x0_of(x2, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm_solver++", 0.0),
                                      ("dpm_solver++_sde", 0.0)])
def test_samples_depend_only_on_the_generator(name, eta):
    s = NoiseSchedule.from_name("cosine", 10)
    model = gaussian_denoiser(s)

    def run(g):
        return sample(name, model, s, (2, 1, 4, 4), g, steps=5, eta=eta)

    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    first, second = run(g), run(g)  # one generator, two calls: the stream continues
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never touched
    g = torch.Generator().manual_seed(0)
    assert torch.equal(run(g), first) and torch.equal(run(g), second)  # reproduced from the same seed
    assert not torch.equal(first, second)
    assert not torch.equal(run(torch.Generator().manual_seed(1)), first)


def test_ddpm_full_T_visits_every_timestep():
    s = NoiseSchedule.from_name("cosine", 10)
    seen = []

    def model(x_t, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x_t)

    ddpm_sample(model, s, (1, 1, 2, 2), torch.Generator().manual_seed(0))
    assert seen == list(range(9, -1, -1))


def test_clip_x0_keeps_samples_in_range(cosine1000):
    model = gaussian_denoiser(cosine1000, mu=0.6, s=0.5)  # ~20% of this data lies above 1
    free = sample("ddim", model, cosine1000, (500, 1, 2, 2), torch.Generator().manual_seed(0), 20)
    clipped = sample("ddim", model, cosine1000, (500, 1, 2, 2), torch.Generator().manual_seed(0), 20, clip_x0=True)
    assert float(free.max()) > 1.2
    assert float(clipped.max()) <= 1.0 and float(clipped.min()) >= -1.0


@pytest.mark.parametrize("spacing,expected", [
    ("leading", [8, 6, 4, 2, 0]),
    ("linspace", [9, 7, 4, 2, 0]),
    ("trailing", [9, 7, 5, 3, 1]),
])
def test_timestep_spacings_at_T10_steps5(spacing, expected):
    assert timesteps(10, 5, spacing) == expected


def test_timestep_spacings_at_T1000():
    assert timesteps(1000, 4, "leading") == [750, 500, 250, 0]
    assert timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    assert timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))


def test_trailing_never_leaves_the_schedule():
    """Regression: a float arange(T, 0, -T/steps) yielded one extra step, timestep -1 (e.g. T=15, steps=13)."""
    assert timesteps(15, 13, "trailing") == [14, 13, 12, 11, 9, 8, 7, 6, 5, 4, 2, 1, 0]
    assert min(timesteps(1000, 61, "trailing")) == 15 and len(timesteps(1000, 61, "trailing")) == 61
    for T in range(2, 80):
        for steps in range(1, T + 1):
            for spacing in ("leading", "linspace", "trailing"):
                ts = timesteps(T, steps, spacing)
                assert len(ts) == steps and 0 <= min(ts) and max(ts) <= T - 1, (T, steps, spacing, ts)
            assert timesteps(T, steps, "trailing")[0] == T - 1


def test_noise_level_spacings_keep_the_count_and_the_ends():
    """logsnr and karras visit exactly ``steps`` distinct timesteps from T-1 to 0, even where several grid points
    round to one timestep (few T, or a zero-terminal-SNR schedule whose last log-SNR is -inf)."""
    for T in (2, 3, 7, 25, 60):
        for name in ("cosine", "linear") if T > 20 else ("cosine",):
            for ztsnr in (False, True):
                schedule = NoiseSchedule.from_name(name, T, zero_terminal_snr=ztsnr)
                for steps in range(1, T + 1):
                    for spacing in ("logsnr", "karras"):
                        ts = timesteps(T, steps, spacing, schedule.alpha_bar)
                        assert len(ts) == steps and ts == sorted(set(ts), reverse=True), (T, steps, spacing, ts)
                        assert ts[0] == T - 1 and (steps == 1 or ts[-1] == 0), (T, steps, spacing, ts)


def test_logsnr_spacing_is_even_in_log_snr():
    ab = NoiseSchedule.from_name("cosine", 1000).alpha_bar
    ts = timesteps(1000, 10, "logsnr", ab)
    lam = [0.5 * math.log(float(ab[t]) / (1 - float(ab[t]))) for t in ts]
    # the grid runs from sigma = 80 (lambda = -log 80) to t = 0 in 9 equal gaps (up to rounding to integer
    # timesteps); the first step leaves from T-1
    gap = (lam[-1] + math.log(80)) / 9
    assert all(abs((b - a) - gap) < 0.05 * gap for a, b in zip(lam[1:], lam[2:])), (gap, lam)
    assert lam[1] - lam[0] > 5 * gap  # from sigma ~2e4 (the clipped cosine schedule's last step)
    assert ts == [999, 976, 934, 818, 556, 249, 86, 25, 5, 0]


def test_karras_spacing_puts_more_steps_at_low_noise_than_trailing():
    ab = NoiseSchedule.from_name("cosine", 1000).alpha_bar
    karras = timesteps(1000, 20, "karras", ab)
    # below sigma ~0.09 (t = 50 on the cosine schedule): trailing takes its last step from t = 49 to x_0
    assert sum(t < 50 for t in karras) >= sum(t < 50 for t in timesteps(1000, 20, "trailing")) + 3
    assert timesteps(1000, 5, "karras", ab) == [999, 965, 802, 164, 0]


def test_noise_level_spacings_need_the_schedule():
    with pytest.raises(ValueError, match="'karras' needs the schedule's alpha_bar"):
        timesteps(10, 5, "karras")
    with pytest.raises(ValueError, match="'logsnr' needs the schedule's alpha_bar of length T=10"):
        timesteps(10, 5, "logsnr", NoiseSchedule.from_name("cosine", 20).alpha_bar)


def test_unknown_sampler_names_the_choices():
    s = NoiseSchedule.from_name("cosine", 10)
    with pytest.raises(ValueError, match=r"'euler'.*ddpm, ddim, dpm_solver\+\+"):
        sample("euler", gaussian_denoiser(s), s, (1, 1, 2, 2), torch.Generator(), 5)


def test_unknown_spacing_names_the_choices():
    with pytest.raises(ValueError, match=r"'even'.*leading, linspace, trailing"):
        timesteps(10, 5, "even")


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver++", "dpm_solver++_sde"])
@pytest.mark.parametrize("steps", [0, 11])
def test_steps_outside_1_to_T_is_an_error(name, steps):
    s = NoiseSchedule.from_name("cosine", 10)
    with pytest.raises(ValueError, match=rf"steps={steps} must be between 1 and the schedule's T=10"):
        sample(name, gaussian_denoiser(s), s, (1, 1, 2, 2), torch.Generator(), steps)


@pytest.mark.parametrize("objective", ["v", "x0"])
@pytest.mark.parametrize("name,steps,eta,bias", SAMPLER_CASES, ids=[f"{c[0]}-{c[1]}-eta{c[2]:g}" for c in SAMPLER_CASES])
def test_samplers_start_from_pure_noise_on_a_zero_terminal_snr_schedule(name, steps, eta, bias, objective):
    """alpha_bar_T = 0 exactly (Lin et al. 2024): every sampler's first step must stay finite and the
    samples must still follow the data, within the budgets measured on the plain cosine schedule. (On the
    linear schedule 10-50 steps fall short of the std by up to 0.1 with or without the rescaling.)"""
    zt = NoiseSchedule.from_name("cosine", 1000, zero_terminal_snr=True)
    assert float(zt.alpha_bar[-1]) == 0.0
    x = sample(name, gaussian_denoiser(zt, objective), zt, (N_IMAGES, 1, 2, 2),
               torch.Generator().manual_seed(0), steps, objective=objective, eta=eta, clip_x0=False)
    assert bool(torch.isfinite(x).all())
    mean, std = float(x.mean()), float(x.std())
    assert abs(mean - MU) < MEAN_TOL, f"mean {mean:.4f}"
    assert abs(std - S) < bias + STD_MC_TOL, f"std {std:.4f}"
