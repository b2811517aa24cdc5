"""How many images the metrics use when a count is set to 0 (auto).

Frechet distances are biased by the sample count N, so a number is only
comparable with others at the same N, and every metric name carries its N.
Published FIDs use thousands of images; on a CPU InceptionV3 costs about
0.1-0.3 s an image, so a CPU run scores Inception on a few hundred (and says
so in the metric names) and the cheap classifier FD on 1,000; a GPU run uses
the large counts for both.
"""

from __future__ import annotations

import torch

# kind -> (CPU count, GPU count)
AUTO_COUNTS = {
    # sample.num_samples: the images the evaluate stage scores. On a CPU 1,000: at N = 128 real images score
    # a classifier FD of 3.8, at N = 1,000 0.2-0.6, and two seeds of one recipe differ by ~0.3 (recipe study)
    "samples": (1_000, 10_000),
    # evaluate.reference_num_images: held-out (and real training) images for Inception, and the most samples
    # Inception scores
    "reference": (128, 10_000),
    "compare": (64, 2_000),  # evaluate.compare_num_samples: per sampler and step count
}


def resolve_count(requested: int, kind: str, device: torch.device) -> int:
    """``requested`` if > 0, else the auto count of ``kind`` for ``device`` (any accelerator counts as a GPU)."""
    if kind not in AUTO_COUNTS:
        raise ValueError(f"unknown count kind {kind!r}; choose one of {', '.join(AUTO_COUNTS)}")
    if requested > 0:
        return requested
    cpu, gpu = AUTO_COUNTS[kind]
    return cpu if device.type == "cpu" else gpu
