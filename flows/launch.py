"""``ddpm train`` with several ranks: torchrun (``torch.distributed.run``) started from inside the command.

With ``train.nproc_per_node x train.nnodes`` above 1, ``ddpm train`` checks what it can before any rank
starts (GPUs, the batch split, checkpoints of another world size), then runs torchrun's own launcher,
which starts each rank as ``python -m flows.cli train`` with the same arguments and waits for them all.
Rank 0 then does what a single ``ddpm train`` does (MLflow run, checkpoints, model, registration); the
others only train. ``dvc repro`` and the Prefect flow run ``ddpm train`` as before and need nothing new.
"""

from __future__ import annotations

import argparse

from ddpm.config import Config

EXIT_USAGE = 2


class RanksFailed(RuntimeError):
    """A rank failed and torchrun stopped the others; the message says which, how, and from where a
    rerun resumes. ``exit_code``: 2 when the rank failed on a deterministic error (its message is above)."""

    def __init__(self, message: str, exit_code: int):
        self.exit_code = exit_code
        super().__init__(message)


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The ``ddpm train`` arguments each rank runs with: this command's own."""
    argv = ["train", "--params", args.params]
    for override in args.set:
        argv += ["-S", override]
    return argv + ["--fresh"] * bool(args.fresh) + ["--no-track"] * bool(args.no_track)


def torchrun_argv(cfg: Config, argv: list[str]) -> list[str]:
    """torchrun's command line for this config: one machine meets on a free local port (``--standalone``);
    several meet at ``master_addr:master_port`` (static rendezvous, ``node_rank`` per machine)."""
    tc = cfg.train
    out = [f"--nproc-per-node={tc.nproc_per_node}", f"--nnodes={tc.nnodes}", "--max-restarts=0"]
    if tc.nnodes == 1:
        out.append("--standalone")
    else:
        out += [f"--node-rank={tc.node_rank}", f"--master-addr={tc.master_addr}", f"--master-port={tc.master_port}"]
    return out + ["-m", "flows.cli", *argv]


def launch_ranks(args: argparse.Namespace, cfg: Config) -> None:
    """Run ``ddpm train`` as ``train.nproc_per_node`` ranks on this machine (of ``train.nnodes``) and wait."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from ddpm import checkpoint, distributed
    from ddpm.device import resolve_device
    from ddpm.train import checkpoint_dir, refuse_other_world_size
    from flows.signals import Stopped

    tc, prepared = cfg.train, cfg.prepare.out_dir
    distributed.check_devices(tc, resolve_device(tc.device))
    refuse_other_world_size(cfg, prepared, args.fresh, tc.world_size)
    print(f"ddpm train: starting {tc.nproc_per_node} rank{'s' * (tc.nproc_per_node > 1)} on this machine "
          f"(world size {tc.world_size}, global batch {tc.batch_size}, {tc.batch_size // tc.world_size} per rank) "
          f"through torchrun", flush=True)
    try:
        run(get_args_parser().parse_args(torchrun_argv(cfg, rank_argv(args))))
    except SignalException as exc:
        raise Stopped(exc.sigval, "torchrun passed it on to the ranks, which stop together at their next log "
                                  "or checkpoint step and write a checkpoint (above); the next run resumes from "
                                  "it") from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        ckpt_dir = checkpoint_dir(cfg, prepared, tc.world_size)
        found = checkpoint.list_checkpoints(ckpt_dir)
        resume = (f"the last checkpoint is step {checkpoint.step_of(found[-1])} in {ckpt_dir}; run `ddpm train` "
                  f"again to resume from it" if found else
                  "no checkpoint was written yet; run `ddpm train` again to start over")
        deterministic = failure.exitcode == EXIT_USAGE
        raise RanksFailed(f"training rank {rank} of {tc.world_size} {how}"
                          + (" (its message is above)" if deterministic else "")
                          + f", and torchrun stopped the other ranks; {resume}",
                          EXIT_USAGE if deterministic else 1) from None
