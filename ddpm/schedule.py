"""Discrete-time noise schedules and the Gaussian forward process.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
(arXiv:2006.11239): ``beta_t``, ``alpha_t = 1 - beta_t``,
``alpha_bar_t = prod_{s<=t} alpha_s``, with t in 0..T-1 (the paper's 1..T).
"""

from __future__ import annotations

import copy
import math

import torch

from ddpm.config import SCHEDULES

_MAX_BETA = 0.999  # Nichol & Dhariwal 2021, sec. 3.2: avoid singularities near t = T


def linear_betas(T: int) -> torch.Tensor:
    """Ho et al. 2020, sec. 4: beta from 1e-4 to 0.02 over T=1000, rescaled for other T (T > 20)."""
    if T <= 20:
        # the rescaled last beta, 20 / T, must stay below 1
        raise ValueError(f"the linear schedule needs timesteps > 20, got {T}; use cosine or sigmoid for fewer steps")
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def _betas_from_alpha_bar(alpha_bar_fn, T: int) -> torch.Tensor:
    t = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar_fn(t)
    ab = ab / ab[0]
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=_MAX_BETA)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    return _betas_from_alpha_bar(lambda t: torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2, T)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022 (RIN), alg. 1: alpha_bar from a scaled sigmoid over [start, end]."""
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    return _betas_from_alpha_bar(
        lambda t: (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start), T
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", alg. 1.

    Shift sqrt(alpha_bar) so that its last value is 0 and scale it so that its first value is unchanged,
    so alpha_bar_T = 0 and beta_T = 1: the last training step sees pure noise, as sampling starts from.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    ab = ((sqrt_ab - last) * first / (first - last)) ** 2
    return 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


class NoiseSchedule:
    """beta, alpha, alpha_bar as float64 CPU tensors of shape (T,)."""

    def __init__(self, betas: torch.Tensor):
        # beta_T = 1 (alpha_bar_T = 0) is a zero-terminal-SNR schedule; every other beta is in (0, 1)
        if betas.ndim != 1 or not bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) or not 0 < betas[-1] <= 1:
            raise ValueError("betas must be a 1-d tensor with values in (0, 1), the last in (0, 1]")
        self.betas = betas.to(torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (x_0 is clean)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same tables on ``device`` (moved, not recomputed), so training indexes them there."""
        moved = copy.copy(self)
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        for name in ("betas", "alphas", "alpha_bar", "alpha_bar_prev"):
            setattr(moved, name, getattr(self, name).to(device, dtype))
        return moved

    @property
    def T(self) -> int:
        return len(self.betas)

    @classmethod
    def from_name(cls, name: str, timesteps: int, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """``zero_terminal_snr``: rescaled by :func:`rescale_zero_terminal_snr` (for the v or x0 objective)."""
        if timesteps < 2:
            raise ValueError(f"timesteps={timesteps} must be at least 2")
        makers = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        betas = makers[name](timesteps)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather ``values[t]`` for a batch of timesteps t (B,), shaped (B, 1, 1, 1) like ``like``."""
        out = values.to(t.device)[t].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.  x0, noise: (B, C, H, W); t: (B,)."""
        ab = self.at(self.alpha_bar, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
        ab, ab_prev = self.at(self.alpha_bar, t, x0), self.at(self.alpha_bar_prev, t, x0)
        beta, alpha = self.at(self.betas, t, x0), self.at(self.alphas, t, x0)
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
        variance = (1 - ab_prev) / (1 - ab) * beta
        return mean, variance

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021), float64 (B,)."""
        ab = self.alpha_bar.to(t.device)[t]
        return ab / (1 - ab)
