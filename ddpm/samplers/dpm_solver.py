"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2), data prediction, multistep.

In log-SNR time lambda = log(alpha / sigma), with alpha = sqrt(alpha_bar) and
sigma = sqrt(1 - alpha_bar). The last step is first order and lands on x_0.
"""

from __future__ import annotations

import math

import torch

from ddpm.samplers.common import Denoiser, initial_noise, predict, progress_iter, timesteps
from ddpm.schedule import NoiseSchedule

_MIN_ALPHA_BAR = 2.0**-24


@torch.no_grad()
def dpm_solver_pp_2m_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...],
                            generator: torch.Generator, steps: int = 20, objective: str = "eps",
                            timestep_spacing: str = "trailing", clip_x0: bool = False,
                            device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample (B, C, H, W) in ``steps`` network evaluations (10-25 is its intended range)."""
    ts = timesteps(schedule.T, steps, timestep_spacing)
    x = initial_noise(shape, generator, device)

    def coeffs(t: int) -> tuple[float, float, float]:
        # a zero-terminal-SNR schedule has alpha_bar_T = 0, lambda = -inf: take 2^-24 there, as diffusers does
        ab = float(schedule.alpha_bar[t]) or _MIN_ALPHA_BAR
        alpha, sigma = math.sqrt(ab), math.sqrt(1 - ab)
        return alpha, sigma, math.log(alpha / sigma)

    x0_prev, h_prev = None, None
    for i, t in enumerate(progress_iter(ts, progress, "dpm_solver++")):
        x0, _ = predict(model, schedule, objective, x, t, clip_x0)
        if i + 1 == len(ts):
            x = x0  # sigma -> 0: the solution at lambda = +inf is the data prediction
            break
        _, sigma_s, lam_s = coeffs(t)
        alpha_t, sigma_t, lam_t = coeffs(ts[i + 1])
        h = lam_t - lam_s
        if x0_prev is None:
            d = x0  # first step: first order (DPM-Solver++(1), the same update as DDIM)
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # algorithm 2, line 5
        x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x
