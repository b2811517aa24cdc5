"""Several training processes (ranks) as one run: the torch.distributed plumbing of ddpm/train.py.

torchrun (``torch.distributed.run``; ``ddpm train`` starts it when ``train.nproc_per_node`` or
``train.nnodes`` is above 1) starts the ranks and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the
rendezvous address. Without them (a plain process) the world is one rank and everything here does
nothing, so single-process training runs exactly the code it ran before. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddpm.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    local_rank: int = 0  # index on this machine: the GPU it uses
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that writes files and reports (checkpoints, loss table, model, tracking)."""
        return self.rank == 0


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def current() -> World:
    """The world torchrun set up for this process; one rank outside torchrun."""
    if not launched():
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def world_size(tc: TrainConfig) -> int:
    """The world a training run with ``tc`` has: torchrun's inside a launched process, else the config's."""
    return current().size if launched() else tc.world_size


def check_devices(tc: TrainConfig, device: torch.device) -> None:
    """Fail before any rank starts if this machine cannot hold ``tc.nproc_per_node`` ranks on ``device``."""
    if tc.nproc_per_node == 1:
        return
    if device.type == "cuda" and tc.nproc_per_node > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"train.nproc_per_node={tc.nproc_per_node} is more than the {n} GPU{'s' * (n != 1)} "
                          f"this machine has (one rank per GPU): set train.nproc_per_node to at most {n}")
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"train.nproc_per_node={tc.nproc_per_node} needs CUDA GPUs (NCCL) or the CPU (gloo); "
                          f"torch.distributed has no backend for {device.type}: set train.nproc_per_node=1 or "
                          f"train.device=cpu")


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) on CUDA, else ``device``."""
    if world.size == 1 or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"rank {world.rank} has local rank {world.local_rank} but this machine has "
                          f"{torch.cuda.device_count()} GPUs: set train.nproc_per_node to at most that")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the ranks for the block (NCCL on CUDA, gloo on the CPU); leave the group afterwards.
    A world of one joins nothing."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def mean_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In place: the mean of ``tensor`` over the ranks (each rank then holds the same value)."""
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # gloo has no AVG
        tensor.div_(world.size)
    return tensor


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any: all ranks take the same branch."""
    if world.size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def same_on_all_ranks(value: int, world: World, device: torch.device) -> bool:
    """Whether every rank passed the same ``value`` (e.g. the step it resumed from)."""
    if world.size == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # max(v) == -max(-v) == min(v) iff all are equal
    return t[0].item() == -t[1].item()


def data_parallel(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the ranks in ``backward``);
    ``model`` itself in a world of one."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def seed_rank(seed: int, world: World) -> None:
    """Give each rank its own default RNG stream (dropout masks), once the model is built the same on all.
    Rank 0 keeps the stream a single process has."""
    if world.rank > 0:
        torch.manual_seed(seed * 1_000_003 + world.rank)


def rng_states(world: World, device: torch.device) -> dict[str, torch.Tensor]:
    """A collective: rank 0 gets the default RNG states of the other ranks as checkpoint tensors
    (``rng.torch.rank<r>``, ``rng.cuda.rank<r>``); the other ranks get ``{}``, as does a world of one."""
    if world.size == 1:
        return {}
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    gathered = [None] * world.size if world.main else None
    dist.gather_object(mine, gathered, dst=0)
    if not world.main:
        return {}
    return {f"rng.{kind}.rank{r}": state for r, states in enumerate(gathered) if r > 0 for kind, state in states.items()}


def restore_rng_state(tensors: dict[str, torch.Tensor], world: World, device: torch.device) -> None:
    """Put back this rank's default RNG state from a checkpoint (rank 0's is ``rng.torch``, restored with
    the rest of the training state)."""
    if world.rank == 0:
        return
    if f"rng.torch.rank{world.rank}" in tensors:
        torch.set_rng_state(tensors[f"rng.torch.rank{world.rank}"])
    if device.type == "cuda" and f"rng.cuda.rank{world.rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{world.rank}"], device)
