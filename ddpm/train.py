"""The *train* stage: a flat DDPM training loop (Ho et al. 2020, algorithm 1).

Phases per step: draw a batch -> noise it at random t -> regress the objective
-> optimizer step -> EMA. Maintenance on intervals: report, checkpoint.
The loop reports through ``callback(event: dict)`` and never imports a tracker.

Resume: checkpoints live in ``train.checkpoint_dir/<fingerprint>/``, where the
fingerprint hashes everything that changes the result (model, diffusion, the
train settings that matter, the data hash). A rerun with the same fingerprint
continues from the newest readable checkpoint, bitwise as if never stopped.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ddpm import checkpoint
from ddpm.config import Config
from ddpm.device import autocast_dtype, resolve_device
from ddpm.export import load_state_checked, save_model
from ddpm.objectives import loss_weight, training_target
from ddpm.prepare import load_manifest, load_split
from ddpm.schedule import NoiseSchedule
from ddpm.unet import build_unet

Callback = Callable[[dict[str, Any]], None]

# Train settings that do not change the trained weights, left out of the fingerprint.
_NOT_IN_FINGERPRINT = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "checkpoint_dir",
                       "out_dir", "loss_path", "device")
_TRAINING_CODE = ("train.py", "unet.py", "schedule.py", "objectives.py")
_IN_MEMORY_LIMIT_BYTES = 2 << 30  # prepared sets smaller than this are read into RAM


@dataclass
class TrainResult:
    steps: int
    final_loss: float  # mean loss over the last logging window
    images_per_s: float
    num_parameters: int
    model_path: Path
    loss_csv: Path
    checkpoint_dir: Path
    resumed_from_step: int
    history: list[dict[str, float]]  # one record per logging interval: step, loss, lr, images_per_s


def _code_hash() -> str:
    """Hash of the modules that define what training computes: edited code never resumes old checkpoints."""
    h = hashlib.sha256()
    for name in _TRAINING_CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def fingerprint(cfg: Config, data_hash: str) -> str:
    """Identity of a training run: config that changes the weights, the data, and the training code."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion),
                       "train": train, "data": data_hash, "code": _code_hash()}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(cfg: Config, prepared_dir: str | Path) -> Path:
    """Where this configuration on this data keeps its checkpoints."""
    return Path(cfg.train.checkpoint_dir) / fingerprint(cfg, load_manifest(prepared_dir)["content_hash"])


