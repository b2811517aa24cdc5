"""The *train* stage: a flat DDPM training loop (Ho et al. 2020, algorithm 1).

Phases per step: draw a batch -> noise it at random t -> regress the objective
-> optimizer step -> EMA. Maintenance on intervals: report, checkpoint.
The loop reports through ``callback(event: dict)`` and never imports a tracker.

Fast by keeping the host out of the steady state: data for sets that fit lives
on the device, timesteps and noise come from a device generator, the loss is
summed on the device and read only at log steps, the EMA and AdamW are
multi-tensor kernels, and checkpoints are written by a background thread.

Resume: checkpoints live in ``train.checkpoint_dir/<fingerprint>/``, where the
fingerprint hashes everything that changes the result (model, diffusion, the
train settings that matter, the data hash). A rerun with the same fingerprint
continues from the newest readable checkpoint, bitwise as if never stopped.

Several ranks (torchrun, see ddpm/distributed.py): the model is wrapped in DDP, each rank trains on its
slice of every global batch and draws the whole batch's timesteps and noise from the same generator,
keeping its slice, so the run is the one-process run up to the order of floating-point sums. Only rank 0
writes (checkpoints, loss table, model) and calls ``callback``. The world size is part of the fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ddpm import checkpoint, distributed
from ddpm.batches import Batches
from ddpm.config import Config, ConfigError
from ddpm.device import autocast_dtype, backend_settings, compile_or_eager, resolve_device
from ddpm.ema import ema_beta, ema_update
from ddpm.export import save_model
from ddpm.objectives import loss_weight, training_target
from ddpm.prepare import load_manifest, load_split
from ddpm.schedule import NoiseSchedule
from ddpm.train_state import TrainState, restore, to_checkpoint
from ddpm.unet import build_unet

__all__ = ["TrainResult", "train", "fingerprint", "checkpoint_dir", "learning_rate", "ema_beta",
           "TrainingOutOfMemoryError", "TrainingStopped"]

Callback = Callable[[dict[str, Any]], None]

# Train settings that do not change the trained weights, left out of the fingerprint.
_NOT_IN_FINGERPRINT = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "checkpoint_dir",
                       "out_dir", "loss_path", "device",
                       # how the ranks are started and meet; their number, the world size, is added below
                       "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")
_TRAINING_CODE = ("train.py", "unet.py", "schedule.py", "objectives.py", "ema.py", "batches.py", "distributed.py")
_MAX_WORLD_SIZE_SEARCHED = 256  # world sizes whose checkpoint folders a run looks for when its own is empty


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message says at which batch size and what to change."""


class TrainingStopped(Exception):
    """Training was asked to stop (``stop`` was set) and did, after writing a checkpoint at ``step``."""

    def __init__(self, step: int, path: str | None):
        self.step, self.path = step, path
        super().__init__(f"stopped at step {step}; " + (f"checkpoint {path} written, the next run resumes from it"
                                                       if path else "no checkpoint (no step was taken)"))


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
    seconds: float  # spent in the training loop by this process (not counting set-up or earlier processes)
    device: str  # e.g. "cuda (bf16)"


