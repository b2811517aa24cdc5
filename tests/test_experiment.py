"""flows/experiment.py on a real git + DVC repository: save a run as an experiment, put the workspace back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import dvc_cache, experiment

DVC = [sys.executable, "-m", "dvc"]


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def repo(tmp_path):
    """One stage: params.yaml's `a` copied into a cached output and an uncached metric."""
    sh(["git", "init", "-q", "-b", "main"], tmp_path)
    sh(["git", "config", "user.email", "tests@example.invalid"], tmp_path)
    sh(["git", "config", "user.name", "tests"], tmp_path)
    sh(DVC + ["init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "run.py").write_text("import json, yaml\na = yaml.safe_load(open('params.yaml'))['a']\n"
                                     "open('out.txt', 'w').write(str(a))\njson.dump({'m': a * 10}, open('m.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: {sys.executable} run.py\n    deps: [run.py]\n"
                                       "    params: [a]\n    outs: [out.txt]\n    metrics: [{m.json: {cache: false}}]\n")
    sh(DVC + ["repro", "-q"], tmp_path)
    sh(["git", "add", "-A"], tmp_path)
    sh(["git", "commit", "-qm", "a = 1"], tmp_path)
    return tmp_path


def test_save_records_the_run_and_restore_puts_the_workspace_back(repo):
    before = experiment.snapshot(repo)
    (repo / "params.yaml").write_text("a: 2\n")
    sh(DVC + ["repro", "-q"], repo)
    name = experiment.save(repo, experiment.experiment_name("brave otter"))
    assert name.startswith("brave-otter-")
    assert experiment.restore(repo, before) == []
    assert (repo / "params.yaml").read_text() == "a: 1\n" and (repo / "out.txt").read_text() == "1"
    assert json.loads((repo / "m.json").read_text()) == {"m": 10}
    assert sh(["git", "status", "--porcelain"], repo) == "" and "up to date" in sh(DVC + ["status"], repo)
    sh(DVC + ["exp", "apply", name], repo)  # the experiment brings a = 2 back, with its output and metric
    assert (repo / "params.yaml").read_text() == "a: 2\n" and (repo / "out.txt").read_text() == "2"
    assert json.loads((repo / "m.json").read_text()) == {"m": 20}


def test_save_without_a_git_identity_signs_as_the_pipeline(repo, tmp_path_factory):
    sh(["git", "config", "--unset", "user.email"], repo)
    sh(["git", "config", "--unset", "user.name"], repo)
    (repo / "params.yaml").write_text("a: 3\n")
    sh(DVC + ["repro", "-q"], repo)
    home = tmp_path_factory.mktemp("home")  # no ~/.gitconfig
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"HOME": str(home)}
    code = "import sys; from pathlib import Path; from flows import experiment; print(experiment.save(Path('.'), 'x'))"
    sh([sys.executable, "-c", code], repo, env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    ref = sh(["git", "for-each-ref", "--format=%(refname) %(authorname)", "refs/exps"], repo)
    assert any(line.endswith("/x ddpm pipeline") for line in ref.splitlines()), ref


def test_a_failed_save_names_dvcs_error(repo):
    (repo / "params.yaml").write_text("a: 4\n")
    sh(DVC + ["repro", "-q"], repo)
    experiment.save(repo, "twice")
    with pytest.raises(RuntimeError, match=r"dvc exp save -n twice failed: ERROR: .*twice"):
        experiment.save(repo, "twice")


def test_the_outputs_of_a_stage_that_did_not_finish_come_back(repo):
    """DVC deletes a stage's outputs before running it; after a failed or stopped run the cached one comes
    back from the cache (a half-written file replaced) and the committed uncached one from the snapshot."""
    before = experiment.snapshot(repo)
    (repo / "out.txt").write_text("half written")
    (repo / "m.json").unlink()
    restored, problems = experiment.put_back_outputs(repo, "s", before)
    assert problems == [] and sorted(restored) == ["m.json", "out.txt"], (restored, problems)
    assert (repo / "out.txt").read_text() == "1" and json.loads((repo / "m.json").read_text()) == {"m": 10}
    assert sh(["git", "status", "--porcelain"], repo) == ""


# -- a corrupt DVC cache file: push refuses and names it, checkout leaves it out -----------------------------

def cache_file(repo: Path, output: str = "out.txt", stage: str = "s") -> Path:
    outs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]
    md5 = next(out["md5"] for out in outs if out["path"] == output)
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def corrupt(path: Path, mode: int) -> None:
    """Flip one bit but keep the size and mtime, as bit rot would; leave the file with ``mode`` (DVC's own
    0o444 makes DVC trust it; 0o644 makes `dvc push` hash it and drop it)."""
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.chmod(mode)