def learning_rate(step: int, cfg) -> float:
    """Linear warm-up over ``lr_warmup_steps``, then constant or cosine decay to 0 at ``steps``."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def ema_beta(step: int, halflife_steps: float, rampup_ratio: float) -> float:
    """EMA decay per step from a half-life (Karras et al. 2022, EDM, training_loop.py);
    the half-life ramps up as ``rampup_ratio * step`` early in training."""
    halflife = halflife_steps
    if rampup_ratio > 0:
        halflife = min(halflife, step * rampup_ratio)
    return 0.5 ** (1 / halflife) if halflife > 0 else 0.0


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch e: a fixed permutation of (seed, e), drawn once per epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


def _batch_indices(n: int, batch: int, seed: int, epoch: int, pos: int) -> tuple[np.ndarray, int, int]:
    """Indices of the next batch (sorted, for sequential reads) and the new (epoch, pos)."""
    if pos + batch > n:
        epoch, pos = epoch + 1, 0
    return np.sort(_epoch_order(n, seed, epoch)[pos : pos + batch]), epoch, pos + batch


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


def train(cfg: Config, prepared_dir: str | Path, callback: Callback | None = None,
          fresh: bool = False) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from the latest checkpoint unless ``fresh``.

    An exception raised by ``callback`` stops training as a crash would, after the
    last checkpoint.
    """
    tc, callback = cfg.train, callback or (lambda event: None)
    device = resolve_device(tc.device)
    amp_dtype = autocast_dtype(tc.mixed_precision, device)
    manifest = load_manifest(prepared_dir)
    data = load_split(prepared_dir, "train")
    images = np.asarray(data.images) if data.images.nbytes <= _IN_MEMORY_LIMIT_BYTES else data.images
    n, channels, resolution = images.shape[0], images.shape[1], images.shape[2]
    if n < tc.batch_size:
        raise ValueError(f"train.batch_size={tc.batch_size} is larger than the {n} prepared training images")

    torch.manual_seed(tc.seed)
    model = build_unet(cfg.model, channels, resolution).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    g = torch.Generator().manual_seed(tc.seed)  # timesteps, noise and flips
    if tc.channels_last:
        model, ema = model.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if tc.compile else model

    # -- resume --------------------------------------------------------------
    ckpt_dir = checkpoint_dir(cfg, prepared_dir)
    fp = ckpt_dir.name
    step, epoch, pos, history = 0, 0, 0, []
    window_loss, window_n = 0.0, 0  # steps since the last log line; saved so a resumed log matches
    found = None if fresh else checkpoint.latest_valid(ckpt_dir)
    if fresh:
        for p in checkpoint.list_checkpoints(ckpt_dir):
            p.unlink()
    if found is not None:
        path, tensors, cmeta = found
        load_state_checked(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, str(path))
        load_state_checked(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, str(path))
        _restore_optimizer(opt, tensors, cmeta["optim_groups"])
        torch.set_rng_state(tensors["rng.torch"])
        g.set_state(tensors["rng.train"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        step, epoch, pos, history = cmeta["step"], cmeta["epoch"], cmeta["pos"], cmeta["history"]
        window_loss, window_n = cmeta.get("window_loss", 0.0), cmeta.get("window_n", 0)
        print(f"resuming from {path} at step {step}")
    resumed_from = step

    def save_checkpoint() -> Path:
        opt_tensors, groups = _optimizer_tensors(opt)
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in ema.state_dict().items()}, **opt_tensors,
                   "rng.torch": torch.get_rng_state(), "rng.train": g.get_state()}
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        path = checkpoint.step_path(ckpt_dir, step)
        checkpoint.save(path, tensors, {"step": step, "epoch": epoch, "pos": pos, "history": history,
                                        "window_loss": window_loss, "window_n": window_n,
                                        "optim_groups": groups, "fingerprint": fp})
        checkpoint.prune(ckpt_dir, tc.keep_checkpoints)
        callback({"event": "checkpoint", "step": step, "path": str(path)})
        return path

    nparams = model.num_parameters()
    callback({"event": "start", "step": step, "num_parameters": nparams, "device": str(device),
              "fingerprint": fp, "resumed_from_step": resumed_from})
    print(f"training {nparams / 1e6:.2f} M params on {device} ({amp_dtype or 'fp32'}), "
          f"{n} images {channels}x{resolution}x{resolution}, steps {step} -> {tc.steps}")

    t_window, images_seen = time.perf_counter(), 0
    t_start, images_total = time.perf_counter(), 0
    bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", mininterval=1.0)
    model.train()
    while step < tc.steps:
        # -- one optimizer step over grad_accum_steps micro-batches ------------
        lr = learning_rate(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(tc.grad_accum_steps):
            idx, epoch, pos = _batch_indices(n, tc.batch_size, tc.seed, epoch, pos)
            x0 = torch.from_numpy(images[idx]).to(device).float().div(127.5).sub(1)  # (B, C, H, W) in [-1, 1]
            B = x0.shape[0]
            t = torch.randint(0, schedule.T, (B,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            if tc.hflip:
                flip = torch.rand(B, generator=g) < 0.5
                x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
            t, noise = t.to(device), noise.to(device)
            if tc.channels_last:
                x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
            alpha_bar = schedule.at(schedule.alpha_bar, t, x0)
            x_t = schedule.q_sample(x0, t, noise)  # eq. 4
            target = training_target(cfg.diffusion.objective, x0, noise, alpha_bar)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = forward(x_t, t)
            per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
            weight = loss_weight(cfg.diffusion.objective, schedule.snr(t), tc.min_snr_gamma).to(per_sample.dtype)
            loss = (weight * per_sample).mean() / tc.grad_accum_steps
            loss.backward()
            step_loss += loss.item()
            images_seen += B
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step}; lower train.lr "
                                     f"(now {tc.lr}) or enable train.grad_clip_norm")
        if tc.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

        # -- EMA --------------------------------------------------------------
        beta = ema_beta(step, tc.ema_halflife_steps, tc.ema_rampup_ratio)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - beta)
        step += 1
        window_loss, window_n = window_loss + step_loss, window_n + 1

        # -- maintenance ----------------------------------------------------------
        bar.update(1)
        if step % tc.log_every_steps == 0 or step == tc.steps:
            now = time.perf_counter()
            ips = images_seen / (now - t_window)
            images_total += images_seen
            record = {"step": step, "loss": window_loss / window_n, "lr": lr, "images_per_s": ips}
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            callback({"event": "log", **record})
            window_loss, window_n, t_window, images_seen = 0.0, 0, now, 0
        if step % tc.checkpoint_every_steps == 0 or step == tc.steps:
            save_checkpoint()
    bar.close()

    # -- outputs ----------------------------------------------------------------
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.safetensors"
    save_model(model_path, ema, cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.objective,
               extra={"data_hash": manifest["content_hash"], "steps": step, "fingerprint": fp})
    loss_csv = Path(tc.loss_path)
    loss_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(loss_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    elapsed = time.perf_counter() - t_start
    ips = images_total / elapsed if images_total else 0.0
    final_loss = history[-1]["loss"] if history else float("nan")
    callback({"event": "end", "step": step, "final_loss": final_loss, "model_path": str(model_path)})
    return TrainResult(step, final_loss, ips, nparams, model_path, loss_csv, ckpt_dir, resumed_from, history)
