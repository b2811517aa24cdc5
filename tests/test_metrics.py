"""Set-to-set metrics on synthetic features, against textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from ddpm.metrics import (feature_stats, frechet_distance, frechet_distance_features, kernel_inception_distance,
                          precision_recall)


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)) * scale + shift


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` (full-rank case), written out with scipy."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2)).real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_pytorch_fid_formula_on_full_rank_stats():
    a, b = gaussian(400, 24, 0), gaussian(300, 24, 1, shift=0.3, scale=1.5)
    expected = pytorch_fid_formula(*feature_stats(a), *feature_stats(b))
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_features(a, b) == pytest.approx(expected, rel=1e-9)
    # 24 * (0.3^2 + 1 + 1.5^2 - 2 * 1.5) = 8.16 for the true distributions; pinned for these seeded draws.
    assert expected == pytest.approx(9.257388, abs=1e-6)


def test_frechet_distance_features_low_rank_path_equals_covariance_path():
    """N < D uses the centred features as the covariance factor; it must agree with the (D, D) route."""
    a, b = gaussian(20, 50, 2), gaussian(30, 50, 3, shift=0.1)
    with pytest.warns(UserWarning, match="only 20 samples for 50-d features"):
        low_rank = frechet_distance_features(a, b)
        full = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert low_rank == pytest.approx(full, rel=1e-7)  # eigh round-off on the zero eigenvalues


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    a, b = gaussian(200, 16, 4), gaussian(200, 16, 5, shift=1.0)
    assert abs(frechet_distance_features(a, a)) < 1e-9
    assert frechet_distance_features(a, b) == pytest.approx(frechet_distance_features(b, a), rel=1e-9)
    # Means 1.0 apart in each of 16 dimensions: about 16 plus sampling noise.
    assert frechet_distance_features(a, b) == pytest.approx(16.0, rel=0.15)


def test_kid_is_about_zero_for_one_distribution_and_positive_for_different_ones():
    real = gaussian(500, 64, 6)
    same = gaussian(500, 64, 7)
    shifted = gaussian(500, 64, 8, shift=0.5)
    kid_same = kernel_inception_distance(real, same, num_subsets=20, max_subset_size=200)
    kid_diff = kernel_inception_distance(real, shifted, num_subsets=20, max_subset_size=200)
    assert abs(kid_same) < 0.01
    assert kid_diff > 0.5
    assert kid_diff > 100 * abs(kid_same)
    assert kid_same == pytest.approx(-0.00341973, abs=1e-8)  # pinned: seeded subsets
    assert kid_diff == pytest.approx(0.99793780, abs=1e-8)


def test_kid_matches_the_unbiased_mmd_formula_on_whole_sets():
    """With m = N the one subset is the whole of both sets: the textbook unbiased MMD^2 (Gretton et al. 2012)."""
    x, y = gaussian(40, 8, 9), gaussian(40, 8, 10, shift=0.2)
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    assert kernel_inception_distance(y, x) == pytest.approx(expected, rel=1e-9)


def test_precision_and_recall_separate_quality_from_coverage():
    real = gaussian(300, 16, 11)
    assert precision_recall(real, gaussian(300, 16, 12)) == pytest.approx((0.793333, 0.776667), abs=1e-6)
    # Mode collapse: every sample near one real point is realistic (precision 1) but covers little (recall low).
    collapsed = real[:1] + 0.05 * gaussian(300, 16, 13)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05
    # Far from the data: nothing looks real, nothing is covered.
    assert precision_recall(real, gaussian(300, 16, 14, shift=10.0)) == (0.0, 0.0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="KID needs at least 2"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="more than 3 vectors"):
        precision_recall(np.zeros((3, 4)), np.zeros((5, 4)))
