"""The prepare stage under real DVC: the image folder is a dependency, outputs travel through a remote."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import make_project, run
from tests.test_prepare_folder import make_messy_folder

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
OUTPUTS = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "manifest.json")


def folder_project(base: Path) -> tuple[Path, Path, dict]:
    """A temporary git + DVC project whose prepare stage reads a generated image folder."""
    photos = make_messy_folder(base / "photos")
    project = make_project(base / "project")
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["prepare"].update(source="imagefolder", source_path=str(photos), resolution=8, num_proc=1)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "prepare an image folder"], project)
    return project, photos, fresh_shell(project, base)


def fresh_shell(project: Path, base: Path) -> dict:
    """The README's setting: the project's .venv (here a link to the one running the tests), and a PATH
    without it, as in a shell that never activated it. DVC's stage commands must still find ddpm."""
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return {"HOME": os.environ.get("HOME", str(base)), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
            "HF_DATASETS_CACHE": str(base / "hf-cache"), "DVC_NO_ANALYTICS": "1"}


def manifest(project: Path) -> dict:
    return json.loads((project / "data" / "prepared" / "manifest.json").read_text())


def test_new_image_reruns_prepare_and_a_fresh_clone_pulls_the_same_bytes(tmp_path):
    project, photos, env = folder_project(tmp_path)
    first = run(DVC + ["repro", "prepare"], project, env=env).stdout
    assert "Running stage 'prepare'" in first
    before = manifest(project)
    assert before["splits"]["train"]["count"] + before["splits"]["test"]["count"] == 8
    assert "Data and pipelines are up to date" in run(DVC + ["status", "prepare"], project, env=env).stdout
    assert "didn't change, skipping" in run(DVC + ["repro", "prepare"], project, env=env).stdout

    Image.new("RGB", (12, 12), (200, 10, 10)).save(photos / "cats" / "new.png")
    status = run(DVC + ["status", "prepare"], project, env=env).stdout
    assert "changed deps" in status and str(photos) in status
    assert "Running stage 'prepare'" in run(DVC + ["repro", "prepare"], project, env=env).stdout
    after = manifest(project)
    assert after["content_hash"] != before["content_hash"]
    assert after["splits"]["train"]["count"] + after["splits"]["test"]["count"] == 9

    run(DVC + ["push"], project, env=env)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "prepared data"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data" / "prepared").exists()
    run(DVC + ["pull", "prepare"], clone, env=env)
    for name in OUTPUTS:
        assert (clone / "data" / "prepared" / name).read_bytes() == (project / "data" / "prepared" / name).read_bytes()
    assert "Data and pipelines are up to date" in run(DVC + ["status", "prepare"], clone, env=env).stdout


def test_dvc_exp_run_sets_the_resolution(tmp_path):
    project, _, env = folder_project(tmp_path)
    run(DVC + ["exp", "run", "-S", "prepare.resolution=12", "prepare"], project, env=env)
    assert manifest(project)["shape"] == [3, 12, 12]
    assert yaml.safe_load((project / "params.yaml").read_text())["prepare"]["resolution"] == 12


def test_hub_source_is_tracked_through_params(tmp_path):
    """No local path identifies a hub data set: DVC sees hub_id / revision / split as params.
    Here the 'hub id' is a local repository folder, which load_dataset reads with the same code."""
    from tests.test_sources import hub_like_repo

    repo = hub_like_repo(tmp_path / "repo")
    project = make_project(tmp_path / "project")
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["prepare"].update(source="hub", hub_id=str(repo), revision="v1", source_path="ddpm/sources.py",
                             resolution=4, num_proc=1)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = fresh_shell(project, tmp_path)
    run(DVC + ["repro", "prepare"], project, env=env)
    assert manifest(project)["source"] == {
        "kind": "hub", "hub_id": str(repo), "revision": "v1", "resolved_revision": None, "split": "train",
        "test_split": "test", "image_column": "image", "labels": "label"}
    assert "Data and pipelines are up to date" in run(DVC + ["status", "prepare"], project, env=env).stdout
    params["prepare"]["revision"] = "v2"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(DVC + ["status", "prepare"], project, env=env).stdout
    assert "params.yaml" in status and "modified:" in status  # the whole prepare section is one DVC param


def test_stage_commands_say_how_to_install_ddpm_when_it_is_nowhere(tmp_path):
    project, _, env = folder_project(tmp_path)
    (project / ".venv").unlink()
    out = run(DVC + ["repro", "prepare"], project, check=False, env=env)
    assert out.returncode != 0
    assert "the ddpm command is not installed: run 'make setup'" in out.stdout + out.stderr
