"""Which switches speed up a training step on this CPU: memory format, bf16 autocast, torch.compile.

The stripped step (forward + backward + fused AdamW on a fixed batch) of one UNet configuration,
each variant in turn after a warm-up (compile time is reported apart), alternating over repeats, then
a torch.profiler breakdown of the fp32 step by operator.

    python benchmarks/cpu_step_options.py --config course --batch-size 32 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm.unet import UNet  # noqa: E402

CONFIGS = {"course": dict(channels=3, resolution=32, base_channels=64, channel_mults=(1, 2, 2, 4), blocks_per_level=2,
                          attention_resolutions=(8, 4)),
           "default": dict(channels=1, resolution=28, base_channels=32, channel_mults=(1, 2, 2), blocks_per_level=1,
                           attention_resolutions=(7,))}


def variant(cfg: dict, batch: int, channels_last: bool, bf16: bool, compiled: bool):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = UNet(**cfg).to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(net, dynamic=False) if compiled else net
    x = torch.randn(batch, cfg["channels"], cfg["resolution"], cfg["resolution"]).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x, t)
        (out.float() - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="course")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants (minutes of compile time)")
    args = p.parse_args()
    cfg = CONFIGS[args.config]
    names = [("fp32", False, False, False), ("fp32 channels_last", True, False, False), ("bf16", False, True, False),
             ("bf16 channels_last", True, True, False)]
    if args.compile:
        names += [("fp32 compile", False, False, True), ("bf16 compile", False, True, True)]
    steps, warm = {}, {}
    for name, cl, bf16, comp in names:
        steps[name] = variant(cfg, args.batch_size, cl, bf16, comp)
        t0 = time.perf_counter()
        steps[name]()
        steps[name]()
        warm[name] = time.perf_counter() - t0
    rates = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
    base = statistics.median(rates["fp32"])
    print(f"## Step options on the CPU: {args.config} config, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| variant | img/s median | min-max | vs fp32 | first two steps (incl. compile) |\n|---|---:|---:|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} | "
              f"{statistics.median(r) / base:.2f}x | {warm[name]:.1f} s |")

    from torch.profiler import profile
    with profile() as prof:
        steps["fp32"]()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("\nfp32 step by operator (torch.profiler, self CPU time):\n\n| operator | share |\n|---|---:|")
    for e in events[:6]:
        print(f"| {e.key} | {e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
