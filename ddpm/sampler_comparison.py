"""Quality against sampling steps: one metric for each sampler at several step counts.

Every (sampler, steps) pair draws the same N images from the same seeds, so
the rows differ only by the sampler and its step count. Results go to a table
(CSV: ``steps`` then one column per sampler) and a plot (PNG).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ddpm.config import SAMPLERS, SampleConfig
from ddpm.export import LoadedModel
from ddpm.sample import generate


def metric_key(metric: str, n: int, sampler: str, steps: int) -> str:
    """``fd_classifier_n128_dpm_solver_pp_10steps``: MLflow metric names cannot hold '+'."""
    return f"{metric}_n{n}_{sampler.replace('++', '_pp')}_{steps}steps"


def compare_samplers(loaded: LoadedModel, sample_cfg: SampleConfig, samplers: tuple[str, ...],
                     steps: tuple[int, ...], num_samples: int,
                     score: Callable[[np.ndarray], float]) -> list[dict]:
    """Rows ``{"sampler", "steps", "value", "seconds"}``; ``score`` maps uint8 images (N, C, H, W) to a number
    (lower is better)."""
    rows = []
    for sampler in samplers:
        for n_steps in steps:
            t = time.perf_counter()
            images = generate(loaded, replace(sample_cfg, sampler=sampler, steps=n_steps), num_samples=num_samples,
                              progress=False)
            seconds = time.perf_counter() - t
            value = score(images)
            rows.append({"sampler": sampler, "steps": n_steps, "value": value, "seconds": round(seconds, 2)})
            print(f"  {sampler:>12} {n_steps:>4} steps: {value:9.4f}  (sampling {seconds:.1f} s)")
    return rows


def write_table(rows: list[dict], path: str | Path) -> None:
    """Wide CSV: one row per step count, one column per sampler name in ``SAMPLERS`` (empty where that
    sampler was not compared), so the DVC plot over these columns never misses a field."""
    steps = sorted({r["steps"] for r in rows})
    value = {(r["sampler"], r["steps"]): round(r["value"], 4) for r in rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["steps", *SAMPLERS])
        for s in steps:
            w.writerow([s, *(value.get((name, s), "") for name in SAMPLERS)])


def plot(rows: list[dict], metric: str, path: str | Path) -> None:
    """One line per sampler, the metric against the number of steps (log scale)."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    if not rows:
        ax.text(0.5, 0.5, "no sampler comparison ran\n(evaluate.compare_samplers is empty)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["steps"], r["value"]) for r in rows if r["sampler"] == sampler)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["steps"] for r in rows}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
