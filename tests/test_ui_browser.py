"""The MLflow UI renders a run: a real `mlflow server` and headless Chromium dumping the page's DOM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_operations import base_env, mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_mlflow_ui_shows_a_run_in_a_headless_browser(tmp_path):
    from mlflow import MlflowClient

    with mlflow_server(tmp_path / "mlflow") as server:
        client = MlflowClient(server["url"])
        exp_id = client.create_experiment("ui-check")
        run = client.create_run(exp_id, run_name="ui-check-run-4711")
        for step in range(3):
            client.log_metric(run.info.run_id, "ui_check_loss", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
        url = f"{server['url']}/#/experiments/{exp_id}/runs/{run.info.run_id}"
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
               "--virtual-time-budget=15000", "--dump-dom", url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=base_env())
        dom = out.stdout
        assert "ui-check-run-4711" in dom, f"rc={out.returncode}\n{dom[-3000:]}\n{out.stderr[-3000:]}"
        assert "ui_check_loss" in dom, dom[-3000:]
