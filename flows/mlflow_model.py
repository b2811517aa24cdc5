"""The registered model as an MLflow pyfunc, logged as code ("models from code"): this file plus the
``ddpm`` library (``code_paths``) and ``model.safetensors``. Loading runs this reviewed source, never an
unpickled object, and needs torch, numpy, safetensors, pyyaml, tqdm and pillow, not this project.

    model = mlflow.pyfunc.load_model("models:/ddpm-fashion-mnist@champion")
    images = model.predict({"num_samples": [4]}, params={"steps": 10, "seed": 1})  # uint8 (4, C, H, W)

Params (``SIGNATURE_PARAMS``): num_samples, steps, sampler, seed, each defaulting to the run's
``sample`` section (the ``model_config`` logged with it); a column of the same name in the input wins
over a param, so ``mlflow models serve`` accepts either.
"""

from __future__ import annotations

from dataclasses import replace

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

WEIGHTS = "weights"  # artifact key of model.safetensors
KEYS = {"num_samples": int, "steps": int, "sampler": str, "seed": int}


def _first_row(model_input) -> dict:
    if model_input is None:
        return {}
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        rows = model_input.to_dict(orient="records")
        return rows[0] if rows else {}
    row = dict(model_input)
    return {k: (v[0] if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in row.items()}


class DDPMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ddpm.config import SampleConfig
        from ddpm.export import load_model

        self.loaded = load_model(context.artifacts[WEIGHTS])
        config = dict(context.model_config or {})
        self.defaults = replace(SampleConfig(), **{k: v for k, v in config.items() if k in SampleConfig.__annotations__})

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from ddpm.sample import generate

        row = {k: v for k, v in _first_row(model_input).items() if v is not None and v == v}  # no NaN of a missing cell
        args = {**(params or {}), **row}
        unknown = sorted(set(args) - set(KEYS) - {"eta", "batch_size", "device"})
        if unknown:
            raise ValueError(f"unknown inputs {unknown}; this model takes {', '.join(KEYS)}")
        cfg = replace(self.defaults, **{k: KEYS.get(k, type(getattr(self.defaults, k)))(args[k])
                                        for k in ("sampler", "steps", "seed", "eta", "batch_size", "device") if k in args})
        n = int(args.get("num_samples", 16))
        if n < 1:
            raise ValueError(f"num_samples={n} must be at least 1")
        return generate(self.loaded, cfg, num_samples=n, progress=False)


def signature(sample_defaults: dict, shape: tuple[int, int, int]):
    """Inputs: an optional one-row table of the params; output: uint8 images (N, C, H, W)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    kinds = {int: "long", str: "string"}
    defaults = {"num_samples": 16, **{k: sample_defaults[k] for k in ("steps", "sampler", "seed")}}
    return ModelSignature(
        inputs=Schema([ColSpec(kinds[t], k, required=False) for k, t in KEYS.items()]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
        params=ParamSchema([ParamSpec(k, kinds[t], t(defaults[k])) for k, t in KEYS.items()]))


set_model(DDPMPyfunc())
