"""Training batches: each epoch a fixed permutation of the prepared images, read in slices.

Sets that fit (``in_memory_limit_bytes``) are copied once to the training
device as uint8, so a batch is one gather on the device and no host work. Larger
sets stay memory-mapped and each batch is read from the map in sorted order
(sequential reads) and copied to the device.
The position (epoch, offset into its permutation) is part of every checkpoint.

Several ranks (ddpm/distributed.py) walk the same epoch order with the same global batch; each rank
reads only its slice of every batch, so together they read what one process would.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

IN_MEMORY_LIMIT_BYTES = 2 << 30  # prepared sets up to this size are held in memory (on the training device)


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch e: a fixed permutation of range(n) for (seed, e), drawn on the CPU, (n,) int64."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Batches:
    """``next(epoch, pos)`` -> (uint8 images (B, C, H, W) on ``device``, epoch, pos) of the next batch.

    ``batch_size`` is the global batch; with ``world_size`` ranks, rank ``rank`` gets images
    ``rank * B / world_size`` to ``(rank + 1) * B / world_size`` of it (B / world_size of them)."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, device: torch.device,
                 in_memory_limit_bytes: int = IN_MEMORY_LIMIT_BYTES, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.device = images.shape[0], batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        if self.n < batch_size:
            raise ValueError(f"train.batch_size={batch_size} is larger than the {self.n} prepared training images; "
                             f"lower train.batch_size to at most {self.n} or prepare more images")
        self.in_memory = images.nbytes <= in_memory_limit_bytes
        # np.array copies the memory map into RAM; torch then moves it to the device once.
        self.images = torch.from_numpy(np.array(images)).to(device) if self.in_memory else images
        self._order: tuple[int, torch.Tensor] | None = None

    def _order_on_device(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n, self.seed, epoch).to(self.device))
        return self._order[1]

    def next(self, epoch: int, pos: int) -> tuple[torch.Tensor, int, int]:
        if pos + self.batch_size > self.n:  # the rest of an epoch that does not fill a batch is dropped
            epoch, pos = epoch + 1, 0
        end = pos + self.batch_size
        # sorted: sequential reads from a memory map, and the same batches whichever way the set is held
        if self.in_memory:
            return self.images[self._shard(self._order_on_device(epoch)[pos:end].sort().values)], epoch, end
        idx = self._shard(np.sort(epoch_order(self.n, self.seed, epoch)[pos:end].numpy()))
        return torch.from_numpy(self.images[idx]).to(self.device), epoch, end

    def _shard(self, batch_indices):
        """This rank's slice of the global batch's (sorted) image indices."""
        if self.world_size == 1:
            return batch_indices
        per_rank = self.batch_size // self.world_size
        return batch_indices[self.rank * per_rank:(self.rank + 1) * per_rank]
