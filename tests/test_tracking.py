"""Where the MLflow store keeps artifacts (flows/tracking.py)."""

from __future__ import annotations

from flows import tracking


def test_artifacts_go_beside_an_sqlite_store_and_a_server_chooses_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.artifact_root(tmp_path) == (tmp_path / "mlartifacts").as_uri()  # the default store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'stores' / 'other.db'}")
    assert tracking.artifact_root(tmp_path) == (tmp_path / "stores" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.artifact_root(tmp_path) is None

