"""Training throughput of two UNets, side by side: this project's default model and the HF course's.

One training step = forward + backward + AdamW step on a batch of noised images at random timesteps,
the same work as one step of ``ddpm.train`` (without data loading or EMA). The two models are measured
alternately (A, B, A, B, ...) after a warm-up, so a machine that speeds up or slows down during the run
affects both alike; the table reports the median images/s and the ratio.

    python benchmarks/train_speed.py                      # CPU or CUDA, whichever is available
    python benchmarks/train_speed.py --device cuda --bf16 --channels-last --compile
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from ddpm import config  # noqa: E402
from ddpm.schedule import NoiseSchedule  # noqa: E402
from ddpm.unet import UNet, build_unet  # noqa: E402


@dataclass
class Case:
    name: str
    net: UNet
    channels: int
    resolution: int


def cases(params_path: Path) -> list[Case]:
    cfg = config.load(params_path)
    channels = cfg.prepare.channels or 1  # 0 means "from the data": Fashion-MNIST is grey
    res = cfg.prepare.resolution
    default = build_unet(cfg.model, channels, res)
    # HF Diffusion Models Course, unit 1: UNet2DModel(sample_size=32, block_out_channels=(64, 128, 128, 256),
    # layers_per_block=2, attention in the two lowest-resolution levels).
    course = UNet(channels=3, resolution=32, base_channels=64, channel_mults=(1, 2, 2, 4), blocks_per_level=2,
                  attention_resolutions=(8, 4))
    m = cfg.model
    return [
        Case(f"project default ({params_path.name}): {channels}x{res}x{res}, base {m.base_channels}, "
             f"mults {list(m.channel_mults)}, {m.blocks_per_level} block(s), attn {list(m.attention_resolutions)}",
             default, channels, res),
        Case("HF course unit 1: 3x32x32, base 64, mults [1, 2, 2, 4], 2 blocks, attn [8, 4]", course, 3, 32),
    ]


class Trainer:
    """One model with its optimizer and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, case: Case, args, device: torch.device, schedule: NoiseSchedule):
        self.case, self.device, self.schedule, self.args = case, device, schedule, args
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.net = case.net.to(device, memory_format=fmt).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        # dynamic=False: both models share UNet.forward, and a second model would otherwise recompile it with
        # symbolic shapes (minutes of compile time, slower kernels)
        self.forward = torch.compile(self.net, dynamic=False) if args.compile else self.net
        g = torch.Generator().manual_seed(0)
        shape = (args.batch_size, case.channels, case.resolution, case.resolution)
        self.x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
        self.noise = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
        self.t = torch.randint(0, schedule.T, (args.batch_size,), generator=g).to(device)

    def step(self) -> None:
        x_t = self.schedule.q_sample(self.x0, self.t, self.noise)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            out = self.forward(x_t, self.t)
        loss = (out.float() - self.noise).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Images per second over ``steps`` steps."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.args.batch_size / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--steps-per-repeat", type=int, default=0, help="steps in one repetition; 0: 2 on CPU, 20 on CUDA")
    p.add_argument("--bf16", action="store_true", help="autocast the forward pass to bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads; 0: torch's default")
    p.add_argument("--params", default=str(PROJECT_ROOT / "params.yaml"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve(args.device)
    steps = args.steps_per_repeat or (20 if device.type == "cuda" else 2)
    schedule = NoiseSchedule.from_name("cosine", 1000)
    torch.manual_seed(0)
    trainers = [Trainer(c, args, device, schedule) for c in cases(Path(args.params))]

    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, " \
        f"1-min load average {os.getloadavg()[0]:.2f} at the start"
    print("# Training throughput: fwd + bwd + AdamW step\n")
    print(f"- command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}`")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, device {device} ({hw})")
    print(f"- batch {args.batch_size}, {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{', torch.compile' if args.compile else ''}{', channels_last' if args.channels_last else ''}; "
          f"{args.warmup} warm-up steps, then {args.repeats} repetitions of {steps} steps per model, alternating\n")

    for tr in trainers:
        for _ in range(args.warmup):
            tr.step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    rates: list[list[float]] = [[] for _ in trainers]
    for _ in range(args.repeats):
        for tr, r in zip(trainers, rates):
            r.append(tr.timed(steps))

    medians = [statistics.median(r) for r in rates]
    mem = f" peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (both models)" \
        if device.type == "cuda" else ""
    print("| model | parameters | images/s (median) | min-max | ms/step | relative speed |")
    print("|---|---:|---:|---:|---:|---:|")
    for tr, r, med in zip(trainers, rates, medians):
        print(f"| {tr.case.name} | {tr.net.num_parameters():,} | {med:,.1f} | {min(r):,.1f}-{max(r):,.1f} | "
              f"{1000 * args.batch_size / med:,.1f} | {med / medians[1]:.2f}x |")
    print(f"\nThe project's default model trains {medians[0] / medians[1]:.1f}x as many images/s as the course "
          f"model here, with {trainers[0].net.num_parameters() / trainers[1].net.num_parameters():.1%} of its "
          f"parameters.{mem}")
    if device.type == "cpu":
        print(f"1-min load average at the end: {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
