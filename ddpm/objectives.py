"""What the network predicts, and how to turn its output back into (x_0, eps).

``eps``: the noise (Ho et al. 2020). ``v``: alpha * eps - sigma * x_0
(Salimans & Ho 2022, "Progressive Distillation", sec. 4). ``x0``: the clean image.
Here alpha = sqrt(alpha_bar_t) and sigma = sqrt(1 - alpha_bar_t).
"""

from __future__ import annotations

import torch

from ddpm.config import OBJECTIVES


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def training_target(objective: str, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The regression target for one batch; ``alpha_bar`` broadcastable (B, 1, 1, 1)."""
    _check(objective)
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def to_x0_eps(objective: str, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output -> (predicted x_0, predicted eps), using x_t = alpha x_0 + sigma eps."""
    _check(objective)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if objective == "eps":
        return (x_t - sigma * output) / alpha, output
    if objective == "x0":
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output


def loss_weight(objective: str, snr: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, eq. 7) per sample, shape (B,); gamma 0 -> ones.

    The weight min(SNR, gamma) applies to the x_0 loss; expressed in each objective's
    own loss it becomes min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    _check(objective)
    if min_snr_gamma <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=min_snr_gamma)
    if objective == "eps":
        return clipped / snr
    if objective == "x0":
        return clipped
    return clipped / (snr + 1)
