"""What a registered model version may carry before the project loads it.

A pickle (``python_model.pkl`` of a pyfunc logged as an object, any ``.pkl``) runs whatever code whoever
registered the version put in it, on every machine that loads it. The project registers its pyfunc as
code (flows/mlflow_model.py) and loads only ``model.safetensors``; a version with a pickle is refused
unless ``DDPM_TRUST_PICKLES=1`` says the store is trusted. The weights must also hash to the sha256 the
training run logged at registration (``ddpm.weights_sha256``), so a file swapped in the artifact store
afterwards is not loaded either.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TRUST_ENV = "DDPM_TRUST_PICKLES"
WEIGHTS_TAG = "ddpm.weights_sha256"
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib")


class UnsafeModel(ValueError):
    """A model version the project will not load: it carries a pickle, or its weights were changed."""


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pickles_in(folder: str | Path) -> list[str]:
    """Files under ``folder`` that unpickling would run, relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name.endswith(_PICKLE_SUFFIXES))


def check_version(ref: str, version: str, local: Path, weights: Path | None, logged_sha256: str | None) -> None:
    """Raise :class:`UnsafeModel` naming ``ref`` if the downloaded version ``local`` carries a pickle (and
    pickles are not trusted) or its weights do not hash to what its run logged."""
    pickles = pickles_in(local)
    if pickles and os.environ.get(TRUST_ENV) != "1":
        raise UnsafeModel(
            f"model {ref} (version {version}) carries a pickle ({', '.join(pickles)}): loading it would run "
            f"whatever code was pickled into it, so nothing is loaded. Register the model again from code "
            f"(`ddpm train` logs the pyfunc as code, with no pickle), or, for a store you trust, set {TRUST_ENV}=1")
    if weights is not None and logged_sha256 and sha256_of(weights) != logged_sha256:
        raise UnsafeModel(
            f"model {ref} (version {version}): {weights.name} does not hash to the sha256 its training run "
            f"logged ({logged_sha256[:12]}...): the file was changed after registration, so nothing is loaded; "
            f"register a version again from a training run")
