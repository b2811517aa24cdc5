"""Ancestral DDPM sampling (Ho et al. 2020, algorithm 2), on any timestep subsequence.

With fewer steps than T the process is respaced (Nichol & Dhariwal 2021,
sec. 4): each visited pair (t, s) uses beta = 1 - alpha_bar_t / alpha_bar_s.
"""

from __future__ import annotations

import torch

from ddpm.samplers.common import Denoiser, initial_noise, noise_like, predict, progress_iter, timesteps
from ddpm.schedule import NoiseSchedule


@torch.no_grad()
def ddpm_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], generator: torch.Generator,
                steps: int | None = None, objective: str = "eps", timestep_spacing: str = "leading",
                clip_x0: bool = False, device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample (B, C, H, W); ``steps=None`` runs all T steps of algorithm 2."""
    ts = timesteps(schedule.T, schedule.T if steps is None else steps, timestep_spacing, schedule.alpha_bar)
    x = initial_noise(shape, generator, device)
    for i, t in enumerate(progress_iter(ts, progress, "ddpm")):
        ab_t = float(schedule.alpha_bar[t])
        ab_prev = float(schedule.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        beta = 1 - ab_t / ab_prev
        x0, _ = predict(model, schedule, objective, x, t, clip_x0)
        # eq. 7: posterior mean from x0_hat and x_t, variance beta_tilde
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        if i + 1 < len(ts):
            x = mean + ((1 - ab_prev) / (1 - ab_t) * beta) ** 0.5 * noise_like(x, generator)
        else:
            x = mean  # algorithm 2, line 4: no noise at the last step
    return x
