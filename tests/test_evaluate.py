"""The reference and evaluate stages end to end on tiny generated data, with a tiny untrained UNet.

Inception runs on a couple of dozen 16x16 images only (8 held-out, 8 training, 8 samples).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.config import EvaluateConfig, PrepareConfig, SampleConfig
from ddpm.evaluate import comparison_metric, evaluate
from ddpm.export import load_model, save_model
from ddpm.prepare import load_split, prepare
from ddpm.reference import Reference, build_reference
from ddpm.sample import generate
from ddpm.sample_counts import resolve_count
from ddpm.sampler_comparison import metric_key
from ddpm.unet import UNet
from tests.conftest import write_fashion_idx

N = 8
# Tiny N on purpose: the "only N samples for D-d features" warning is tested in test_metrics.py.
pytestmark = pytest.mark.filterwarnings("ignore:only .* samples for")


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> dict:
    """Prepared data, a reference, a model and samples: half generated, half copies of training images."""
    base = tmp_path_factory.mktemp("evaluate")
    prepared = base / "prepared"
    prepare(PrepareConfig(source_path=str(write_fashion_idx(base / "fashion")), out_dir=str(prepared), resolution=16))
    cfg = EvaluateConfig(reference_dir=str(base / "reference"), reference_num_images=N, classifier_epochs=2,
                         classifier_batch_size=32, compare_samplers=("ddim", "dpm_solver++"), compare_steps=(1, 2),
                         compare_num_samples=4, device="cpu", metrics_path=str(base / "metrics" / "metrics.json"))
    info = build_reference(prepared, cfg)
    torch.manual_seed(0)
    unet = UNet(1, 16, base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_resolutions=(8,),
                attention_heads=2)
    save_model(base / "model.safetensors", unet, "cosine", 50, "eps")
    loaded = load_model(base / "model.safetensors")
    sample_cfg = SampleConfig(steps=2, batch_size=N, num_samples=N // 2, device="cpu")
    copies = np.asarray(load_split(prepared, "train").images[[3, 50, 100, 200]])
    samples = np.concatenate([generate(loaded, sample_cfg, progress=False), copies])
    np.savez_compressed(base / "samples.npz", images=samples)
    metrics = evaluate(prepared, base / "samples.npz", cfg, loaded, sample_cfg)
    return {"base": base, "prepared": prepared, "cfg": cfg, "info": info, "loaded": loaded,
            "sample_cfg": sample_cfg, "metrics": metrics}


def test_every_metric_is_named_with_its_sample_count(stage):
    comparison = {metric_key("fd_classifier", 4, s, k) for s in ("ddim", "dpm_solver++") for k in (1, 2)}
    assert set(stage["metrics"]) == {
        "num_samples", f"fd_classifier_n{N}", f"fd_classifier_real_n{N}", "classifier_accuracy",
        "sample_class_entropy", f"fid_inception_n{N}", f"fid_inception_real_n{N}", f"kid_inception_n{N}",
        f"kid_inception_real_n{N}", f"precision_inception_n{N}", f"recall_inception_n{N}",
        "inception_reference_images", f"memorized_fraction_n{N}"} | comparison
    assert "fd_classifier_n4_dpm_solver_pp_2steps" in comparison  # no '+' in MLflow metric names
    m = stage["metrics"]
    assert m["num_samples"] == N and m["inception_reference_images"] == N
    assert json.loads(Path(stage["cfg"].metrics_path).read_text()) == m


def test_memorization_flags_the_planted_copies(stage):
    assert stage["metrics"][f"memorized_fraction_n{N}"] == 0.5  # 4 copies, 4 noise images


def test_real_images_score_better_than_untrained_samples(stage):
    m = stage["metrics"]
    assert 0 < m[f"fid_inception_real_n{N}"] < m[f"fid_inception_n{N}"]
    assert m[f"fd_classifier_real_n{N}"] < m[f"fd_classifier_n{N}"]
    assert m[f"kid_inception_n{N}"] > abs(m[f"kid_inception_real_n{N}"])
    assert 0 <= m[f"precision_inception_n{N}"] <= 1 and 0 <= m[f"recall_inception_n{N}"] <= 1


def test_reference_is_written_once_with_what_it_used(stage):
    ref = Path(stage["cfg"].reference_dir)
    assert sorted(p.name for p in ref.iterdir()) == ["classifier.safetensors", "classifier_test.npy",
                                                     "inception.npz", "reference.json"]
    info = json.loads((ref / "reference.json").read_text())
    assert info == stage["info"]
    assert info["inception"]["num_images"] == N and info["classifier"]["test_images"] == 80
    assert info["device"] == "cpu" and info["data_hash"] == json.loads((stage["prepared"] / "manifest.json")
                                                                     .read_text())["content_hash"]
    with np.load(ref / "inception.npz") as f:
        assert f["test"].shape == (N, 2048) and f["train"].shape == (N, 2048)
    assert np.load(ref / "classifier_test.npy").shape == (80, 64)


def test_files_beside_the_metrics(stage):
    out = Path(stage["cfg"].metrics_path).parent
    rows = list(csv.reader(open(out / "class_histogram.csv")))
    assert rows[0] == ["class", "samples", "held_out"] and len(rows) == 11
    assert sum(float(r[1]) for r in rows[1:]) == pytest.approx(1.0, abs=1e-3)
    table = list(csv.DictReader(open(out / "sampler_comparison.csv")))
    assert [r["steps"] for r in table] == ["1", "2"] and list(table[0]) == ["steps", "ddpm", "ddim", "dpm_solver++", "dpm_solver++_sde"]
    assert table[0]["ddpm"] == ""  # not compared here: an empty cell keeps the DVC plot's fields
    key = metric_key("fd_classifier", 4, "ddim", 2)
    assert float(table[1]["ddim"]) == pytest.approx(stage["metrics"][key], abs=1e-4)
    for name in ("memorization.png", "sampler_comparison.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_is_deterministic(stage, tmp_path):
    cfg = replace(stage["cfg"], metrics_path=str(tmp_path / "metrics.json"))
    again = evaluate(stage["prepared"], stage["base"] / "samples.npz", cfg, stage["loaded"], stage["sample_cfg"])
    assert again == stage["metrics"]


def test_reference_of_other_data_is_refused(stage, tmp_path):
    other = tmp_path / "prepared"
    prepare(PrepareConfig(source_path=str(write_fashion_idx(tmp_path / "fashion", n_train=120)), out_dir=str(other),
                          resolution=16))
    with pytest.raises(ValueError, match="was computed from data .* run `ddpm reference` again"):
        evaluate(other, stage["base"] / "samples.npz", stage["cfg"])


def test_unlabelled_data_has_no_classifier_metrics(stage, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(stage["prepared"], prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps({**manifest, "classes": ["all"]}))
    cfg = replace(stage["cfg"], reference_dir=str(tmp_path / "reference"), inception=False,
                  metrics_path=str(tmp_path / "metrics.json"))
    info = build_reference(prepared, cfg)
    assert info["classifier"] is None and info["inception"] is None
    metrics = evaluate(prepared, stage["base"] / "samples.npz", replace(cfg, compare_samplers=()))
    assert set(metrics) == {"num_samples", f"memorized_fraction_n{N}"}
    with pytest.raises(ValueError, match="compare_metric=fd_classifier needs a domain classifier"):
        evaluate(prepared, stage["base"] / "samples.npz", replace(cfg, compare_metric="fd_classifier"),
                 stage["loaded"], stage["sample_cfg"])


def test_auto_counts_are_small_on_a_cpu_and_large_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_count(0, "samples", cpu) == 1_000 and resolve_count(0, "samples", gpu) == 10_000
    assert resolve_count(0, "reference", cpu) < resolve_count(0, "reference", gpu)
    assert resolve_count(500, "samples", gpu) == 500
    with pytest.raises(ValueError, match="unknown count kind 'sampels'"):
        resolve_count(0, "sampels", cpu)


def test_sample_count_zero_means_auto(stage):
    images = generate(stage["loaded"], replace(stage["sample_cfg"], num_samples=0, steps=1, batch_size=128),
                      progress=False)
    assert len(images) == resolve_count(0, "samples", torch.device("cpu"))


def test_comparison_metric_follows_the_device():
    with_classifier = Reference(info={}, classifier=torch.nn.Identity(), classifier_test=np.zeros((2, 2)),
                                inception_test=np.zeros((2, 2)), inception_train=np.zeros((2, 2)))
    cfg = EvaluateConfig()
    assert comparison_metric(cfg, with_classifier, torch.device("cpu")) == "fd_classifier"
    assert comparison_metric(cfg, with_classifier, torch.device("cuda")) == "fid_inception"
    assert comparison_metric(replace(cfg, compare_metric="fid_inception"), with_classifier,
                             torch.device("cpu")) == "fid_inception"


def test_inception_scores_at_most_as_many_samples_as_the_reference_holds(stage, tmp_path):
    """N = 2x the reference: the classifier FD uses all 16 samples, Inception the first 8, each named so."""
    samples = np.load(stage["base"] / "samples.npz")["images"]
    np.savez_compressed(tmp_path / "samples.npz", images=np.concatenate([samples, samples[::-1]]))
    cfg = replace(stage["cfg"], compare_samplers=(), metrics_path=str(tmp_path / "metrics.json"))
    m = evaluate(stage["prepared"], tmp_path / "samples.npz", cfg)
    assert f"fd_classifier_n{2 * N}" in m and f"fid_inception_n{N}" in m and f"fid_inception_n{2 * N}" not in m
    assert m[f"fid_inception_n{N}"] == stage["metrics"][f"fid_inception_n{N}"]  # the same first 8 samples


def test_bf16_sampling_is_used_and_stays_close_to_fp32(tmp_path):
    """sample.mixed_precision: bf16 runs the network under autocast (the samples differ), the sampler's
    updates stay fp32 (they differ little). A v model: its untrained samples are not saturated."""
    torch.manual_seed(0)
    unet = UNet(1, 16, base_channels=8, channel_mults=(1, 2), blocks_per_level=1, attention_resolutions=(8,),
                attention_heads=2)
    with torch.no_grad():  # the output layer starts at zero: give the network an output
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(tmp_path / "v.safetensors", unet, "cosine", 50, "v")
    cfg = SampleConfig(steps=4, batch_size=8, num_samples=8, device="cpu")
    loaded = load_model(tmp_path / "v.safetensors")
    fp32 = generate(loaded, replace(cfg, mixed_precision="fp32"), progress=False).astype(float)
    bf16 = generate(loaded, replace(cfg, mixed_precision="bf16"), progress=False).astype(float)
    assert 0.2 < (fp32 % 255 != 0).mean()  # not saturated, so a difference would show
    assert fp32.shape == bf16.shape and not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).mean() < 4.0, np.abs(fp32 - bf16).mean()  # of 255
