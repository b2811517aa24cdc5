"""One typed configuration, loaded from ``params.yaml``.

Each top-level section of ``params.yaml`` maps to one frozen dataclass below;
``Config`` holds them all. Loading validates every key and type and fails with
a ``ConfigError`` that names the offending ``section.key``. Units are part of
field names (``lr_warmup_steps``, ``ema_halflife_steps``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml section, key or value that is not valid."""


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be {bound}")


PREPARE_SOURCES = ("fashion_mnist", "imagefolder", "hub", "parquet", "arrow")
SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("eps", "v", "x0")
SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "dpm_solver++_sde")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "logsnr", "karras")
LR_SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
COMPARE_METRICS = ("auto", "fd_classifier", "fid_inception")


@dataclass(frozen=True)
class PrepareConfig:
    """Turn a raw image source into a prepared uint8 data set under ``out_dir``.

    Sources: ``fashion_mnist`` (idx files in ``source_path``), ``imagefolder`` (a
    folder of images, recursive, class subfolders become labels), ``parquet`` and
    ``arrow`` (local files or a ``save_to_disk`` folder), ``hub`` (``hub_id`` at
    ``revision`` on the Hugging Face hub; ``source_path`` is then not read).
    """

    source: str = "fashion_mnist"
    source_path: str = "/usr/share/datasets/fashion-mnist"
    hub_id: str = ""  # source hub: a data set id such as huggan/smithsonian_butterflies_subset
    revision: str = ""  # source hub: a commit sha (pin it for reproducibility), tag or branch; "": main
    split: str = "train"  # the source split to train on
    image_column: str = ""  # "": the first Image column (else a {bytes, path} or binary column)
    label_column: str = ""  # "": class subfolders / the first ClassLabel column; "none": unlabelled
    out_dir: str = "data/prepared"
    resolution: int = 28
    channels: int = 0  # 0: take it from the data (1 for grey, 3 for colour)
    fit: str = "crop"  # crop: shorter side to resolution, centre crop; pad: longer side, pad with background
    background: tuple[int, ...] = (255, 255, 255)  # RGB under transparent pixels and in pad borders
    holdout_fraction: float = 0.1  # used only when the source has no test split
    max_images: int = 0  # 0: all; otherwise the first N of each split (small runs)
    seed: int = 0
    strict: bool = False  # true: the first unreadable image fails the stage; false: skip and list it
    num_proc: int = 0  # decoding processes; 0: one per CPU core

    def __post_init__(self) -> None:
        _choice("prepare.source", self.source, PREPARE_SOURCES)
        _choice("prepare.fit", self.fit, ("crop", "pad"))
        _positive("prepare.resolution", self.resolution)
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"prepare.channels={self.channels!r} must be 0 (auto), 1 or 3")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"prepare.holdout_fraction={self.holdout_fraction!r} must be in (0, 1)")
        _positive("prepare.max_images", self.max_images, allow_zero=True)
        _positive("prepare.num_proc", self.num_proc, allow_zero=True)
        if len(self.background) != 3 or any(not 0 <= v <= 255 for v in self.background):
            raise ConfigError(f"prepare.background={list(self.background)!r} must be three ints in [0, 255] (R, G, B)")
        if self.source == "hub" and not self.hub_id:
            raise ConfigError("prepare.hub_id must name a data set (e.g. huggan/smithsonian_butterflies_subset) "
                              "when prepare.source is hub")
        if not self.split:
            raise ConfigError("prepare.split must name a split of the source, e.g. train")


