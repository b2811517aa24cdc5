"""The promotion gate between registered model versions.

Every evaluated version gets the alias ``candidate``. The alias ``champion``
moves to it only when its primary metric beats the current champion's on the
same metric name (names carry their sample count N, so numbers measured at
different N are never compared). The first evaluated version becomes champion.
The evaluate stage logs its metrics on the version's logged model (MLflow 3's
``LoggedModel``: the Models tab of the experiment, and the version's page), so
the champion's value is read from its model, whichever run logged it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    metric: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None  # the champion before this decision
    champion_value: float | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise


def logged_model_id(version) -> str | None:
    """The logged model a registered version was made from: its ``model_id``, which MLflow's SQL registry does
    not keep, else the ``models:/m-...`` source that ``log_model(registered_model_name=...)`` gives it."""
    import re

    found = re.fullmatch(r"models:/(m-[0-9a-f]+)", version.source or "")
    return getattr(version, "model_id", None) or (found.group(1) if found else None)


def model_metric(client, version, metric: str) -> float | None:
    """The newest value of ``metric`` logged on the model version's logged model, if any."""
    model_id = logged_model_id(version)
    if model_id is None:
        return None
    found = [m for m in client.get_logged_model(model_id).metrics or [] if m.key == metric]
    return max(found, key=lambda m: m.timestamp).value if found else None


def promote(client, name: str, version: str, metric: str, value: float, goal: str = "minimize") -> Decision:
    """Apply the gate for ``version`` whose ``metric`` is ``value``; returns what was decided."""
    if goal not in ("minimize", "maximize"):
        raise ValueError(f"goal={goal!r}; choose minimize or maximize")
    version = str(version)
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _alias_version(client, name, CHAMPION)
    champ_version = str(champion.version) if champion is not None else None
    champ_value = None
    if champion is None:
        promoted, reason = True, "no champion yet"
    elif champ_version == version:
        promoted, reason = False, "already champion"
        champ_value = value
    else:
        champ_value = model_metric(client, champion, metric)
        if champ_value is None:
            promoted, reason = False, f"champion v{champ_version} has no {metric}: not comparable, kept"
        else:
            better = value < champ_value if goal == "minimize" else value > champ_value
            promoted = better
            reason = (f"{metric} {value:g} {'beats' if better else 'does not beat'} "
                      f"champion v{champ_version}'s {champ_value:g} ({goal})")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    decision = Decision(promoted, metric, version, value, champ_version, champ_value, reason)
    client.set_model_version_tag(name, version, "ddpm.promotion", reason)
    return decision
