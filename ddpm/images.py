"""Conversions between model tensors and uint8 images, and image grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> uint8 (B, C, H, W)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (B, C, H, W) -> one uint8 (H', W', C) picture, ``nrow`` images per row."""
    b, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return out


def save_png(path: str | Path, picture: np.ndarray, scale: int = 1) -> None:
    """Save (H, W, C) uint8 as PNG, optionally upscaled with nearest neighbour for viewing."""
    img = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=False)
