"""The registered pyfunc: logged from code (no pickle), with a signature and params, loadable where this
project is not installed, and served by ``mlflow models serve``. A real SQLite store in a temp dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ddpm import config
from ddpm.export import save_model
from ddpm.unet import UNet
from flows import tracking

NAME = "tiny-ddpm"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """An untrained 8x8 model registered as version 1 through the project's own register_model."""
    root = tmp_path_factory.mktemp("pyfunc")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        cfg = config.load("params.yaml", ["prepare.resolution=8", "model.channel_mults=[1, 2]",
                                          "model.base_channels=8", f"tracking.model_name={NAME}", "sample.steps=3"])
        unet = UNet(channels=1, resolution=8, base_channels=8, channel_mults=(1, 2), blocks_per_level=1,
                    attention_resolutions=(4,), attention_heads=2)
        save_model(root / "model.safetensors", unet, "cosine", 1000, "v")
        c = tracking.client(root)
        run_id = c.create_run(tracking.experiment_id(c, root, "pyfunc")).info.run_id
        version = tracking.register_model(root, run_id, root / "model.safetensors", cfg)
        import mlflow

        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}", dst_path=str(root / "dl")))
        yield {"root": root, "uri": os.environ["MLFLOW_TRACKING_URI"], "version": version, "local": local}
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]


def test_logged_from_code_with_the_library_and_no_pickle(registered):
    local = registered["local"]
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], sorted(files)
    assert "code/ddpm/samplers/dpm_solver.py" in files and "mlflow_model.py" in {Path(f).name for f in files}
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "ddpm-pipeline" not in (local / "requirements.txt").read_text()


def test_the_experiment_keeps_artifacts_in_mlartifacts_beside_the_store(registered):
    """Not MLflow's default, ./mlruns of whatever directory creates the experiment (as it was before: mlflow.
    set_tracking_uri() sets MLFLOW_TRACKING_URI, which told the project a server was in use)."""
    root = registered["root"]
    c = tracking.client(root)
    assert c.get_experiment_by_name("pyfunc").artifact_location == (root / "mlartifacts").as_uri()
    # an experiment an older version made under mlruns/ is used as it is (MLflow cannot move it)
    old = c.create_experiment("older", artifact_location=(root / "mlruns" / "1").as_uri())
    assert tracking.experiment_id(c, root, "older") == old
    assert c.get_experiment(old).artifact_location == (root / "mlruns" / "1").as_uri()


def test_signature_names_the_params_with_the_runs_defaults(registered):
    from mlflow.models import get_model_info

    sig = get_model_info(str(registered["local"])).signature
    params = {p.name: (p.dtype.name, p.default) for p in sig.params.params}
    assert params == {"num_samples": ("long", 16), "steps": ("long", 3), "sampler": ("string", "dpm_solver++_sde"),
                      "seed": ("long", 0)}
    spec = sig.outputs.to_dict()[0]["tensor-spec"]
    assert spec["dtype"] == "uint8" and list(spec["shape"]) == [-1, 1, 8, 8]


LOAD_WITHOUT_THE_PROJECT = """
import sys
sys.path.append(SITE)  # -S: no .pth files, so the editable install of this project is not on the path
try:
    import ddpm
    raise SystemExit("ddpm is importable: the check proves nothing")
except ImportError:
    pass
import mlflow, json
mlflow.set_tracking_uri(URI); mlflow.set_registry_uri(URI)
m = mlflow.pyfunc.load_model(MODEL)
a = m.predict({"num_samples": [2]})
b = m.predict({}, params={"num_samples": 3, "steps": 2, "seed": 1})
c = m.predict({}, params={"num_samples": 3, "steps": 2, "seed": 1})
print(json.dumps({"a": list(a.shape), "b": list(b.shape), "dtype": str(b.dtype), "same": bool((b == c).all()),
                  "ddpm_from": sys.modules["ddpm"].__file__}))
"""


def test_loads_and_predicts_where_the_project_is_not_installed(registered, tmp_path):
    code = (f"SITE = {sysconfig.get_paths()['purelib']!r}\nURI = {registered['uri']!r}\n"
            f"MODEL = 'models:/{NAME}/{registered['version']}'\n" + LOAD_WITHOUT_THE_PROJECT)
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["a"] == [2, 1, 8, 8] and got["b"] == [3, 1, 8, 8] and got["dtype"] == "uint8" and got["same"]
    assert "/code/ddpm/" in got["ddpm_from"]  # the library came with the model


