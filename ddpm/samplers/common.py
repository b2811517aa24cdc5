"""Pieces every sampler shares: the timestep subsequence and the denoiser call."""

from __future__ import annotations

from typing import Callable

import torch

from ddpm.config import TIMESTEP_SPACINGS
from ddpm.objectives import to_x0_eps
from ddpm.schedule import NoiseSchedule

# model(x_t (B, C, H, W), t (B,) long) -> network output (B, C, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(T: int, steps: int, spacing: str) -> list[int]:
    """Descending timesteps to visit, as in Lin et al. 2024 ("Common Diffusion Noise
    Schedules and Sample Steps are Flawed"), table 2: ``leading``, ``linspace``, ``trailing``."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps={steps} must be between 1 and the schedule's T={T}")
    if spacing == "leading":
        ts = torch.arange(steps) * (T // steps)
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, steps).round().long()
    elif spacing == "trailing":
        # k * T / steps for k = steps..1, in float64 so ties round exactly; a float arange(T, 0, -T/steps)
        # can yield one element too many (near 0), which became timestep -1.
        ts = (torch.arange(steps, 0, -1, dtype=torch.float64) * T / steps).round().long() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return sorted({int(t) for t in ts}, reverse=True)


def initial_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """x_T ~ N(0, I), drawn on the generator's device so results do not depend on ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


@torch.no_grad()
def predict(model: Denoiser, schedule: NoiseSchedule, objective: str, x_t: torch.Tensor, t: int,
            clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the network at integer timestep t and return (x0_hat, eps_hat), both (B, C, H, W)."""
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out = model(x_t, tt).to(x_t.dtype)
    ab = torch.as_tensor(float(schedule.alpha_bar[t]), dtype=x_t.dtype, device=x_t.device)
    x0, eps = to_x0_eps(objective, out, x_t, ab)
    if clip_x0:
        # Keep x0 in the data range and recompute eps so both stay consistent with x_t.
        x0 = x0.clamp(-1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return x0, eps


def progress_iter(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="step", leave=False)