def _code_hash() -> str:
    """Hash of the modules that define what training computes: edited code never resumes old checkpoints."""
    h = hashlib.sha256()
    for name in _TRAINING_CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def fingerprint(cfg: Config, data_hash: str, world_size: int = 1, code: str | None = None) -> str:
    """Identity of a training run: config that changes the weights, the data, the training code, and the
    world size (number of ranks) when above 1 (so one-process runs keep the fingerprints they had)."""
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IN_FINGERPRINT}
    if world_size > 1:
        train["world_size"] = world_size
    blob = json.dumps({"model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion),
                       "train": train, "data": data_hash, "code": code or _code_hash()}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(cfg: Config, prepared_dir: str | Path, world_size: int | None = None) -> Path:
    """Where this configuration on this data, at ``world_size`` ranks (default: torchrun's inside a
    launched process, else ``train.nproc_per_node x train.nnodes``), keeps its checkpoints."""
    world_size = world_size or distributed.world_size(cfg.train)
    return Path(cfg.train.checkpoint_dir) / fingerprint(cfg, load_manifest(prepared_dir)["content_hash"], world_size)


def refuse_other_world_size(cfg: Config, prepared_dir: str | Path, fresh: bool, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` if this run has no checkpoint but the same training at another world size has:
    a checkpoint resumes only at the world size that wrote it, and silently starting over would waste it."""
    world_size = world_size or distributed.world_size(cfg.train)
    if fresh or checkpoint.list_checkpoints(checkpoint_dir(cfg, prepared_dir, world_size)):
        return
    data_hash, code = load_manifest(prepared_dir)["content_hash"], _code_hash()
    for other in range(1, _MAX_WORLD_SIZE_SEARCHED + 1):
        other_dir = Path(cfg.train.checkpoint_dir) / fingerprint(cfg, data_hash, other, code)
        found = checkpoint.list_checkpoints(other_dir) if other != world_size else []
        if found:
            tc = cfg.train
            raise ConfigError(
                f"{other_dir} holds checkpoints of this training at world size {other} (up to step "
                f"{checkpoint.step_of(found[-1])}), and this run has world size {world_size} (train.nproc_per_node="
                f"{tc.nproc_per_node} x train.nnodes={tc.nnodes}); a checkpoint resumes only at the world size that "
                f"wrote it. To continue that run, set train.nproc_per_node x train.nnodes back to {other}; to start "
                f"over at world size {world_size}, run `ddpm train --fresh` (the checkpoints in {other_dir} are kept)")


def learning_rate(step: int, cfg) -> float:
    """Linear warm-up over ``lr_warmup_steps``, then constant or cosine decay to 0 at ``steps``."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- set-up ---------------------------------------------------------------------------------------------

def _new_state(cfg: Config, channels: int, resolution: int, device: torch.device, precision: str) -> TrainState:
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_unet(cfg.model, channels, resolution).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update where torch has it
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    generator = torch.Generator(device).manual_seed(tc.seed)
    return TrainState(model, ema, opt, generator, device, precision)


def _resume(s: TrainState, ckpt_dir: Path, fresh: bool, world: distributed.World) -> None:
    if fresh:
        for p in checkpoint.list_checkpoints(ckpt_dir) if world.main else []:
            p.unlink()
        return
    found = checkpoint.latest_valid(ckpt_dir)
    if found is not None:
        path, tensors, meta = found
        restore(s, tensors, meta, path)
        distributed.restore_rng_state(tensors, world, s.device)
        if world.main:
            print(f"resuming from {path} at step {s.step}")
    if not distributed.same_on_all_ranks(s.step, world, s.device):
        raise RuntimeError(f"the ranks found different checkpoints in {ckpt_dir} (rank {world.rank}: step {s.step}): "
                           f"train.checkpoint_dir must be one folder that every machine sees (shared storage)")


# -- one step ---------------------------------------------------------------------------------------------

def diffusion_loss(forward: Callable, schedule: NoiseSchedule, images: torch.Tensor, g: torch.Generator,
                   cfg: Config, amp_dtype: torch.dtype | None, world: distributed.World = distributed.World()
                   ) -> torch.Tensor:
    """Algorithm 1 of Ho et al. 2020 for one batch of uint8 images (B, C, H, W) on the device:
    the (min-SNR weighted) mean squared error of the objective, a scalar on the device.
    With several ranks ``images`` is this rank's slice of the global batch: the timesteps, noise and
    flips of the whole batch are drawn (the generator stays the same on every rank) and the slice kept."""
    tc, objective, device = cfg.train, cfg.diffusion.objective, images.device
    x0 = images.float().div(127.5).sub(1)  # (B, C, H, W) in [-1, 1]
    B = x0.shape[0]
    t = torch.randint(0, schedule.T, (B * world.size,), generator=g, device=device)
    noise = torch.randn((B * world.size, *x0.shape[1:]), generator=g, device=device)
    flip = torch.rand(B * world.size, generator=g, device=device) < 0.5 if tc.hflip else None
    if world.size > 1:
        mine = slice(world.rank * B, (world.rank + 1) * B)
        t, noise, flip = t[mine], noise[mine], None if flip is None else flip[mine]
    if tc.hflip:
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    if tc.channels_last:
        x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
    alpha_bar = schedule.at(schedule.alpha_bar, t, x0)
    x_t = schedule.q_sample(x0, t, noise)  # eq. 4
    target = training_target(objective, x0, noise, alpha_bar)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = forward(x_t, t)
    per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    weight = loss_weight(objective, schedule.snr(t), tc.min_snr_gamma).to(per_sample.dtype)
    return (weight * per_sample).mean()


def _optimizer_step(s: TrainState, batches: Batches, schedule: NoiseSchedule, forward: Callable, cfg: Config,
                    lr: float, amp_dtype: torch.dtype | None, world: distributed.World) -> torch.Tensor:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the step's loss (this rank's)
    on the device. With several ranks DDP averages the gradients in the last micro-batch's backward."""
    tc = cfg.train
    for group in s.opt.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=s.device)
    for micro in range(tc.grad_accum_steps):
        images, s.epoch, s.pos = batches.next(s.epoch, s.pos)
        no_sync = getattr(forward, "no_sync", None)  # DDP: exchange gradients once per step, not per micro-batch
        last = micro == tc.grad_accum_steps - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            loss = diffusion_loss(forward, schedule, images, s.generator, cfg, amp_dtype, world) / tc.grad_accum_steps
            loss.backward()
        step_loss += loss.detach()
    if tc.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), tc.grad_clip_norm, foreach=True)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    return step_loss


@contextlib.contextmanager
def _explain_out_of_memory(cfg: Config, shape: tuple[int, ...], precision: str, last_checkpoint: Callable[[], int]):
    """Turn a device out-of-memory error into one that names the batch size and what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        tc, first = cfg.train, str(exc).strip().splitlines()[0].rstrip(".")
        bf16 = " or use train.mixed_precision=bf16," if precision == "fp32" else ""
        raise TrainingOutOfMemoryError(
            f"out of device memory at train.batch_size={tc.batch_size} (images {'x'.join(map(str, shape))}, "
            f"{precision}, grad_accum_steps={tc.grad_accum_steps}): {first[:200]}. Lower train.batch_size (and raise "
            f"train.grad_accum_steps by the same factor to keep the effective batch){bf16} and run again: "
            + (f"nothing is lost, training resumes from the checkpoint at step {last_checkpoint()}"
               if last_checkpoint() else "no checkpoint was written yet")) from None


# -- the loop -------------------------------------------------------------------------------------------

def train(cfg: Config, prepared_dir: str | Path, callback: Callback | None = None,
          fresh: bool = False, stop: threading.Event | None = None) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from the latest checkpoint unless ``fresh``.

    An exception raised by ``callback`` stops training as a crash would, after the
    last checkpoint. A ``checkpoint`` event is sent once its file is on disk. Once
    ``stop`` is set, the step in progress ends, a checkpoint is written and
    :class:`TrainingStopped` is raised (what a SIGTERM handler asks for).

    Inside torchrun (several ranks) every rank calls this; only rank 0 calls ``callback`` and writes files.
    """
    tc, world = cfg.train, distributed.current()
    callback = (callback or (lambda event: None)) if world.main else (lambda event: None)
    if tc.batch_size % world.size:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the world size {world.size} "
                          f"(the number of ranks torchrun started)")
    device = distributed.rank_device(resolve_device(tc.device), world)
    amp_dtype = autocast_dtype(tc.mixed_precision, device)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    manifest = load_manifest(prepared_dir)
    refuse_other_world_size(cfg, prepared_dir, fresh, world.size)
    images = load_split(prepared_dir, "train").images
    n, channels, resolution = images.shape[0], images.shape[1], images.shape[2]
    with backend_settings(device, tc.deterministic), distributed.process_group(world, device):
        batches = Batches(images, tc.batch_size, tc.seed, device, rank=world.rank, world_size=world.size)
        s = _new_state(cfg, channels, resolution, device, precision)
        distributed.seed_rank(tc.seed, world)
        schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.timesteps,
                                           cfg.diffusion.zero_terminal_snr).to(device)
        forward = distributed.data_parallel(s.model, world, device)
        if tc.compile:
            b = tc.batch_size // world.size
            example = torch.zeros(b, channels, resolution, resolution, device=device)
            forward = compile_or_eager(forward, (example, torch.zeros(b, dtype=torch.long, device=device)), amp_dtype)
        ckpt_dir = checkpoint_dir(cfg, prepared_dir, world.size)
        _resume(s, ckpt_dir, fresh, world)
        resumed_from, nparams = s.step, s.model.num_parameters()
        callback({"event": "start", "step": s.step, "num_parameters": nparams, "device": str(device),
                  "precision": precision, "fingerprint": ckpt_dir.name, "resumed_from_step": resumed_from})
        if world.main:
            ranks = f" x {world.size} ranks" if world.size > 1 else ""
            print(f"training {nparams / 1e6:.2f} M params on {device}{ranks} ({precision}), {n} images "
                  f"{channels}x{resolution}x{resolution} ({'on the device' if batches.in_memory else 'memory-mapped'}), "
                  f"steps {s.step} -> {tc.steps}")
        elapsed = _loop(s, cfg, batches, schedule, forward, amp_dtype, ckpt_dir, callback,
                        (channels, resolution, resolution), stop or threading.Event(), world)

    # -- outputs (rank 0) ---------------------------------------------------------------------------------
    out_dir = Path(tc.out_dir)
    model_path, loss_csv = out_dir / "model.safetensors", Path(tc.loss_path)
    images_total = (s.step - resumed_from) * tc.batch_size * tc.grad_accum_steps
    final_loss = s.history[-1]["loss"] if s.history else float("nan")
    result = TrainResult(s.step, final_loss, images_total / elapsed if elapsed > 0 else 0.0, nparams, model_path,
                         loss_csv, ckpt_dir, resumed_from, s.history, elapsed, f"{device} ({precision})")
    if not world.main:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model_path, s.ema, cfg.diffusion.schedule, cfg.diffusion.timesteps, cfg.diffusion.objective,
               extra={"data_hash": manifest["content_hash"], "steps": s.step, "fingerprint": ckpt_dir.name},
               zero_terminal_snr=cfg.diffusion.zero_terminal_snr)
    loss_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(loss_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(s.history)
    callback({"event": "end", "step": s.step, "final_loss": final_loss, "model_path": str(model_path)})
    return result


def _loop(s: TrainState, cfg: Config, batches: Batches, schedule: NoiseSchedule, forward: Callable, amp_dtype,
          ckpt_dir: Path, callback: Callback, shape: tuple[int, int, int], stop: threading.Event,
          world: distributed.World) -> float:
    """Step to ``train.steps`` with maintenance on intervals, or until ``stop`` is set (then
    :class:`TrainingStopped`, after a checkpoint); returns the seconds spent. Several ranks agree on
    the loss (its mean over the ranks) and on stopping at maintenance steps; rank 0 writes checkpoints."""
    tc = cfg.train
    writer, last_on_disk = checkpoint.BackgroundWriter(), [s.step]
    images_per_step = tc.batch_size * tc.grad_accum_steps
    t_start = t_window = time.perf_counter()
    steps_in_window = 0
    bar = tqdm(total=tc.steps, initial=s.step, desc="train", unit="step", mininterval=1.0, disable=not world.main)
    s.model.train()

    def on_disk() -> None:  # wait for the checkpoint in flight, then tell the callback it is there
        path = writer.wait()
        if path is not None:
            last_on_disk[0] = checkpoint.step_of(path)
            callback({"event": "checkpoint", "step": last_on_disk[0], "path": str(path)})

    try:
        with _explain_out_of_memory(cfg, (tc.batch_size, *shape), s.precision, lambda: last_on_disk[0]):
            while s.step < tc.steps:
                # -- step and EMA ---------------------------------------------------------------------
                lr = learning_rate(s.step, tc)
                step_loss = _optimizer_step(s, batches, schedule, forward, cfg, lr, amp_dtype, world)
                ema_update(s.ema, s.model, ema_beta(s.step, tc.ema_halflife_steps, tc.ema_rampup_ratio))
                s.step += 1
                s.window_loss += step_loss
                s.window_n += 1
                steps_in_window += 1
                bar.update(1)

                # -- maintenance: report, checkpoint, stop ---------------------------------------------
                stopping = stop.is_set() and world.size == 1  # several ranks decide together, below
                log_now = s.step % tc.log_every_steps == 0 or s.step == tc.steps
                checkpoint_now = s.step % tc.checkpoint_every_steps == 0 or s.step == tc.steps or stopping
                if not (log_now or checkpoint_now):
                    continue
                if world.size > 1:  # collectives: every rank reaches them at the same steps
                    stopping = distributed.any_rank(stop.is_set(), world, s.device)
                    checkpoint_now = checkpoint_now or stopping
                    distributed.mean_(s.window_loss, world)  # from here every rank holds the ranks' mean
                on_disk()
                window_loss = float(s.window_loss)  # the one host sync of a logging interval
                if not math.isfinite(window_loss):
                    raise FloatingPointError(
                        f"loss became {window_loss} between steps {s.step - s.window_n} and {s.step}; lower "
                        f"train.lr (now {tc.lr}) or enable train.grad_clip_norm. "
                        + (f"The last good checkpoint is step {last_on_disk[0]}" if last_on_disk[0]
                           else "No checkpoint was written"))
                if log_now:
                    now = time.perf_counter()
                    record = {"step": s.step, "loss": window_loss / s.window_n, "lr": lr,
                              "images_per_s": steps_in_window * images_per_step / (now - t_window)}
                    s.history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
                    callback({"event": "log", **record})
                    s.window_loss.zero_()
                    s.window_n, steps_in_window, t_window = 0, 0, now
                if checkpoint_now and last_on_disk[0] != s.step:
                    rank_rngs = distributed.rng_states(world, s.device)  # a collective: every rank's to rank 0
                    if world.main:
                        tensors, meta = to_checkpoint(s, ckpt_dir.name)
                        writer.submit(checkpoint.step_path(ckpt_dir, s.step), {**tensors, **rank_rngs}, meta,
                                      tc.keep_checkpoints)
                if stopping:
                    on_disk()
                    raise TrainingStopped(s.step, str(checkpoint.step_path(ckpt_dir, s.step)))
            on_disk()
    finally:
        writer.close()
        bar.close()
    return time.perf_counter() - t_start
