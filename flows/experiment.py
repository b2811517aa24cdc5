"""Each flow run that changes results is recorded as a DVC experiment, and overrides never outlive their run.

``ddpm pipeline -S ...`` writes the overrides into params.yaml (as ``dvc exp run -S`` does), runs the stages,
then ``dvc exp save`` records params.yaml, dvc.lock and the metrics as an experiment ref (``dvc exp show``
lists it, ``dvc exp apply <name>`` brings it back, ``dvc exp push origin <name>`` shares it; the outputs are on
the DVC remote; in another clone ``dvc exp pull origin <name> && dvc exp branch <name> <branch> && git checkout
<branch> && dvc pull``). Afterwards the tracked files the run changed are put back as they were before it and
``dvc checkout`` restores the matching outputs, so the next run, scheduled or not, starts from the committed
params. A run without overrides keeps its results in the workspace and is recorded the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from flows import dvc_cache

DVC = [sys.executable, "-m", "dvc"]


def experiment_name(flow_run_name: str | None) -> str:
    """``<flow run name>-<UTC time>``: unique, and a valid git ref name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = "".join(c if c.isalnum() or c == "-" else "-" for c in (flow_run_name or "ddpm-pipeline")).strip("-")
    return f"{base or 'ddpm-pipeline'}-{stamp}"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)


def _modified(root: Path) -> list[str] | None:
    """Tracked files that differ from the commit (None outside a git repository)."""
    out = _git(root, "status", "--porcelain", "--untracked-files=no", "-z")
    return [entry[3:] for entry in out.stdout.split("\0") if len(entry) > 3] if out.returncode == 0 else None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from the commit (None outside a git repository)."""
    modified = _modified(root)
    return None if modified is None else bool(modified)


def recorded_files(root: Path) -> list[str]:
    """What a run writes that git (not the DVC cache) keeps: dvc.lock, the ``cache: false`` outputs and the
    .gitignore files DVC writes beside cached outputs."""
    import os

    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [o for s in repo.index.stages for o in s.outs]
        files = [os.path.relpath(o.fs_path, repo.root_dir) for o in outs if not o.use_cache]
        ignores = {os.path.relpath(os.path.join(os.path.dirname(o.fs_path), ".gitignore"), repo.root_dir)
                   for o in outs if o.use_cache}
    return ["dvc.lock", *files, *sorted(ignores)]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """The bytes (None: absent) of the files a run may change: tracked files that already differ from the
    commit, params.yaml (also where git does not track it), dvc.lock and the ``cache: false`` outputs."""
    paths = dict.fromkeys([*(_modified(root) or []), "params.yaml", *recorded_files(root)])
    return {p: (root / p).read_bytes() if (root / p).is_file() else None for p in paths}


def restore(root: Path, before: dict[str, bytes | None]) -> list[str]:
    """Put back every tracked file the run changed as it was in ``before`` (or the commit), then check the
    outputs dvc.lock names out of the DVC cache. Returns what could not be restored, for the report."""
    problems = []
    for path, data in before.items():
        if data is None:
            (root / path).unlink(missing_ok=True)
        else:
            (root / path).write_bytes(data)
    for path in _modified(root) or []:
        if path not in before and _git(root, "checkout", "HEAD", "--", path).returncode != 0:
            problems.append(f"{path}: git checkout failed")
    out, corrupt = _checkout_sound(root, None, "--quiet")
    if out is not None and out.returncode != 0:
        problems.append(_checkout_problem(out) + " (the next `ddpm pipeline` rebuilds what is missing)")
    return problems + corrupt


def put_back_outputs(root: Path, stage: str, before: dict[str, bytes | None]) -> tuple[list[str], list[str]]:
    """After ``stage`` failed or was stopped: DVC deleted its outputs before running it. The files git keeps
    (``cache: false`` outputs) come back from ``before``, the cached ones from the DVC cache as dvc.lock
    names them (``dvc checkout --force <stage>``, which also drops a half-written output). Returns what came
    back and what could not."""
    restored = []
    for path, data in before.items():
        if data is not None and not (root / path).exists():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
            restored.append(path)
    if stage not in (yaml.safe_load(before.get("dvc.lock") or b"") or {}).get("stages", {}):
        return restored, []  # the stage never finished here: nothing of it to bring back
    out, corrupt = _checkout_sound(root, [stage], "--force")
    if out is None:
        return restored, corrupt
    restored += [ln[1:].strip() for ln in out.stdout.splitlines() if ln[:1] in ("A", "M") and ln[1:2].isspace()]
    return restored, ([] if out.returncode == 0 else [_checkout_problem(out)]) + corrupt


def _checkout_sound(root: Path, stages: list[str] | None, *args: str
                    ) -> tuple[subprocess.CompletedProcess | None, list[str]]:
    """``dvc checkout`` of ``stages`` (None: all), leaving out each stage with a corrupt cache file, which DVC
    would check out without a word. Returns DVC's result (None: nothing was left to check out) and the
    problem line that names the corrupt files and the fix."""
    corrupt = dvc_cache.corrupt_files(root, stages)
    if not corrupt:
        return _dvc_checkout(root, *args, *(stages or [])), []
    problem = str(dvc_cache.CorruptCache(corrupt, "not checked out"))
    bad = {c.stage for c in corrupt}
    locked = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}) if stages is None else {}
    sound = [s for s in (stages or locked) if s not in bad]
    return (_dvc_checkout(root, *args, *sound) if sound else None), [problem]


def _dvc_checkout(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DVC, "checkout", *args], cwd=root, capture_output=True, text=True, timeout=600)


def _checkout_problem(out: subprocess.CompletedProcess) -> str:
    return "dvc checkout: " + (out.stderr.strip().splitlines() or ["failed"])[-1]


def save(root: Path, name: str) -> str:
    """``dvc exp save -n name``: the workspace's params, dvc.lock and metrics (also when git does not track
    them yet) as an experiment commit."""
    include = [arg for p in recorded_files(root) if (root / p).is_file() for arg in ("-I", p)]
    out = subprocess.run([*DVC, "exp", "save", "-n", name, *include], cwd=root, capture_output=True, text=True,
                         timeout=300, env=_with_git_identity(root))
    if out.returncode != 0:
        lines = (out.stderr + out.stdout).splitlines()
        reason = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else str(out.returncode))
        raise RuntimeError(f"dvc exp save -n {name} failed: {reason}")
    return name


def _with_git_identity(root: Path) -> dict[str, str]:
    """An experiment is a git commit: where git has no user configured (a fresh machine, a CI runner), sign
    it as the pipeline instead of failing."""
    import os

    env = dict(os.environ)
    if not _git(root, "config", "user.email").stdout.strip() and "GIT_AUTHOR_EMAIL" not in env:
        env.update(GIT_AUTHOR_NAME="ddpm pipeline", GIT_AUTHOR_EMAIL="ddpm@localhost",
                   GIT_COMMITTER_NAME="ddpm pipeline", GIT_COMMITTER_EMAIL="ddpm@localhost")
    return env