@dataclass(frozen=True)
class ModelConfig:
    """UNet shape. Level i works at resolution / 2**i."""

    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    # UNet levels with self-attention: 0 = full resolution, 1 = half, ..., -1 = the lowest. Levels, not
    # pixel sizes, so the same config fits 28, 32 or 64 px images.
    attention_levels: tuple[int, ...] = (-1,)
    attention_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _positive("model.base_channels", self.base_channels)
        _positive("model.blocks_per_level", self.blocks_per_level)
        _positive("model.attention_heads", self.attention_heads)
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ConfigError(f"model.channel_mults={list(self.channel_mults)!r} must be a non-empty list of positive ints")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1)")
        n = len(self.channel_mults)
        bad = [lv for lv in self.attention_levels if not -n <= lv < n]
        if bad:
            raise ConfigError(f"model.attention_levels={list(self.attention_levels)} has {bad}: with "
                              f"{n} channel_mults the levels are 0..{n - 1} (or -{n}..-1 from the lowest)")
        # the lowest level always has attention (the middle block), besides the levels named
        for lv in {*(lv % n for lv in self.attention_levels), n - 1}:
            width = self.base_channels * self.channel_mults[lv]
            if width % self.attention_heads:
                raise ConfigError(f"model.attention_heads={self.attention_heads} does not divide the {width} "
                                  f"channels of UNet level {lv} (base_channels x channel_mults[{lv}]), which has "
                                  f"self-attention")

    def attention_resolutions(self, resolution: int) -> tuple[int, ...]:
        """The pixel sizes of the attention levels for images of ``resolution``."""
        n = len(self.channel_mults)
        return tuple(sorted({resolution // 2 ** (lv % n) for lv in self.attention_levels}, reverse=True))


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network predicts."""

    schedule: str = "cosine"
    timesteps: int = 1000
    objective: str = "v"
    zero_terminal_snr: bool = False  # Lin et al. 2024: rescale so the last step is pure noise (v or x0 only)

    def __post_init__(self) -> None:
        _choice("diffusion.schedule", self.schedule, SCHEDULES)
        _choice("diffusion.objective", self.objective, OBJECTIVES)
        _positive("diffusion.timesteps", self.timesteps)
        if self.zero_terminal_snr and self.objective == "eps":
            raise ConfigError("diffusion.zero_terminal_snr=true needs diffusion.objective v or x0: at zero SNR an "
                              "eps prediction says nothing about x_0 (Lin et al. 2024, sec. 3.2)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1600
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"  # after the warm-up (recipe tuning study: FD 4.41 vs 4.88 for cosine)
    lr_warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0: no clipping
    grad_accum_steps: int = 1
    ema_halflife_steps: float = 100.0
    ema_rampup_ratio: float = 0.1  # half-life is min(halflife, ratio * step); 0: no ramp-up
    min_snr_gamma: float = 5.0  # Hang et al. 2023; 0: plain MSE
    hflip: bool = False
    mixed_precision: str = "auto"
    compile: bool = False  # torch.compile the UNet (falls back to eager, with a warning, if compiling fails)
    channels_last: bool = False
    deterministic: bool = False  # deterministic kernels on CUDA (slower); CPU runs are reproducible anyway
    device: str = "auto"
    seed: int = 0
    log_every_steps: int = 25
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    checkpoint_dir: str = "checkpoints"
    out_dir: str = "models"
    loss_path: str = "metrics/train_loss.csv"
    # Several processes (DDP, launched by `ddpm train` through torchrun): the world is nproc_per_node x nnodes
    # ranks and train.batch_size stays the global batch, each rank taking batch_size / world of it.
    nproc_per_node: int = 1  # ranks on this machine: at most one per GPU; on a CPU, gloo ranks
    nnodes: int = 1  # machines; > 1: start `ddpm train` on each, with its node_rank
    node_rank: int = 0  # this machine's index, 0..nnodes-1 (nnodes > 1 only)
    master_addr: str = "127.0.0.1"  # where node 0 listens for the rendezvous (nnodes > 1 only)
    master_port: int = 29500  # its port (nnodes > 1 only; one machine picks a free port itself)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "grad_accum_steps", "log_every_steps",
                     "checkpoint_every_steps", "keep_checkpoints", "nproc_per_node", "nnodes"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("lr_warmup_steps", "weight_decay", "grad_clip_norm", "ema_halflife_steps",
                     "ema_rampup_ratio", "min_snr_gamma"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("train.mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("train.device", self.device, DEVICES)
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"train.node_rank={self.node_rank} must be in 0..{self.nnodes - 1} "
                              f"(train.nnodes={self.nnodes})")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"train.master_port={self.master_port} must be a TCP port, 1..65535")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by the world size {self.world_size} "
                f"(train.nproc_per_node={self.nproc_per_node} x train.nnodes={self.nnodes}): each rank takes "
                f"batch_size / world size images of every batch; e.g. train.batch_size="
                f"{max(self.world_size, self.batch_size // self.world_size * self.world_size)}")


@dataclass(frozen=True)
class SampleConfig:
    sampler: str = "dpm_solver++_sde"
    steps: int = 20
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 ancestral-like
    timestep_spacing: str = "trailing"  # ddpm/samplers/common.py
    clip_x0: bool = True  # clamp predicted x_0 to [-1, 1] at every step
    num_samples: int = 0  # 0: auto, 1000 on a CPU, 10000 on a GPU (ddpm/sample_counts.py)
    batch_size: int = 128
    seed: int = 0
    model: str = "models/model.safetensors"  # a checkpoint path, or models:/<name>@<alias> | models:/<name>/<version>
    device: str = "auto"
    mixed_precision: str = "auto"  # the network in bf16 where train's auto would use it; the sampler's updates stay fp32
    out_dir: str = "samples"

    def __post_init__(self) -> None:
        _choice("sample.sampler", self.sampler, SAMPLERS)
        _choice("sample.mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("sample.timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _choice("sample.device", self.device, DEVICES)
        for name in ("steps", "batch_size"):
            _positive(f"sample.{name}", getattr(self, name))
        _positive("sample.num_samples", self.num_samples, allow_zero=True)
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"sample.eta={self.eta!r} must be in [0, 1]")


@dataclass(frozen=True)
class EvaluateConfig:
    """The reference stage (classifier, Inception features of held-out data) and the evaluate stage.

    Counts set to 0 are chosen from the device, small on a CPU and large on a GPU
    (ddpm/sample_counts.py); every metric name carries the N it used.
    """

    reference_dir: str = "data/reference"
    reference_num_images: int = 0  # held-out (and as many training) images for Inception; 0: auto, 128 CPU / 10000 GPU
    inception: bool = True  # false: no Inception metrics (FID, KID, precision/recall), no Inception reference
    classifier_epochs: int = 2
    classifier_batch_size: int = 128
    classifier_lr: float = 3e-3
    compare_samplers: tuple[str, ...] = ("ddpm", "ddim", "dpm_solver++", "dpm_solver++_sde")  # []: no sampler comparison
    compare_steps: tuple[int, ...] = (5, 10, 20)
    compare_num_samples: int = 0  # per sampler and step count; 0: auto, 64 CPU / 2000 GPU, at most N
    compare_metric: str = "auto"  # auto: fd_classifier on a CPU (if labelled), fid_inception on a GPU
    device: str = "auto"
    seed: int = 0
    metrics_path: str = "metrics/metrics.json"

    def __post_init__(self) -> None:
        for name in ("classifier_epochs", "classifier_batch_size", "classifier_lr"):
            _positive(f"evaluate.{name}", getattr(self, name))
        for name in ("reference_num_images", "compare_num_samples"):
            _positive(f"evaluate.{name}", getattr(self, name), allow_zero=True)
        _choice("evaluate.device", self.device, DEVICES)
        _choice("evaluate.compare_metric", self.compare_metric, COMPARE_METRICS)
        for sampler in self.compare_samplers:
            _choice("evaluate.compare_samplers[]", sampler, SAMPLERS)
        if any(s <= 0 for s in self.compare_steps):
            raise ConfigError(f"evaluate.compare_steps={list(self.compare_steps)!r} must be positive ints")
        for name in ("reference_num_images", "compare_num_samples"):
            if getattr(self, name) == 1:
                raise ConfigError(f"evaluate.{name}=1 is too few: statistics need at least 2 images (0: auto)")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow names. The store itself comes from MLFLOW_TRACKING_URI or the project root."""

    experiment: str = "ddpm"
    model_name: str = "ddpm-fashion-mnist"
    primary_metric: str = "fd_classifier"  # the promotion gate compares <primary_metric>_n<N>
    primary_metric_goal: str = "minimize"

    def __post_init__(self) -> None:
        _choice("tracking.primary_metric_goal", self.primary_metric_goal, ("minimize", "maximize"))


PIPELINE_STAGES = ("prepare", "train", "sample", "reference", "evaluate")


@dataclass(frozen=True)
class PipelineConfig:
    """How the Prefect flow runs the stages. Not a DVC dependency: changing it reruns nothing.

    A stage that runs past its limit is stopped (its process group: SIGTERM, then SIGKILL) and the
    flow fails naming the limit; 0 means no limit.
    """

    prepare_timeout_s: int = 3600
    train_timeout_s: int = 43200
    sample_timeout_s: int = 7200
    reference_timeout_s: int = 3600
    evaluate_timeout_s: int = 7200

    def __post_init__(self) -> None:
        for stage in PIPELINE_STAGES:
            _positive(f"pipeline.{stage}_timeout_s", self.timeout_s(stage), allow_zero=True)

    def timeout_s(self, stage: str) -> int:
        return getattr(self, f"{stage}_timeout_s")


# metric families the evaluate stage writes, and what each needs (tracking.primary_metric is one)
PRIMARY_METRICS = {"fd_classifier": None, "fid_inception": "inception", "kid_inception": "inception",
                   "precision_inception": "inception", "recall_inception": "inception"}


@dataclass(frozen=True)
class Config:
    """All sections. Checks that span sections (model vs data resolution, steps vs timesteps, the
    promotion metric vs what evaluate computes) run here, so the whole pipeline's config is valid
    before any stage starts."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        levels = len(self.model.channel_mults)
        factor = 2 ** (levels - 1)
        res = self.prepare.resolution
        if res % factor or res < factor:
            fits = ", ".join(str(r) for r in range(factor, 8 * factor + 1, factor) if abs(r - res) <= 2 * factor)
            raise ConfigError(f"prepare.resolution={res} does not fit the UNet: with {levels} model.channel_mults "
                              f"each side is halved {levels - 1} times, so it must be a multiple of {factor} "
                              f"(e.g. {fits or 4 * factor}), or use fewer channel_mults")
        steps = {"sample.steps": [self.sample.steps], "evaluate.compare_steps": list(self.evaluate.compare_steps)}
        for name, values in steps.items():
            over = [v for v in values if v > self.diffusion.timesteps]
            if over:
                raise ConfigError(f"{name}={over[0] if name == 'sample.steps' else values} exceeds "
                                  f"diffusion.timesteps={self.diffusion.timesteps}: a sampler steps through "
                                  f"at most that many noise levels")
        needs = PRIMARY_METRICS.get(self.tracking.primary_metric, "unknown")
        if needs == "unknown":
            raise ConfigError(f"tracking.primary_metric={self.tracking.primary_metric!r} is not a metric the "
                              f"evaluate stage writes; choose one of {', '.join(PRIMARY_METRICS)}")
        if needs == "inception" and not self.evaluate.inception:
            raise ConfigError(f"tracking.primary_metric={self.tracking.primary_metric} needs Inception features, "
                              f"and evaluate.inception is false")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), as written to params.yaml."""
        return {f.name: _plain(dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.001, ...}``, the form MLflow params take."""
        return {f"{s}.{k}": v for s, sec in self.to_dict().items() for k, v in sec.items()}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(choices)}"


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list of {inner.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false, not {type(value).__name__}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer, not {type(value).__name__}")
        return value
    if hint is float:
        # PyYAML follows YAML 1.1 and reads "1e-4" (no dot) as a string; DVC writes it so.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number, not {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string, not {type(value).__name__}")
        return value
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")


# keys of older params.yaml files, and what replaced them
RENAMED = {"model.attention_resolutions": "model.attention_levels: UNet levels, not pixel sizes (0 = full "
                                          "resolution, -1 = the lowest), e.g. [-1] for the old [7] at 28 px"}


def _build_section(section: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if f"{section}.{key}" in RENAMED:
            raise ConfigError(f"{section}.{key} is now {RENAMED[f'{section}.{key}']}")
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}{_suggest(str(key), known)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate a nested dict (as read from params.yaml) into a ``Config``."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    for key in raw:
        if key not in sections:
            raise ConfigError(f"unknown section {key!r}{_suggest(str(key), sections).replace('keys', 'sections')}")
    return Config(**{s: _build_section(s, hints[s], raw.get(s)) for s in sections})


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=3e-4"`` -> ``("train", "lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, value_text = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r} must name one section and one key, like train.steps=100")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts[0], parts[1], value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``section.key=value`` overrides applied (not yet validated)."""
    out = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for text in overrides:
        section, key, value = parse_override(text)
        out.setdefault(section, {})[key] = value
    return out


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path} is not valid YAML: {exc}") from None
    return raw or {}


def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read ``params.yaml``, apply ``-S`` overrides, validate; raises ``ConfigError``."""
    return from_dict(apply_overrides(read_params(path), overrides or []))


def write_params(path: str | Path, raw: dict[str, Any]) -> None:
    """Write params atomically, so a crash never leaves a half-written params.yaml."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))
    tmp.replace(path)
