"""Pick the torch device and autocast precision a config asks for."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device; use device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device=mps was asked for but MPS is not available; use device=auto or cpu")
    return torch.device(name)


def cpu_has_bf16_matrix_units() -> bool:
    """Intel AMX (Sapphire Rapids and later): bf16 tiles that run convolutions and matmuls in bf16
    much faster than fp32 (1.6x-1.9x for this project's UNets on a 2-core machine, see
    benchmarks/results/train_speed_cpu.md). Without them bf16 autocast is no faster on a CPU."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. ``auto`` uses bf16 where it is fast: CUDA devices that support it, and
    CPUs with bf16 matrix units (AMX); fp32 elsewhere."""
    if precision == "fp32":
        return None
    supported = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
        (device.type == "cpu" and cpu_has_bf16_matrix_units())
    if precision == "bf16":
        if device.type == "cpu" or supported:
            return torch.bfloat16
        raise RuntimeError(f"mixed_precision=bf16 is not supported on {device}; use auto or fp32")
    return torch.bfloat16 if supported else None
