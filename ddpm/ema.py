"""Exponential moving average of the weights (the model that samples).

The decay per step comes from a half-life in steps (Karras et al. 2022, EDM,
``training/training_loop.py``), so the averaging window does not depend on the
batch size; early in training the half-life ramps up with the step count.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(step: int, halflife_steps: float, rampup_ratio: float) -> float:
    """EMA decay for ``step``: 0.5 ** (1 / halflife), halflife = min(halflife_steps, rampup_ratio * step)."""
    halflife = halflife_steps
    if rampup_ratio > 0:
        halflife = min(halflife, step * rampup_ratio)
    return 0.5 ** (1 / halflife) if halflife > 0 else 0.0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, for every parameter, in one multi-tensor kernel per dtype."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)
