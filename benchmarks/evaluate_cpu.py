"""Wall time of the reference and evaluate stages with default params, on prepared data and a trained model.

Runs the real stage commands (``ddpm sample``, ``ddpm reference``, ``ddpm evaluate --no-track``) in a
scratch folder, with params.yaml's defaults except the paths, and prints a markdown report: the wall
time of each stage, every metric with its N, and the Inception speed the reference stage measured.

    python benchmarks/evaluate_cpu.py --prepared /tmp/fm/prepared --model /tmp/fm/models/model.safetensors
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DDPM = str(Path(sys.executable).with_name("ddpm"))


def stage(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DDPM_TRACKING": "0"})
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout + out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True, help="a prepared data folder (ddpm prepare's output)")
    parser.add_argument("--model", required=True, help="a model.safetensors trained on that data")
    parser.add_argument("--workdir", default="/tmp/ddpm-evaluate-bench", help="scratch folder (emptied first)")
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "params.yaml", work / "params.yaml")
    paths = [f"prepare.out_dir={Path(args.prepared).resolve()}", f"sample.model={Path(args.model).resolve()}",
             f"sample.out_dir={work / 'samples'}", f"evaluate.reference_dir={work / 'reference'}",
             f"evaluate.metrics_path={work / 'metrics' / 'metrics.json'}"]
    overrides = [a for p in paths for a in ("-S", p)]

    load_before = os.getloadavg()[0]
    sample_s, _ = stage([DDPM, "sample", "--no-track", *overrides], work)
    reference_s, reference_log = stage([DDPM, "reference", *overrides], work)
    evaluate_s, evaluate_log = stage([DDPM, "evaluate", "--no-track", *overrides], work)
    load_after = os.getloadavg()[0]

    import torch

    metrics = json.loads((work / "metrics" / "metrics.json").read_text())
    info = json.loads((work / "reference" / "reference.json").read_text())
    inception_images = 2 * info["inception"]["num_images"]
    parts = next((line for line in evaluate_log.splitlines() if line.startswith("evaluated ")), "")
    lines = [
        "# Reference and evaluate stages, default params",
        "",
        f"- command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cores, "
        f"cuda available: {torch.cuda.is_available()}",
        f"- 1-min load average {load_before:.2f} before, {load_after:.2f} after (other jobs share these cores)",
        "",
        "| stage | wall time (s) |",
        "|---|---:|",
        f"| sample (not part of the budget) | {sample_s:.1f} |",
        f"| reference (first run; DVC caches it per data version) | {reference_s:.1f} |",
        f"| evaluate | {evaluate_s:.1f} |",
        f"| reference + evaluate | {reference_s + evaluate_s:.1f} |",
        "",
        f"Reference stage: classifier {info['seconds'].get('classifier', 0):.1f} s (held-out accuracy "
        f"{info['classifier']['accuracy'] if info['classifier'] else 'n/a'}), Inception "
        f"{info['seconds'].get('inception', 0):.1f} s for {inception_images} images "
        f"({info['seconds'].get('inception', 0) / max(inception_images, 1):.3f} s/image).",
        f"Evaluate stage: `{parts}`",
        "",
        "| metric | value |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in metrics.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
