"""Training speed of the real loop, side by side with the HF course's diffusers loop.

For each UNet configuration (the project default and the course's) it runs, in one process:
- the project loop: ``ddpm.train.train`` itself (data sampling, noise, EMA, logging at every window,
  checkpoints at the default cadence), once per precision asked for;
- the stripped step: forward + backward + AdamW on a fixed batch, same model (the loop's floor);
- the anchor: the course's training loop with diffusers' ``UNet2DModel`` of the same configuration
  (benchmarks/course_loop.py), in fp32 and at each other precision asked for.
Each contender trains ``--steps-per-window`` steps at a time, alternating (A, B, C, ..., A, B, C, ...),
so a machine that speeds up or slows down affects all alike; the project loop runs in a thread that
pauses at each of its log events. The first ``--warmup`` windows are not timed.

    pip install -e '.[bench]'                   # diffusers, for the anchor
    python benchmarks/train_speed.py            # CPU: batch 32; CUDA: batch 128
    python benchmarks/train_speed.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from course_loop import CourseLoop, course_unet  # noqa: E402
from ddpm import config  # noqa: E402
from ddpm.device import autocast_dtype  # noqa: E402
from ddpm.schedule import NoiseSchedule  # noqa: E402
from ddpm.train import train  # noqa: E402
from ddpm.unet import build_unet  # noqa: E402

COURSE_MODEL = {"base_channels": 64, "channel_mults": [1, 2, 2, 4], "blocks_per_level": 2,
                "attention_resolutions": [8, 4], "attention_heads": 4, "dropout": 0.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssSampler:
    """Peak resident memory of this process, sampled every 10 ms while ``active``."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.active, self.peak = psutil.Process(), False, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            if self.active:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)


@dataclass
class Contender:
    name: str
    seconds: list[float] = field(default_factory=list)
    peak_rss: int = 0
    peak_cuda: int = 0

    def window(self, steps: int) -> float:  # seconds for ``steps`` more steps
        raise NotImplementedError

    def finish(self) -> None:
        pass


