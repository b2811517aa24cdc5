"""Crash-safe checkpoints in one safetensors file each.

A checkpoint holds tensors (model, EMA, optimizer moments, RNG states) and a
JSON metadata block. Files are written to a temporary name, fsynced, then
renamed, so a killed process leaves either the old or the new file, never half
of one. A sha256 over the tensor bytes, stored in the metadata, catches
corruption that the safetensors header alone would miss.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_NAME = re.compile(r"step-(\d{9})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors + JSON-able ``meta`` atomically to ``path``."""
    _write_atomic(Path(path), _serialize(tensors, meta))


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"meta": json.dumps(meta), "sha256": _digest(tensors)})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no partial file behind
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify one checkpoint; raises ``CheckpointError`` if it is missing or damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        info = header.get("__metadata__") or {}
        meta = json.loads(info["meta"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc})") from None
    if info.get("sha256") != _digest(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: tensor checksum does not match")
    return tensors, meta


def step_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.safetensors"


def step_of(path: str | Path) -> int:
    """The step in a checkpoint's file name (``step-000000200.safetensors`` -> 200)."""
    return int(_NAME.search(Path(path).name).group(1))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.search(p.name)), key=step_of)


def latest_valid(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that loads; damaged newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            tensors, meta = load(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", stacklevel=2)
            continue
        return path, tensors, meta
    return None


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)


def _write_error(path: Path, nbytes: int, exc: OSError) -> CheckpointError:
    """What a failed write of ``nbytes`` to ``path`` tells the user: the errno text, on a full disk the space
    needed and free and what to do, and from which step a rerun resumes (the earlier files are untouched)."""
    reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno else str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += (f" ({_size(nbytes)} needed, {_free(path.parent)} free there); free space on that disk or set "
                   "train.checkpoint_dir to one with room")
    earlier = list_checkpoints(path.parent)
    resume = (f"the next run resumes from step {step_of(earlier[-1])}, whose checkpoint is untouched" if earlier
              else "no checkpoint was written yet, the next run starts from step 0")
    return CheckpointError(f"could not write checkpoint {path}: {reason}; {resume}")


def _free(directory: Path) -> str:
    try:
        return _size(shutil.disk_usage(directory).free)
    except OSError:
        return "unknown"


def _size(nbytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    power = min(3, (max(nbytes, 1).bit_length() - 1) // 10)
    return f"{nbytes} bytes" if power == 0 else f"{nbytes / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


class BackgroundWriter:
    """Writes checkpoints on one background thread, so training goes on while a file is
    hashed, written and fsynced. ``submit`` snapshots the tensors first (a copy on the CPU),
    so later in-place updates cannot reach the file; at most one write is in flight.
    Each file is still atomic and verified, as with ``save``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: tuple[Path, Future] | None = None

    def submit(self, path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> None:
        """Queue ``tensors`` + ``meta`` for ``path``, then keep the newest ``keep`` checkpoints of its folder."""
        self.wait()
        snapshot = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
        path = Path(path)
        self._pending = (path, self._pool.submit(self._write, path, snapshot, meta, keep))

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> None:
        data = _serialize(tensors, meta)
        try:
            _write_atomic(path, data)
        except OSError as exc:
            raise _write_error(path, len(data), exc) from exc
        prune(path.parent, keep)

    def wait(self) -> Path | None:
        """Block until the write in flight is on disk and return its path (None if there was none);
        a failed write raises here, on the training thread."""
        if self._pending is None:
            return None
        (path, future), self._pending = self._pending, None
        future.result()
        return path

    def close(self) -> None:
        """Finish the write in flight (its error, if any, is not raised again) and stop the thread."""
        self._pool.shutdown(wait=True)
