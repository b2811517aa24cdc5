"""A real full disk while `ddpm train` writes a checkpoint: one clear error line, nothing lost, resume after.

The disk is a small tmpfs mounted over train.checkpoint_dir inside an unprivileged user + mount namespace
(`unshare -rm`), so the kernel itself answers ENOSPC; no root, no mocks. Where user namespaces are not
allowed the test is skipped (tests/test_train.py's file-size-limit test then still covers a failed write).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm import checkpoint
from ddpm.train import checkpoint_dir, train
from tests.test_train import PROJECT_ROOT, make_prepared, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# Inside the namespace: a tmpfs over the checkpoint folder, most of it taken by a ballast file; train until the
# disk is full, free the space, copy out what the failed run left, train again. The tmpfs dies with the namespace.
SCRIPT = r"""
set -eu
mount -t tmpfs -o "size=$SIZE" tmpfs "$CKPT"
head -c "$BALLAST" /dev/zero > "$CKPT/ballast"
rc=0; "$PY" -m flows.cli train --no-track --params "$PARAMS" > "$OUT/full.out" 2> "$OUT/full.err" || rc=$?
echo $rc > "$OUT/full.rc"
rm "$CKPT/ballast"
cp -a "$CKPT" "$OUT/after-full"
rc=0; "$PY" -m flows.cli train --no-track --params "$PARAMS" > "$OUT/freed.out" 2> "$OUT/freed.err" || rc=$?
echo $rc > "$OUT/freed.rc"
"""


def _user_namespaces(tmp_path: Path) -> str | None:
    """Why a tmpfs cannot be mounted in a user namespace here (None: it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = tmp_path / "probe"
    probe.mkdir()
    out = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                         capture_output=True, text=True, timeout=30)
    return None if out.returncode == 0 else f"unshare -rm + mount tmpfs failed: {out.stderr.strip()}"


def _checkpoint_bytes(prepared: Path, run_dir: Path) -> int:
    """The size of one checkpoint of the tiny model, from a 3-step run on the ordinary disk."""
    result = train(tiny_cfg(run_dir, train={"steps": 3}), prepared)
    return checkpoint.step_path(result.checkpoint_dir, 3).stat().st_size


def test_a_full_disk_stops_training_with_one_line_and_the_next_run_resumes(tmp_path):
    why_not = _user_namespaces(tmp_path)
    if why_not:
        pytest.skip(why_not)
    prepared = make_prepared(tmp_path / "data")
    size = _checkpoint_bytes(prepared, tmp_path / "probe-run")
    cfg = tiny_cfg(tmp_path / "run", train={"checkpoint_every_steps": 3})
    raw = cfg.to_dict()
    raw["prepare"]["out_dir"] = str(prepared)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(raw))  # JSON is YAML
    ckpt_root, out = Path(cfg.train.checkpoint_dir), tmp_path / "out"
    ckpt_root.mkdir(parents=True)
    out.mkdir()
    # room for the checkpoint at step 3 and half of the next one
    disk, free = 16 * 2**20, size * 3 // 2
    env = {"SIZE": str(disk), "BALLAST": str(disk - free), "CKPT": str(ckpt_root), "PY": sys.executable,
           "PARAMS": str(params), "OUT": str(out), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", SCRIPT], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ckpt_dir = checkpoint_dir(cfg, prepared)
    full_dir = out / "after-full" / ckpt_dir.name

    # the disk filled at step 6: exit 2, the reason as the last line, no traceback
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"ddpm train: error: could not write checkpoint {re.escape(str(ckpt_dir))}/step-000000006\.safetensors: "
        r"\[Errno 28\] No space left on device \(\d+\.\d KiB needed, \d+\.\d KiB free there\); free space on that "
        r"disk or set train\.checkpoint_dir to one with room; the next run resumes from step 3, whose checkpoint "
        r"is untouched", last), last
    # nothing half-written beside the good checkpoint, which still verifies
    assert sorted(p.name for p in full_dir.iterdir()) == ["step-000000003.safetensors"]
    assert checkpoint.load(full_dir / "step-000000003.safetensors")[1]["step"] == 3
    assert "trained to step" not in (out / "full.out").read_text()

    # space freed: the next run resumes from step 3 and finishes
    freed_out = (out / "freed.out").read_text()
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.err").read_text()[-3000:]
    assert f"resuming from {ckpt_dir}/step-000000003.safetensors at step 3" in freed_out
    summary = json.loads((tmp_path / "run" / "models" / "mlflow.json").read_text())  # the run file, untracked too
    assert (summary["resumed_from_step"], summary["steps"]) == (3, 12)