class ProjectLoop(Contender):
    """``ddpm.train.train`` in a thread; its callback blocks at every log event until the next window."""

    def __init__(self, name: str, cfg: config.Config, prepared: Path):
        super().__init__(name)
        self.go, self.done, self.error = threading.Semaphore(0), threading.Semaphore(0), None
        self.thread = threading.Thread(target=self._run, args=(cfg, prepared), daemon=True)
        self.thread.start()
        self.done.acquire()  # set-up finished: the "start" event

    def _callback(self, event: dict) -> None:
        if event["event"] in ("start", "log"):
            self.done.release()
            self.go.acquire()

    def _run(self, cfg, prepared) -> None:
        try:
            train(cfg, prepared, callback=self._callback, fresh=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc
            self.done.release()

    def window(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.go.release()
        self.done.acquire()
        if self.error:
            raise self.error
        return time.perf_counter() - t0

    def finish(self) -> None:
        self.go.release()
        self.thread.join()
        if self.error:
            raise self.error


class StrippedStep(Contender):
    """Forward + backward + AdamW on a fixed batch: no data, no EMA, no logging, no checkpoints."""

    def __init__(self, name: str, cfg: config.Config, shape: tuple[int, ...], device: torch.device, amp_dtype):
        super().__init__(name)
        self.device, self.amp_dtype = device, amp_dtype
        self.net = build_unet(cfg.model, shape[1], shape[2]).to(device).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
        self.schedule = NoiseSchedule.from_name("cosine", 1000).to(device)
        g = torch.Generator().manual_seed(0)
        self.x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
        self.noise = torch.randn(shape, generator=g).to(device)
        self.t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)

    def window(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x_t = self.schedule.q_sample(self.x0, self.t, self.noise)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.net(x_t, self.t)
            (out.float() - self.noise).pow(2).mean().backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


class Course(Contender):
    def __init__(self, name: str, loop: CourseLoop):
        super().__init__(name)
        self.loop = loop

    def window(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.loop.run(steps)  # loss.item() every step: already synchronised
        return time.perf_counter() - t0


def prepared_data(root: Path, n: int, channels: int, resolution: int) -> tuple[Path, np.ndarray]:
    """Random uint8 images in ddpm.prepare's layout (the content does not change the speed)."""
    d = root / f"prepared-{channels}x{resolution}"
    d.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (n, channels, resolution, resolution), dtype=np.uint8)
    np.save(d / "train_images.npy", images)
    np.save(d / "train_labels.npy", np.zeros(n, dtype=np.int64))
    (d / "manifest.json").write_text(json.dumps({"content_hash": f"bench-{channels}x{resolution}",
                                                 "shape": [channels, resolution, resolution]}))
    return d, images


def contenders(name: str, model: dict, channels: int, resolution: int, args, device, root: Path) -> list[Contender]:
    prepared, images = prepared_data(root, args.images, channels, resolution)
    total_steps = (args.warmup + args.repeats) * args.steps
    out: list[Contender] = []
    for precision in args.precisions:
        for compiled in ([False, True] if args.compile else [False]):
            run_dir = root / f"{name}-{precision}-{compiled}"
            cfg = config.from_dict({
                "model": model, "diffusion": {"schedule": "cosine", "timesteps": 1000, "objective": "eps"},
                "train": {"steps": total_steps, "batch_size": args.batch_size, "mixed_precision": precision,
                          "compile": compiled, "device": str(device), "log_every_steps": args.steps,
                          "checkpoint_dir": str(run_dir / "checkpoints"), "out_dir": str(run_dir / "models"),
                          "loss_path": str(run_dir / "loss.csv")}})
            amp = autocast_dtype(precision, device)
            label = f"{precision}{' (bf16)' if precision == 'auto' and amp else ''}{' + compile' if compiled else ''}"
            out.append(ProjectLoop(f"project loop (`ddpm.train.train`), {label}", cfg, prepared))
            if not compiled:
                out.append(StrippedStep(f"project stripped step, {label}", cfg,
                                        (args.batch_size, channels, resolution, resolution), device, amp))
    unet_args = dict(channels=channels, resolution=resolution, **{k: v for k, v in model.items() if k != "dropout"})
    for dtype in dict.fromkeys([None, *(autocast_dtype(p, device) for p in args.precisions)]):
        loop = CourseLoop(course_unet(**unet_args), images, args.batch_size, device, dtype)
        out.append(Course(f"diffusers course loop (`UNet2DModel`), {'bf16' if dtype else 'fp32'}", loop))
    return out


def measure(cs: list[Contender], args, device, rss: RssSampler) -> None:
    for r in range(args.warmup + args.repeats):
        for c in cs:
            rss.active, rss.peak = True, 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = c.window(args.steps)
            rss.active = False
            if r >= args.warmup:
                c.seconds.append(seconds)
                c.peak_rss = max(c.peak_rss, rss.peak)
                if device.type == "cuda":
                    c.peak_cuda = max(c.peak_cuda, torch.cuda.max_memory_allocated(device))
        print(f"  round {r + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    for c in cs:
        c.finish()


def table(title: str, cs: list[Contender], args, device) -> str:
    anchor = next(c for c in cs if c.name.startswith("diffusers") and c.name.endswith("fp32"))
    rate = {c.name: [args.steps * args.batch_size / s for s in c.seconds] for c in cs}
    base = statistics.median(rate[anchor.name])
    cuda = device.type == "cuda"
    lines = [f"### {title}", "",
             "| contender | img/s median | min-max | ms/step | peak RSS | " + ("peak CUDA | " if cuda else "") +
             "vs diffusers fp32 |", "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|"]
    for c in cs:
        med = statistics.median(rate[c.name])
        lines.append(f"| {c.name} | {med:,.1f} | {min(rate[c.name]):,.1f}-{max(rate[c.name]):,.1f} | "
                     f"{1000 * args.batch_size / med:,.1f} | {c.peak_rss / 2**20:,.0f} MiB | "
                     + (f"{c.peak_cuda / 2**30:.2f} GiB | " if cuda else "") + f"{med / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    p.add_argument("--configs", default="default,course", help="default (params.yaml's model), course, or both")
    p.add_argument("--batch-size", type=int, default=0, help="0: 32 on CPU, 128 on CUDA")
    p.add_argument("--precisions", default="fp32,auto", help="train.mixed_precision values for the project loop")
    p.add_argument("--compile", action="store_true", help="also run the project loop with train.compile")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per contender (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed windows per contender first")
    p.add_argument("--steps", type=int, default=0, help="steps per window; 0: 25 (course config on CPU: 5), 50 on CUDA")
    p.add_argument("--images", type=int, default=2048, help="size of the generated training set")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads; 0: torch's default")
    p.add_argument("--params", default=str(PROJECT_ROOT / "params.yaml"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 32)
    args.precisions = args.precisions.split(",")
    steps_arg = args.steps
    default_model = config.load(args.params).model
    configs = {"default": ("project default (params.yaml): 1x28x28", dict(vars(default_model)), 1, 28),
               "course": ("HF course unit 1: 3x32x32", COURSE_MODEL, 3, 32)}

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print("## Training speed: the real loop vs the course's diffusers loop\n")
    print(f"- command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, device {device} ({hw}); "
          f"1-min load average at the start {os.getloadavg()[0]:.2f}")
    print(f"- batch {args.batch_size}; windows alternate between contenders; {args.warmup} untimed, then "
          f"{args.repeats} timed windows each; peak RSS/CUDA is the whole process while the contender ran "
          f"(every contender's model stays resident)\n")
    rss = RssSampler()
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            title, model, channels, resolution = configs[key]
            args.steps = steps_arg or (50 if device.type == "cuda" else 5 if key == "course" else 25)
            cs = contenders(key, {k: list(v) if isinstance(v, tuple) else v for k, v in model.items()},
                            channels, resolution, args, device, Path(tmp))
            measure(cs, args, device, rss)
            print(table(f"{title}, {args.steps} steps per window", cs, args, device) + "\n", flush=True)
    print(f"1-min load average at the end: {os.getloadavg()[0]:.2f}; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
