"""Memorization: is a sample a near-copy of one training image?

For each sample x, let d1 and d2 be the pixel-space L2 distances to its nearest
and second-nearest training images. Gu et al. 2023 ("On Memorization in
Diffusion Models", following Yoon et al. 2023) call x memorized when
d1 / d2 < 1/3: it is far closer to one training image than to any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddpm.images import grid

MEMORIZED_RATIO = 1 / 3


@dataclass(frozen=True)
class Neighbours:
    d1: np.ndarray  # (N,) distance to the nearest training image, pixels in [0, 1]
    d2: np.ndarray  # (N,) distance to the second nearest
    nearest: np.ndarray  # (N,) index of the nearest training image

    @property
    def ratio(self) -> np.ndarray:
        """d1 / d2; 0 for an exact copy (also when the training set holds that image twice)."""
        return np.where(self.d1 == 0, 0.0, self.d1 / np.maximum(self.d2, 1e-12))

    def memorized_fraction(self, threshold: float = MEMORIZED_RATIO) -> float:
        return float((self.ratio < threshold).mean())


def _flat(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(images, copy=True)).to(device).flatten(1).float().div(255)


@torch.no_grad()
def nearest_training_images(samples: np.ndarray, train: np.ndarray, device: torch.device | str = "cpu",
                            chunk: int = 8192) -> Neighbours:
    """Nearest and second-nearest training image of each sample; uint8 (N, C, H, W) and (M, C, H, W)."""
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and training images {train.shape[1:]} differ in shape")
    if len(train) < 2:
        raise ValueError("memorization needs at least 2 training images")
    device = torch.device(device)
    x = _flat(samples, device)  # (N, P)
    x_sq = (x * x).sum(1, keepdim=True)
    best_d = torch.full((len(x), 2), float("inf"), device=device)
    best_i = torch.zeros((len(x), 2), dtype=torch.long, device=device)
    for start in range(0, len(train), chunk):
        y = _flat(train[start : start + chunk], device)  # (M', P)
        d_sq = (x_sq + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp_(min=0)  # (N, M')
        k = min(2, d_sq.shape[1])
        d, i = d_sq.topk(k, dim=1, largest=False)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + start], 1)
        order = cand_d.argsort(dim=1)[:, :2]
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    # The expanded form above loses exact zeros to round-off: recompute the two distances directly.
    idx = best_i.cpu().numpy()
    exact = [torch.linalg.vector_norm(x - _flat(train[idx[:, j]], device), dim=1) for j in range(2)]
    d1, d2 = exact[0].cpu().numpy().astype(np.float64), exact[1].cpu().numpy().astype(np.float64)
    return Neighbours(d1=d1, d2=d2, nearest=idx[:, 0])


def closest_pairs_picture(samples: np.ndarray, train: np.ndarray, nb: Neighbours, count: int = 16) -> np.ndarray:
    """(H', W', C) uint8: the ``count`` samples with the lowest d1/d2 (top row) above their nearest
    training image (bottom row)."""
    order = np.argsort(nb.ratio, kind="stable")[:count]
    return grid(np.concatenate([samples[order], train[nb.nearest[order]]]), nrow=len(order))
