"""Whether the DVC cache still holds what dvc.lock says, and whether a push really reached the remote.

DVC (3.67) trusts a read-only cache file without hashing it again: one whose bytes changed on disk (bit rot,
a tool that wrote through the protection) is checked out and pushed to the remote under its good name, and
``dvc status`` stays clean. A cache file left writable is hashed by ``dvc push``, found corrupt and deleted,
and the push still ends ``Everything is up to date.`` with exit 0; the remote then lacks it. ``dvc repro
--force`` does not mend either: a corrupt file in the cache wins over the rebuilt output. So each cache file
an output in dvc.lock names is hashed again here, with DVC's own hash function, before a push, and after it
``dvc status --cloud`` must list nothing as new or missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flows import dvc_remote


@dataclass(frozen=True)
class CorruptFile:
    """A cache file whose bytes no longer hash to its name; paths relative to the repository root."""

    stage: str
    output: str  # the workspace path it holds (a file inside a directory output, or the directory itself)
    cache_file: str


class CorruptCache(RuntimeError):
    """Cache files of tracked outputs are corrupt; the message names them, their outputs and the fix."""

    def __init__(self, corrupt: Sequence[CorruptFile], what: str):
        self.corrupt = list(corrupt)
        files = "; ".join(f"{c.cache_file} (holds {c.output} of stage {c.stage})" for c in self.corrupt)
        stages = " ".join(dict.fromkeys(c.stage for c in self.corrupt))
        removal = " ".join(c.cache_file for c in self.corrupt)
        super().__init__(f"{what}: {len(self.corrupt)} DVC cache file(s) no longer match their hash: {files}. "
                         f"Delete them and rebuild: `rm -f {removal} && dvc repro --force {stages}` "
                         "(DVC would otherwise keep serving the corrupt bytes)")


class PushIncomplete(RuntimeError):
    """``dvc push`` ended without error, yet ``dvc status --cloud`` says the remote lacks some outputs."""


def corrupt_files(root: Path, stages: Sequence[str] | None = None) -> list[CorruptFile]:
    """Cache files of the outputs dvc.lock names (of ``stages``, or all) whose bytes no longer hash to their
    name. Cache files that are absent are not listed (``dvc status`` reports those)."""
    from dvc.repo import Repo

    with in_dir(root), Repo(str(root)) as repo:  # stage names relative to the root
        return _corrupt_in_repo(repo, stages)


def _corrupt_in_repo(repo, stages: Sequence[str] | None) -> list[CorruptFile]:
    found = []
    for stage in repo.index.stages:
        if stages is not None and stage.addressing not in stages:
            continue
        for out in stage.outs:
            if out.use_cache and out.hash_info and out.hash_info.value:
                found += [CorruptFile(stage.addressing, os.path.relpath(path, repo.root_dir),
                                      os.path.relpath(cache_file, repo.root_dir))
                          for path, cache_file in _corrupt_in(out)]
    return found


def _corrupt_in(out) -> Iterator[tuple[str, str]]:
    """(workspace path, cache file) of each corrupt cache file of one output; a directory output is its
    listing (a ``.dir`` object) and one cache file per file in it."""
    from dvc_data.hashfile.tree import Tree

    if _is_corrupt(out.cache, out.hash_info):
        yield out.fs_path, out.cache.oid_to_path(out.hash_info.value)
        return
    if not out.hash_info.isdir or not os.path.exists(out.cache.oid_to_path(out.hash_info.value)):
        return
    for key, _, hash_info in Tree.load(out.cache, out.hash_info):
        if _is_corrupt(out.cache, hash_info):
            yield os.path.join(out.fs_path, *key), out.cache.oid_to_path(hash_info.value)


def _is_corrupt(cache, hash_info) -> bool:
    """Hash the cache file itself, as DVC's ``check`` does for a writable one, but also for a read-only one
    and without the hash DVC remembers for it."""
    from dvc_data.hashfile.hash import file_md5

    path = cache.oid_to_path(hash_info.value)
    if not os.path.exists(path):
        return False
    return file_md5(path, name=hash_info.name) != hash_info.value.split(".")[0]


def push(root: Path) -> int:
    """``dvc push`` to the default remote, checked: refused (nothing pushed) while a cache file of a tracked
    output is corrupt, and afterwards ``dvc status --cloud`` must list nothing as new or missing. Returns
    the number of files pushed."""
    from dvc.repo import Repo

    with in_dir(root), Repo(str(root)) as repo:
        corrupt = _corrupt_in_repo(repo, None)
        if corrupt:
            raise CorruptCache(corrupt, "dvc push refused, nothing was pushed")
        try:
            pushed = repo.push()
            absent = {path: state for path, state in repo.status(cloud=True).items() if state in ("new", "missing")}
        except Exception as exc:
            explained = dvc_remote.explain(repo, exc, "dvc push")
            if explained is None:
                raise
            raise explained from None
    if absent:
        listed = ", ".join(f"{path} ({state})" for path, state in sorted(absent.items()))
        raise PushIncomplete(f"dvc push reported success, but the remote lacks {listed} (`dvc status -c`); run "
                             "`dvc push` again, and `dvc repro --force <stage>` for what is missing locally too")
    return pushed


@contextlib.contextmanager
def in_dir(root: Path):
    """DVC resolves some stage paths against the working directory, as its CLI runs from the root."""
    before = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)
