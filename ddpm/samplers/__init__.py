"""Samplers: pure functions of (model, schedule, shape, generator, steps)."""

from __future__ import annotations

import torch

from ddpm.config import SAMPLERS
from ddpm.samplers.common import Denoiser, timesteps
from ddpm.samplers.ddim import ddim_sample
from ddpm.samplers.ddpm import ddpm_sample
from ddpm.samplers.dpm_solver import dpm_solver_pp_2m_sample, dpm_solver_pp_2m_sde_sample
from ddpm.schedule import NoiseSchedule

__all__ = ["sample", "ddim_sample", "ddpm_sample", "dpm_solver_pp_2m_sample", "dpm_solver_pp_2m_sde_sample", "timesteps", "Denoiser"]


def sample(name: str, model: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...], generator: torch.Generator,
           steps: int, objective: str = "eps", eta: float = 0.0, timestep_spacing: str = "trailing",
           clip_x0: bool = False, device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Dispatch to one sampler by its params.yaml name."""
    common = dict(objective=objective, timestep_spacing=timestep_spacing, clip_x0=clip_x0, device=device,
                  progress=progress)
    if name == "ddim":
        return ddim_sample(model, schedule, shape, generator, steps=steps, eta=eta, **common)
    elif name == "ddpm":
        return ddpm_sample(model, schedule, shape, generator, steps=steps, **common)
    elif name == "dpm_solver++":
        return dpm_solver_pp_2m_sample(model, schedule, shape, generator, steps=steps, **common)
    elif name == "dpm_solver++_sde":
        return dpm_solver_pp_2m_sde_sample(model, schedule, shape, generator, steps=steps, **common)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
