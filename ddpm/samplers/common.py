"""Pieces every sampler shares: the timestep subsequence and the denoiser call."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ddpm.config import TIMESTEP_SPACINGS
from ddpm.objectives import to_x0_eps
from ddpm.schedule import NoiseSchedule

# model(x_t (B, C, H, W), t (B,) long) -> network output (B, C, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(T: int, steps: int, spacing: str, alpha_bar: torch.Tensor | None = None) -> list[int]:
    """Descending timesteps to visit. ``leading``, ``linspace``, ``trailing``: Lin et al. 2024 ("Common
    Diffusion Noise Schedules and Sample Steps are Flawed"), table 2. ``logsnr`` and ``karras`` need the
    schedule's ``alpha_bar`` (T,): from T-1 down to 0, evenly in log-SNR (Lu et al. 2022, DPM-Solver, sec.
    3.3) or in sigma^(1/7) (Karras et al. 2022, EDM, eq. 5), which puts more steps at low noise; both grids
    start at sigma = 80 (EDM's sigma_max) where the schedule reaches beyond it."""
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
    elif spacing in ("logsnr", "karras"):
        if alpha_bar is None or len(alpha_bar) != T:
            raise ValueError(f"timestep_spacing {spacing!r} needs the schedule's alpha_bar of length T={T}")
        return _noise_level_spacing(alpha_bar, steps, spacing)
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return sorted({int(t) for t in ts}, reverse=True)


KARRAS_RHO = 7.0  # Karras et al. 2022, sec. 3: rho = 7 for their sampler
# Karras et al. 2022, table 1: sigma_max = 80. The cosine schedule's last step has sigma ~2e4 (beta clipped at
# 0.999): a karras grid from there would spend 11 of 20 steps above t = 988, where x_t is still pure noise.
SIGMA_MAX = 80.0


def _noise_level_spacing(alpha_bar: torch.Tensor, steps: int, spacing: str) -> list[int]:
    """``steps`` distinct timesteps from T-1 to 0 whose noise levels are closest to an even grid in log-SNR
    (``logsnr``) or in sigma^(1/rho) (``karras``), with sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    T = len(alpha_bar)
    ab = alpha_bar.detach().to("cpu", torch.float64).clamp(2.0**-24, 1 - 1e-12)  # alpha_bar_T = 0: as the solvers do
    log_sigma = 0.5 * (torch.log1p(-ab) - torch.log(ab))  # = -lambda, increasing in t
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    hi, lo = min(float(log_sigma[-1]), math.log(SIGMA_MAX)), float(log_sigma[0])
    if spacing == "logsnr":
        targets = hi + u * (lo - hi)
    else:
        s_max, s_min = math.exp(hi / KARRAS_RHO), math.exp(lo / KARRAS_RHO)
        targets = KARRAS_RHO * torch.log(s_max + u * (s_min - s_max))
    nearest = (log_sigma[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    # keep the count: where two targets round to one timestep, take the next free one below it, but leave
    # room for the remaining steps above 0
    ts = [T - 1]  # the first step starts from pure noise wherever the grid starts
    for i, t in enumerate(nearest[1:], start=1):
        ts.append(max(min(t, ts[-1] - 1), steps - 1 - i))
    return ts


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
