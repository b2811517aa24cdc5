"""The *sample* stage: generate images from a trained model with one sampler.

Writes ``samples.npz`` (uint8 (N, C, H, W)) and ``grid.png`` (the first 64).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddpm.config import SampleConfig
from ddpm.device import autocast_dtype, resolve_device
from ddpm.export import LoadedModel
from ddpm.images import grid, save_png, to_uint8
from ddpm.samplers import sample as run_sampler
from ddpm.sample_counts import resolve_count


def generate(loaded: LoadedModel, cfg: SampleConfig, num_samples: int | None = None,
             steps: int | None = None, sampler: str | None = None, progress: bool = True) -> np.ndarray:
    """uint8 (N, C, H, W) samples, in batches; batch i uses seed ``cfg.seed + i``.
    N: ``num_samples``, else ``cfg.num_samples``, where 0 means 1000 on a CPU and 10000 on a GPU."""
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.mixed_precision, device)
    unet = loaded.unet.to(device).eval()
    c, res = unet.config["channels"], unet.config["resolution"]
    n = num_samples or resolve_count(cfg.num_samples, "samples", device)  # 0: auto, from the device
    out = []
    starts = range(0, n, cfg.batch_size)
    for i, start in enumerate(tqdm(starts, desc=f"sample {sampler or cfg.sampler}", unit="batch",
                                   disable=not progress)):
        b = min(cfg.batch_size, n - start)
        g = torch.Generator().manual_seed(cfg.seed + i)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            x = run_sampler(sampler or cfg.sampler, unet, loaded.schedule, (b, c, res, res), g,
                            steps=steps or cfg.steps, objective=loaded.objective, eta=cfg.eta,
                            timestep_spacing=cfg.timestep_spacing, clip_x0=cfg.clip_x0, device=device)
        out.append(to_uint8(x))
    return np.concatenate(out)


def sample_stage(loaded: LoadedModel, cfg: SampleConfig, source: str) -> dict:
    """Run the stage; returns a summary that is also written to ``out_dir/summary.json``."""
    t0 = time.perf_counter()
    images = generate(loaded, cfg)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", images=images)
    save_png(out / "grid.png", grid(images[:64], nrow=8), scale=2)
    summary = {"model": source, "count": int(len(images)), "seconds": round(seconds, 2),
               "images_per_s": round(len(images) / seconds, 2), **{k: v for k, v in asdict(cfg).items()
                                                                   if k not in ("model", "out_dir")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"sampled {len(images)} images with {cfg.sampler} ({cfg.steps} steps) in {seconds:.1f} s -> {out}")
    return summary


def load_samples(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"samples {path} not found: run `ddpm sample` first")
    with np.load(path) as f:
        return f["images"]
