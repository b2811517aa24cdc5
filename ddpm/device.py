"""Pick the torch device and autocast precision a config asks for, and the backend switches that go with them."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable

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


@contextlib.contextmanager
def backend_settings(device: torch.device, deterministic: bool):
    """cuDNN autotuning on CUDA; ``deterministic`` forces deterministic kernels (restored afterwards)."""
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1])


def compile_or_eager(model: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor], amp_dtype) -> Callable:
    """``torch.compile(model)``, tried once on a batch of the training shape (forward and backward);
    if compilation fails, a warning and the eager model."""
    compiled = torch.compile(model, dynamic=False)
    try:
        with torch.autocast(example[0].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = compiled(*example)
        out.float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: train eagerly
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"train.compile: torch.compile failed ({type(exc).__name__}: {first[:300]}); "
                      f"training without compilation", stacklevel=3)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    return compiled
