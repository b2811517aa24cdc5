"""Training batches: a fixed permutation per epoch, the same whether the set is held in memory or mapped."""

import numpy as np
import pytest
import torch

from ddpm.batches import Batches, epoch_order


def test_each_epoch_visits_every_image_once_and_drops_the_ragged_tail():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    batches = Batches(images, batch_size=3, seed=0, device=torch.device("cpu"))
    assert batches.in_memory
    seen, epoch, pos = [], 0, 0
    for _ in range(3):
        x, epoch, pos = batches.next(epoch, pos)
        assert x.dtype == torch.uint8 and x.shape == (3, 1, 1, 1)
        assert torch.equal(x.flatten(), x.flatten().sort().values)  # sorted within the batch
        seen += x.flatten().tolist()
    assert (epoch, pos) == (0, 9) and len(set(seen)) == 9  # 9 distinct images, image 10 waits
    assert sorted(seen) == sorted(epoch_order(10, 0, 0)[:9].tolist())
    x, epoch, pos = batches.next(epoch, pos)  # 1 image left: a new epoch starts
    assert (epoch, pos) == (1, 3)
    assert sorted(x.flatten().tolist()) == sorted(epoch_order(10, 0, 1)[:3].tolist())
    assert not torch.equal(epoch_order(10, 0, 0), epoch_order(10, 0, 1))
    assert torch.equal(epoch_order(10, 0, 1), epoch_order(10, 0, 1))


def test_memory_mapped_and_in_memory_sets_give_the_same_batches(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (50, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    held = Batches(mapped, 8, seed=3, device=torch.device("cpu"))
    streamed = Batches(mapped, 8, seed=3, device=torch.device("cpu"), in_memory_limit_bytes=0)
    assert held.in_memory and not streamed.in_memory
    state_a = state_b = (0, 0)
    for _ in range(20):  # several epochs
        a, *state_a = held.next(*state_a)
        b, *state_b = streamed.next(*state_b)
        assert torch.equal(a, b) and state_a == state_b


def test_a_batch_larger_than_the_data_names_both_numbers():
    with pytest.raises(ValueError, match=r"train\.batch_size=64 is larger than the 40 prepared training images; "
                                         r"lower train\.batch_size to at most 40"):
        Batches(np.zeros((40, 1, 2, 2), np.uint8), 64, seed=0, device=torch.device("cpu"))
