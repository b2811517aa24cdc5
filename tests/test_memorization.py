"""Memorization: the d1/d2 nearest-neighbour test of Gu et al. 2023 on generated bar images."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm.memorization import MEMORIZED_RATIO, closest_pairs_picture, nearest_training_images
from tests.conftest import make_fashion_like


@pytest.fixture(scope="module")
def data() -> dict:
    train = make_fashion_like(400, seed=0)[0][:, None]  # (400, 1, 28, 28)
    held_out = make_fashion_like(60, seed=1)[0][:, None]
    return {"train": train, "held_out": held_out}


def test_exact_copies_are_flagged_and_held_out_images_are_not(data):
    train, held_out = data["train"], data["held_out"]
    copies = train[[5, 17, 123, 399]]
    nb = nearest_training_images(np.concatenate([copies, held_out]), train, chunk=128)  # several chunks
    assert list(nb.nearest[:4]) == [5, 17, 123, 399]
    assert np.all(nb.d1[:4] == 0) and np.all(nb.ratio[:4] == 0)
    assert np.all(nb.ratio[4:] > MEMORIZED_RATIO)
    assert nb.memorized_fraction() == pytest.approx(4 / 64)


def test_held_out_data_is_not_memorized(data):
    nb = nearest_training_images(data["held_out"], data["train"])
    assert nb.memorized_fraction() == 0.0
    # Same-class bars with independent noise: the two nearest images are about equally far.
    assert float(np.median(nb.ratio)) == pytest.approx(0.993493, abs=1e-5)


def test_near_copies_are_flagged(data):
    """A training image plus faint noise (+-3 grey levels) is still a copy; heavy noise is not."""
    rng = np.random.default_rng(2)
    base = data["train"][:20].astype(np.int16)
    faint = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8)
    assert nearest_training_images(faint, data["train"]).memorized_fraction() == 1.0
    assert nearest_training_images(heavy, data["train"]).memorized_fraction() == 0.0


def test_distances_are_exact_l2_in_unit_pixels(data):
    train = data["train"]
    nb = nearest_training_images(data["held_out"][:3], train)
    for i in range(3):
        flat = train.reshape(len(train), -1).astype(np.float64)
        d = np.linalg.norm((flat - data["held_out"][i].reshape(1, -1)) / 255.0, axis=1)
        assert nb.d1[i] == pytest.approx(np.sort(d)[0], rel=1e-5)
        assert nb.d2[i] == pytest.approx(np.sort(d)[1], rel=1e-5)
        assert nb.nearest[i] == int(np.argmin(d))


def test_picture_puts_each_flagged_sample_above_its_training_image(data):
    train = data["train"]
    samples = np.concatenate([data["held_out"][:6], train[[7, 8]]])
    nb = nearest_training_images(samples, train)
    picture = closest_pairs_picture(samples, train, nb, count=4)
    assert picture.shape == (2 * (28 + 2) + 2, 4 * (28 + 2) + 2, 1)
    # The two copies sort first (ratio 0): top row and bottom row show the same image.
    np.testing.assert_array_equal(picture[2:30, 2:30, 0], train[7, 0])
    np.testing.assert_array_equal(picture[32:60, 2:30, 0], train[7, 0])


def test_shapes_must_match(data):
    with pytest.raises(ValueError, match="differ in shape"):
        nearest_training_images(data["held_out"][:, :, :14], data["train"])
