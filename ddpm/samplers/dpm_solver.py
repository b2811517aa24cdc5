"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2), data prediction, multistep, and its
stochastic twin DPM-Solver++(2M) SDE (the same paper's SDE solver for data prediction, eq. 9 and the
"midpoint" second-order correction; diffusers' ``algorithm_type="sde-dpmsolver++"``).

In log-SNR time lambda = log(alpha / sigma), with alpha = sqrt(alpha_bar) and
sigma = sqrt(1 - alpha_bar). The last step is first order and lands on x_0.
"""

from __future__ import annotations

import math

import torch

from ddpm.samplers.common import Denoiser, initial_noise, noise_like, predict, progress_iter, timesteps
from ddpm.schedule import NoiseSchedule

_MIN_ALPHA_BAR = 2.0**-24


def alpha_sigma_lambda(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t); a zero-terminal-SNR schedule has alpha_bar_T = 0, lambda = -inf:
    take 2^-24 there, as diffusers does."""
    ab = float(schedule.alpha_bar[t]) or _MIN_ALPHA_BAR
    alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
    return alpha, sigma, math.log(alpha / sigma)


@torch.no_grad()
def dpm_solver_pp_2m_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...],
                            generator: torch.Generator, steps: int = 20, objective: str = "eps",
                            timestep_spacing: str = "trailing", clip_x0: bool = False,
                            device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample (B, C, H, W) in ``steps`` network evaluations (10-25 is its intended range)."""
    ts = timesteps(schedule.T, steps, timestep_spacing, schedule.alpha_bar)
    x = initial_noise(shape, generator, device)
    x0_prev, h_prev = None, None
    for i, t in enumerate(progress_iter(ts, progress, "dpm_solver++")):
        x0, _ = predict(model, schedule, objective, x, t, clip_x0)
        if i + 1 == len(ts):
            x = x0  # sigma -> 0: the solution at lambda = +inf is the data prediction
            break
        _, sigma_s, lam_s = alpha_sigma_lambda(schedule, t)
        alpha_t, sigma_t, lam_t = alpha_sigma_lambda(schedule, ts[i + 1])
        h = lam_t - lam_s
        if x0_prev is None:
            d = x0  # first step: first order (DPM-Solver++(1), the same update as DDIM)
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # algorithm 2, line 5
        x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def dpm_solver_pp_2m_sde_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...],
                                generator: torch.Generator, steps: int = 20, objective: str = "eps",
                                timestep_spacing: str = "trailing", clip_x0: bool = False,
                                device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample (B, C, H, W) in ``steps`` network evaluations. Each step integrates the reverse SDE: it
    injects fresh noise as ancestral DDPM does, which forgives an imperfect denoiser's errors, with the
    multistep second-order data term of DPM-Solver++(2M). Per step from s to t, h = lambda_t - lambda_s:

        x_t = sigma_t / sigma_s * e^-h * x_s + alpha_t * (1 - e^-2h) * (D0 + D1 / 2)
              + sigma_t * sqrt(1 - e^-2h) * z,        D0 = x0_s,  D1 = (x0_s - x0_prev) * h / h_prev
    """
    ts = timesteps(schedule.T, steps, timestep_spacing, schedule.alpha_bar)
    x = initial_noise(shape, generator, device)
    x0_prev, h_prev = None, None
    for i, t in enumerate(progress_iter(ts, progress, "dpm_solver++_sde")):
        x0, _ = predict(model, schedule, objective, x, t, clip_x0)
        if i + 1 == len(ts):
            x = x0  # sigma -> 0: no noise left to add, the data prediction is the sample
            break
        _, sigma_s, lam_s = alpha_sigma_lambda(schedule, t)
        alpha_t, sigma_t, lam_t = alpha_sigma_lambda(schedule, ts[i + 1])
        h = lam_t - lam_s
        d = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev) * (x0 - x0_prev)  # first step: first order
        x = ((sigma_t / sigma_s) * math.exp(-h)) * x - (alpha_t * math.expm1(-2 * h)) * d \
            + (sigma_t * math.sqrt(-math.expm1(-2 * h))) * noise_like(x, generator)
        x0_prev, h_prev = x0, h
    return x
