"""The trained model as users load it: EMA weights plus what is needed to rebuild it.

``model.safetensors`` metadata records the UNet's constructor arguments and
the diffusion settings, so ``load_model`` needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm import checkpoint
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet

FORMAT = "ddpm-unet/1"


@dataclass
class LoadedModel:
    unet: UNet
    schedule: NoiseSchedule
    objective: str
    meta: dict[str, Any]


def save_model(path: str | Path, unet: UNet, schedule_name: str, timesteps: int, objective: str,
               extra: dict[str, Any] | None = None, zero_terminal_snr: bool = False) -> None:
    meta = {"format": FORMAT, "unet": unet.config,
            "diffusion": {"schedule": schedule_name, "timesteps": timesteps, "objective": objective,
                          "zero_terminal_snr": zero_terminal_snr},
            **(extra or {})}
    checkpoint.save(path, dict(unet.state_dict()), meta)


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that says what differs instead of a wall of keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model)")
        raise checkpoint.CheckpointError(
            f"{source} was saved from a different architecture: {'; '.join(parts)}")
    module.load_state_dict(state)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    tensors, meta = checkpoint.load(path)
    if meta.get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a {FORMAT} model file (format {meta.get('format')!r})")
    cfg = dict(meta["unet"])
    unet = UNet(**{**cfg, "channel_mults": tuple(cfg["channel_mults"]),
                   "attention_resolutions": tuple(cfg["attention_resolutions"])})
    load_state_checked(unet, tensors, str(path))
    d = meta["diffusion"]
    return LoadedModel(unet.to(device).eval(), NoiseSchedule.from_name(d["schedule"], d["timesteps"],
                                                                    d.get("zero_terminal_snr", False)),
                       d["objective"], meta)
