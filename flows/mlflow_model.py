"""The registered model as an MLflow pyfunc: ``predict`` generates images.

    model = mlflow.pyfunc.load_model("models:/ddpm-fashion-mnist@champion")
    images = model.predict({"num_samples": 16, "seed": 0})   # uint8 (16, C, H, W)
"""

from __future__ import annotations

from dataclasses import replace

import mlflow.pyfunc
import numpy as np

WEIGHTS = "weights"  # artifact key of model.safetensors


def _first_row(model_input) -> dict:
    if model_input is None:
        return {}
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        rows = model_input.to_dict(orient="records")
        return rows[0] if rows else {}
    return dict(model_input)


class DDPMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ddpm.export import load_model

        self.loaded = load_model(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from ddpm.config import SampleConfig
        from ddpm.sample import generate

        args = {**_first_row(model_input), **(params or {})}
        cfg = replace(SampleConfig(), **{k: args[k] for k in ("sampler", "steps", "eta", "seed", "batch_size",
                                                               "device") if k in args})
        return generate(self.loaded, cfg, num_samples=int(args.get("num_samples", 16)), progress=False)
