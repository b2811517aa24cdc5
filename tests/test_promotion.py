"""The promotion gate on a real MLflow registry (SQLite store in a temp dir)."""

from __future__ import annotations

import pytest

from flows.promotion import CANDIDATE, CHAMPION, model_metric, promote

METRIC = "fd_classifier_n256"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); one registered model per test."""
    from mlflow import MlflowClient

    import mlflow

    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # the registry resolves a models:/m-... source through the default client
    c = MlflowClient(uri, uri)
    exp = c.create_experiment("gate", artifact_location=(d / "artifacts").as_uri())
    return c, exp


@pytest.fixture
def client(store, request):
    c, exp = store
    c.name = request.node.name
    c.create_registered_model(c.name)
    c.run_ids = [c.create_run(exp).info.run_id for _ in range(3)]
    c.exp = exp
    return c


def new_version(client, i: int, value: float | None, metric: str = METRIC) -> str:
    """A version of a logged model, with ``metric`` logged on that model as the evaluate stage does."""
    run_id = client.run_ids[i]
    model = client.create_logged_model(client.exp, name="model", source_run_id=run_id)
    mv = client.create_model_version(client.name, source=model.model_uri, run_id=run_id, model_id=model.model_id)
    if value is not None:
        client.log_metric(run_id, metric, value, model_id=model.model_id)
        assert model_metric(client, mv, metric) == value
    return str(mv.version)


def aliases(client) -> dict[str, str]:
    return {a: str(client.get_model_version_by_alias(client.name, a).version) for a in (CANDIDATE, CHAMPION)}


def test_first_version_becomes_champion(client):
    v1 = new_version(client, 0, 3.0)
    d = promote(client, client.name, v1, METRIC, 3.0)
    assert d.promoted and d.champion_version is None and d.reason == "no champion yet"
    assert aliases(client) == {CANDIDATE: v1, CHAMPION: v1}


def test_better_moves_champion_worse_does_not(client):
    v1 = new_version(client, 0, 3.0)
    promote(client, client.name, v1, METRIC, 3.0)
    v2 = new_version(client, 1, 2.5)  # lower Frechet distance: better
    d2 = promote(client, client.name, v2, METRIC, 2.5)
    assert d2.promoted and (d2.champion_version, d2.champion_value) == (v1, 3.0)
    assert aliases(client) == {CANDIDATE: v2, CHAMPION: v2}
    v3 = new_version(client, 2, 2.7)
    d3 = promote(client, client.name, v3, METRIC, 2.7)
    assert not d3.promoted and "does not beat champion v2's 2.5" in d3.reason
    assert aliases(client) == {CANDIDATE: v3, CHAMPION: v2}
    assert client.get_model_version(client.name, v3).tags["ddpm.promotion"] == d3.reason


def test_maximize_goal(client):
    v1 = new_version(client, 0, 0.80, "classifier_accuracy")
    promote(client, client.name, v1, "classifier_accuracy", 0.80, goal="maximize")
    v2 = new_version(client, 1, 0.85, "classifier_accuracy")
    assert promote(client, client.name, v2, "classifier_accuracy", 0.85, goal="maximize").promoted
    with pytest.raises(ValueError, match="goal='lowest'"):
        promote(client, client.name, v2, "classifier_accuracy", 0.85, goal="lowest")


def test_numbers_at_another_n_are_not_compared(client):
    v1 = new_version(client, 0, 9.0, "fd_classifier_n64")
    promote(client, client.name, v1, "fd_classifier_n64", 9.0)
    v2 = new_version(client, 1, 1.0)
    d = promote(client, client.name, v2, METRIC, 1.0)
    assert not d.promoted and "not comparable" in d.reason
    assert aliases(client)[CHAMPION] == v1


def test_reevaluating_the_champion_changes_nothing(client):
    v1 = new_version(client, 0, 3.0)
    promote(client, client.name, v1, METRIC, 3.0)
    d = promote(client, client.name, v1, METRIC, 3.0)
    assert not d.promoted and d.reason == "already champion"
    assert aliases(client) == {CANDIDATE: v1, CHAMPION: v1}
