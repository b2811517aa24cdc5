"""Everything a training run carries from step to step, and its round trip through a checkpoint.

A checkpoint holds the raw and EMA weights, the optimizer moments, both RNG
states, the data position and the loss window, so a resumed run continues
bitwise as if never stopped (on the same device and precision).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm.export import load_state_checked
from ddpm.unet import UNet


@dataclass
class TrainState:
    model: UNet
    ema: UNet
    opt: torch.optim.Optimizer
    generator: torch.Generator  # timesteps, noise and flips, on the training device
    device: torch.device
    precision: str  # "fp32" or "bf16", as resolved on this device
    step: int = 0
    epoch: int = 0
    pos: int = 0  # offset into the epoch's permutation
    history: list[dict[str, float]] = field(default_factory=list)  # one record per log line
    window_loss: torch.Tensor | None = None  # sum of step losses since the last log line, on the device
    window_n: int = 0

    def __post_init__(self) -> None:
        if self.window_loss is None:
            self.window_loss = torch.zeros((), dtype=_sum_dtype(self.device), device=self.device)


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    return tensors, sd["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def to_checkpoint(s: TrainState, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) for ``checkpoint.save``; reads the loss window once (a device sync)."""
    opt_tensors, groups = _optimizer_tensors(s.opt)
    tensors = {**{f"model.{k}": v for k, v in s.model.state_dict().items()},
               **{f"ema.{k}": v for k, v in s.ema.state_dict().items()}, **opt_tensors,
               "rng.torch": torch.get_rng_state(), "rng.train": s.generator.get_state()}
    if s.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(s.device)  # dropout draws from the default CUDA generator
    meta = {"step": s.step, "epoch": s.epoch, "pos": s.pos, "history": list(s.history),
            "window_loss": float(s.window_loss), "window_n": s.window_n, "optim_groups": groups,
            "fingerprint": fingerprint, "device": s.device.type, "precision": s.precision}
    return tensors, meta


def restore(s: TrainState, tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    """Load a checkpoint into ``s``. One written on another device or precision still loads,
    with a warning: training continues, but not bitwise as the original run would have."""
    was = (meta.get("device", "cpu"), meta.get("precision", "fp32"))
    if was != (s.device.type, s.precision):
        warnings.warn(f"checkpoint {path} was written on {was[0]} with {was[1]}; resuming on {s.device.type} with "
                      f"{s.precision}. Training continues from step {meta['step']}, but the result will not be "
                      f"bitwise what the original run would have given (set train.device / train.mixed_precision "
                      f"to {was[0]} / {was[1]} to match it)", stacklevel=3)
    load_state_checked(s.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
    load_state_checked(s.ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, str(path))
    _restore_optimizer(s.opt, tensors, meta["optim_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    if s.generator.device.type == was[0]:  # a generator state only fits a generator of the same device type
        s.generator.set_state(tensors["rng.train"])
    if s.device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], s.device)
    s.step, s.epoch, s.pos, s.history = meta["step"], meta["epoch"], meta["pos"], list(meta["history"])
    s.window_loss = torch.tensor(meta.get("window_loss", 0.0), dtype=_sum_dtype(s.device), device=s.device)
    s.window_n = meta.get("window_n", 0)