def test_bad_params_are_named(registered):
    import mlflow

    m = mlflow.pyfunc.load_model(str(registered["local"]))
    with pytest.raises(ValueError, match=r"num_samples=0 must be at least 1"):
        m.predict({}, params={"num_samples": 0})
    with pytest.raises(Exception, match=r"sample\.sampler='euler' is not valid"):
        m.predict({}, params={"sampler": "euler"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_with_images(registered, tmp_path):
    """`mlflow models serve --env-manager local` (offline here: no virtualenv can be built)."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    # mlflow runs `uvicorn` from PATH: the virtualenv's bin must be on it (as it is with the venv activated)
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{registered['version']}",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                       json={"dataframe_records": [{"num_samples": 2}], "params": {"steps": 2}})
        assert r.status_code == 200, r.text[-2000:]
        images = np.asarray(r.json()["predictions"])
        assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 255
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)


class Pickled(__import__("mlflow").pyfunc.PythonModel):
    """A pyfunc logged as an object: MLflow cloudpickles it into python_model.pkl."""

    def predict(self, context, model_input, params=None):
        return model_input


def test_a_version_that_carries_a_pickle_is_refused_unless_trusted(registered, tmp_path, monkeypatch):
    import mlflow

    from flows.model_safety import UnsafeModel

    root = registered["root"]
    c = tracking.client(root)
    run_id = c.create_run(tracking.experiment_id(c, root, "pyfunc")).info.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Pickled(), registered_model_name=NAME,
                                       artifacts={"weights": str(root / "model.safetensors")})
    ref = f"models:/{NAME}/{info.registered_model_version}"
    with pytest.raises(UnsafeModel) as caught:
        tracking.resolve_model(root, ref, tmp_path / "a")
    assert str(caught.value).startswith(f"model {ref} (version {info.registered_model_version}) carries a pickle "
                                        "(python_model.pkl): loading it would run whatever code was pickled into it")
    out = subprocess.run([str(Path(sys.executable).with_name("ddpm")), "sample", "--no-track", "--model", ref,
                          "-S", f"sample.out_dir={tmp_path / 's'}"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]})
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == f"ddpm sample: error: {caught.value}"
    assert not list((tmp_path / "s").glob("*.npz")) and not list((tmp_path / "s").glob("*.png"))  # nothing sampled
    with pytest.raises(UnsafeModel, match="carries a pickle"):  # the project's pyfunc loader: not unpickled
        tracking.load_pyfunc(ref, root)
    monkeypatch.setenv("DDPM_TRUST_PICKLES", "1")  # the opt-in for a trusted store
    weights, _ = tracking.resolve_model(root, ref, tmp_path / "b")
    assert weights.name == "model.safetensors"


def test_weights_changed_after_registration_are_refused(registered, tmp_path):
    from ddpm import config as config_mod
    from flows.model_safety import UnsafeModel

    root = registered["root"]
    c = tracking.client(root)
    run_id = c.create_run(tracking.experiment_id(c, root, "pyfunc")).info.run_id
    cfg = config_mod.load("params.yaml", ["prepare.resolution=8", "model.channel_mults=[1, 2]", "model.base_channels=8",
                                          f"tracking.model_name={NAME}", "sample.steps=3"])
    version = tracking.register_model(root, run_id, root / "model.safetensors", cfg)
    ref = f"models:/{NAME}/{version}"
    assert tracking.resolve_model(root, ref, tmp_path / "a")[1] == run_id  # as registered: loads
    model_id = c.get_model_version(NAME, version).source.removeprefix("models:/")
    [stored] = [p for p in (root / "mlartifacts").rglob("model.safetensors") if model_id in p.as_posix()]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    stored.write_bytes(bytes(data))
    for load in (lambda: tracking.resolve_model(root, ref, tmp_path / "b"), lambda: tracking.load_pyfunc(ref, root)):
        with pytest.raises(UnsafeModel, match=rf"^model {ref} \(version {version}\): model\.safetensors does not "
                                              r"hash to the sha256 its training run logged"):
            load()


def test_the_checked_pyfunc_loader_loads_a_good_version_and_refuses_one_without_weights(registered, tmp_path):
    import mlflow

    root = registered["root"]
    model = tracking.load_pyfunc(f"models:/{NAME}/{registered['version']}", root)
    images = model.predict({"num_samples": [2]}, params={"steps": 2, "seed": 1})
    assert images.shape == (2, 1, 8, 8) and images.dtype == np.uint8
    code = tmp_path / "bare_model.py"  # a pyfunc from code with no weights at all: nothing to hash or load
    code.write_text("import mlflow.pyfunc\nfrom mlflow.models import set_model\n\n"
                    "class Bare(mlflow.pyfunc.PythonModel):\n    def predict(self, context, model_input, params=None):\n"
                    "        return model_input\n\nset_model(Bare())\n")
    c = tracking.client(root)
    run_id = c.create_run(tracking.experiment_id(c, root, "pyfunc")).info.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), registered_model_name=NAME)
    ref = f"models:/{NAME}/{info.registered_model_version}"
    for load in (lambda: tracking.load_pyfunc(ref, root), lambda: tracking.resolve_model(root, ref, tmp_path / "d")):
        with pytest.raises(FileNotFoundError, match=rf"^model {ref} \(version \d+\) holds no model\.safetensors"):
            load()
