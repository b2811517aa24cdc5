"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12)."""

from __future__ import annotations

import torch

from ddpm.samplers.common import Denoiser, initial_noise, noise_like, predict, progress_iter, timesteps
from ddpm.schedule import NoiseSchedule


@torch.no_grad()
def ddim_sample(model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], generator: torch.Generator,
                steps: int = 50, objective: str = "eps", eta: float = 0.0, timestep_spacing: str = "trailing",
                clip_x0: bool = False, device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample (B, C, H, W) from x_T ~ N(0, I) in ``steps`` DDIM steps; eta=0 is deterministic."""
    ts = timesteps(schedule.T, steps, timestep_spacing, schedule.alpha_bar)
    x = initial_noise(shape, generator, device)
    for i, t in enumerate(progress_iter(ts, progress, "ddim")):
        ab_t = float(schedule.alpha_bar[t])
        ab_prev = float(schedule.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0  # last step lands on x_0
        x0, eps = predict(model, schedule, objective, x, t, clip_x0)
        # eq. 16: sigma_t(eta) interpolates deterministic DDIM (0) and DDPM-like (1)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        # eq. 12: predicted x_0, direction pointing to x_t, random noise
        x = ab_prev ** 0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise_like(x, generator)
    return x
