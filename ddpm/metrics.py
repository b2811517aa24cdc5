"""Distances between two sets of feature vectors: FD, KID, precision and recall.

Every function takes features (N, D) of real images and of generated ones.
The numbers depend on N, so callers name each metric with the N it used.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def warn_if_few(n: int, dim: int) -> None:
    """Fewer vectors than dimensions: the covariance is singular and the FD is biased upwards."""
    if n < dim:
        warnings.warn(f"only {n} samples for {dim}-d features: the covariance is singular and the Frechet distance "
                      "is biased upwards (compare it only at the same N, or use more samples)", stacklevel=3)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    warn_if_few(len(f), f.shape[1])
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """L (D, D) with L L^T = sigma, from the eigendecomposition (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(sigma)
    return v * np.sqrt(np.clip(w, 0.0, None))


def _trace_sqrt_product(l1: np.ndarray, l2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for S1 = L1 L1^T, S2 = L2 L2^T.

    The eigenvalues of S1 S2 are those of (L1^T L2)(L1^T L2)^T, so the trace of its
    square root is the sum of the singular values of L1^T L2: exact for singular
    covariances, where ``scipy.linalg.sqrtm(S1 @ S2)`` needs pytorch-fid's ``eps * I``.
    """
    return float(np.linalg.svd(l1.T @ l2, compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, eq. 6; Dowson & Landau 1982)."""
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(_psd_factor(sigma1), _psd_factor(sigma2))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _factor_from_features(f: np.ndarray) -> np.ndarray:
    """A factor L of the covariance of f (N, D): the centred features / sqrt(N - 1) when N <= D (rank N - 1)."""
    n, d = f.shape
    if n <= d:
        return (f - f.mean(axis=0)).T / np.sqrt(n - 1)  # (D, N)
    return _psd_factor(np.cov(f, rowvar=False))  # (D, D)


def frechet_distance_features(real: np.ndarray, fake: np.ndarray) -> float:
    """The Frechet distance between two feature sets (N, D); same value as ``frechet_distance`` on their stats,
    but at N < D it costs an SVD of an (N1, N2) matrix instead of (D, D) ones."""
    f1, f2 = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    for f in (f1, f2):
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    warn_if_few(min(len(f1), len(f2)), f1.shape[1])
    l1, l2 = _factor_from_features(f1), _factor_from_features(f2)
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    trace1, trace2 = float((l1 * l1).sum()), float((l2 * l2).sum())
    return float(diff.dot(diff) + trace1 + trace2 - 2 * _trace_sqrt_product(l1, l2))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0,
                              device: torch.device | str = "cpu") -> float:
    """Unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets of
    m = min(N_real, N_fake, max_subset_size) vectors of each set (Binkowski et al. 2018, as in StyleGAN3's
    ``kernel_inception_distance.py``). About 0 for two draws from one distribution; can be slightly negative."""
    x_all = torch.as_tensor(np.asarray(fake), dtype=torch.float64, device=device)
    y_all = torch.as_tensor(np.asarray(real), dtype=torch.float64, device=device)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 vectors in each set, got {len(y_all)} real and {len(x_all)} fake")
    if m == len(x_all) == len(y_all):
        num_subsets = 1  # every subset would be the whole of both sets
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[torch.from_numpy(rng.choice(len(x_all), m, replace=False)).to(device)]
        y = y_all[torch.from_numpy(rng.choice(len(y_all), m, replace=False)).to(device)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += float((a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m)
    return total / num_subsets / m


def _kth_neighbour_radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each vector to its k-th nearest neighbour in the same set (itself excluded)."""
    return torch.cdist(f, f).kthvalue(k + 1, dim=1).values


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the real (fake) manifold is the union of
    balls around each real (fake) vector reaching its k-th nearest neighbour. Precision: the fraction of
    fake vectors inside the real manifold; recall: the fraction of real vectors inside the fake manifold."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    g = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if min(len(r), len(g)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} vectors per set")
    radii_r, radii_g = _kth_neighbour_radii(r, k), _kth_neighbour_radii(g, k)
    d = torch.cdist(g, r)  # (N_fake, N_real)
    precision = (d <= radii_r[None, :]).any(dim=1).float().mean()
    recall = (d <= radii_g[:, None]).any(dim=0).float().mean()
    return float(precision), float(recall)