def with_remote(repo: Path, tmp_path_factory) -> Path:
    remote = tmp_path_factory.mktemp("remote")
    sh(DVC + ["remote", "add", "-q", "-d", "r", str(remote)], repo)
    return remote


@pytest.mark.parametrize("mode", [0o444, 0o644], ids=["read-only", "writable"])
def test_push_refuses_a_corrupt_cache_file_and_its_fix_works(repo, tmp_path_factory, mode):
    remote = with_remote(repo, tmp_path_factory)
    bad = cache_file(repo)
    corrupt(bad, mode)
    with pytest.raises(dvc_cache.CorruptCache) as caught:
        dvc_cache.push(repo)
    rel = bad.relative_to(repo)
    assert str(caught.value) == (
        f"dvc push refused, nothing was pushed: 1 DVC cache file(s) no longer match their hash: {rel} (holds "
        f"out.txt of stage s). Delete them and rebuild: `rm -f {rel} && dvc repro --force s` (DVC would otherwise "
        "keep serving the corrupt bytes)")
    assert list(remote.rglob("*")) == [] and bad.exists()  # nothing pushed, nothing deleted
    sh(["rm", "-f", str(rel)], repo)  # the fix, as the message says it
    sh(DVC + ["repro", "-q", "--force", "s"], repo)
    assert dvc_cache.push(repo) == 1
    assert json.loads(sh(DVC + ["status", "-c", "--json"], repo)) == {}
    assert (remote / rel.relative_to(".dvc/cache")).read_text() == "1"


def test_a_push_that_leaves_an_output_off_the_remote_fails(repo, tmp_path_factory):
    """A cache file gone (as after DVC dropped a corrupt one): `dvc push` says "Everything is up to date"."""
    with_remote(repo, tmp_path_factory)
    cache_file(repo).unlink()
    with pytest.raises(dvc_cache.PushIncomplete, match=r"^dvc push reported success, but the remote lacks out\.txt "
                                                       r"\(missing\) \(`dvc status -c`\)"):
        dvc_cache.push(repo)


def test_checkout_leaves_out_a_stage_with_a_corrupt_cache_file(repo):
    """`dvc checkout` would copy the corrupt bytes into the workspace and `dvc status` would stay clean."""
    (repo / "dvc.yaml").write_text((repo / "dvc.yaml").read_text() + f"  d:\n    cmd: {sys.executable} -c \"import os; "
                                   "os.makedirs('dir', exist_ok=True); open('dir/a', 'w').write('a'); "
                                   "open('dir/b', 'w').write('b')\"\n    outs: [dir]\n")
    sh(DVC + ["repro", "-q"], repo)
    before = experiment.snapshot(repo)
    b_md5 = next(f for f in json.loads(cache_file(repo, "dir", "d").read_text()) if f["relpath"] == "b")["md5"]
    bad = repo / ".dvc" / "cache" / "files" / "md5" / b_md5[:2] / b_md5[2:]
    corrupt(bad, 0o444)
    (repo / "out.txt").unlink()
    shutil.rmtree(repo / "dir")
    expected = (f"not checked out: 1 DVC cache file(s) no longer match their hash: {bad.relative_to(repo)} (holds "
                f"dir/b of stage d). Delete them and rebuild: `rm -f {bad.relative_to(repo)} && dvc repro --force d`")
    restored, problems = experiment.put_back_outputs(repo, "d", before)
    assert restored == [] and [p[:len(expected)] for p in problems] == [expected]
    assert not (repo / "dir").exists()
    problems = experiment.restore(repo, before)  # the sound stage comes back, the corrupt one stays out
    assert [p[:len(expected)] for p in problems] == [expected]
    assert (repo / "out.txt").read_text() == "1" and not (repo / "dir").exists()
