"""Typed, validated configuration, loaded once from ``params.yaml``.

``load_params()`` reads ``params.yaml``, merges ``configs/<profile>.yaml`` over it when ``profile``
is set, applies ``key.sub=value`` overrides and validates everything. A wrong key, type or value
raises :class:`ConfigError` with one line naming the dotted key and what is allowed.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PROFILES_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A bad parameter: the message names the dotted key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: Literal["fashion_mnist", "imagenet"] = "fashion_mnist"
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    imagenet_dir: Optional[str] = None
    resolution: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    max_per_split: Optional[int] = Field(None, ge=1)
    out_dir: str = "data"


DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


class ModelConfig(_Section):
    size: Literal["S", "B", "L", "XL", "custom"] = "custom"
    depth: int = Field(6, ge=1)
    hidden_size: int = Field(192, ge=8)
    num_heads: int = Field(3, ge=1)
    patch_size: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    head_hidden: int = Field(256, ge=1)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(depth, hidden_size, num_heads): DiT's table for S/B/L/XL, else the custom fields."""
        return DIT_SIZES[self.size] if self.size != "custom" else (self.depth, self.hidden_size, self.num_heads)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        depth, hidden, heads = self.dims
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} must be divisible by num_heads {heads}")
        return self


class DiffusionConfig(_Section):
    mode: Literal["pixel", "latent"] = "pixel"
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    w_schedule: Literal["linear", "constant", "cosine"] = "linear"
    w_max: float = Field(0.1, ge=0)
    prediction: Literal["eps", "z0"] = "eps"


class LabelTask(_Section):
    enabled: bool = True
    weight: float = Field(0.1, ge=0)


class RepresentationTask(_Section):
    enabled: bool = False
    weight: float = Field(0.1, ge=0)
    loss: Literal["mse", "cosine"] = "mse"


class MaskedTask(_Section):
    enabled: bool = False
    weight: float = Field(0.5, ge=0)
    mask_ratio: float = Field(0.5, ge=0, lt=1)


class TransitionTask(_Section):
    enabled: bool = False
    weight: float = Field(0.5, ge=0)
    pairing: Literal["rot90", "edges"] = "rot90"


class TasksConfig(_Section):
    label: LabelTask = LabelTask()
    representation: RepresentationTask = RepresentationTask()
    masked: MaskedTask = MaskedTask()
    transition: TransitionTask = TransitionTask()

    @property
    def enabled(self) -> list[str]:
        """Names of the enabled extra tasks, in a fixed order."""
        return [n for n in ("label", "representation", "masked", "transition") if getattr(self, n).enabled]


class PrepareConfig(_Section):
    num_workers: int = Field(2, ge=0)
    shard_size: int = Field(10000, ge=1)


class LatentsConfig(_Section):
    vae: str = "stabilityai/sd-vae-ft-ema"
    scale: float = Field(0.18215, gt=0)
    batch_size: int = Field(64, ge=1)
    flip: bool = False


class RepresentationsConfig(_Section):
    encoder: Literal["fmnist_cnn", "dinov2", "clip"] = "fmnist_cnn"
    name: Optional[str] = None
    weights_path: Optional[str] = None
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    dim: int = Field(128, ge=1)


class TrainConfig(_Section):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    tf32: bool = True
    compile: bool = False
    num_workers: int = Field(0, ge=0)
    ckpt_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "checkpoints"


class SampleConfig(_Section):
    num_samples: int = Field(1000, ge=1)
    batch_size: int = Field(250, ge=1)
    steps: int = Field(100, ge=1)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    eta: float = Field(1.0, ge=0)
    condition: Literal["uncond", "label", "masked", "transition"] = "label"
    out_dir: str = "samples"


class EvaluateConfig(_Section):
    num_samples: int = Field(1000, ge=1)
    batch_size: int = Field(250, ge=1)
    inception: bool = True
    feature_extractor_weights_path: Optional[str] = None
    ref_stats_npz: Optional[str] = None
    classify_t: list[int] = Field(default_factory=lambda: [1, 10, 50], min_length=1)
    out_dir: str = "metrics"


class MlflowConfig(_Section):
    tracking_uri: Optional[str] = None
    experiment: str = "mtdiff"


class Params(_Section):
    profile: Optional[str] = None
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    tasks: TasksConfig = TasksConfig()
    prepare: PrepareConfig = PrepareConfig()
    latents: LatentsConfig = LatentsConfig()
    representations: RepresentationsConfig = RepresentationsConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _cross_checks(self):
        t = self.tasks
        if self.sample.condition == "label" and not t.label.enabled:
            raise ValueError("sample.condition 'label' needs tasks.label.enabled: true")
        if self.sample.condition == "masked" and not t.masked.enabled:
            raise ValueError("sample.condition 'masked' needs tasks.masked.enabled: true")
        if self.sample.condition == "transition" and not t.transition.enabled:
            raise ValueError("sample.condition 'transition' needs tasks.transition.enabled: true")
        if self.sample.steps > self.diffusion.timesteps:
            raise ValueError(f"sample.steps {self.sample.steps} exceeds diffusion.timesteps {self.diffusion.timesteps}")
        if self.data.source == "imagenet" and not self.data.imagenet_dir:
            raise ValueError("data.source 'imagenet' needs data.imagenet_dir (an ImageFolder root)")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``train.lr`` -> value), as MLflow logs params."""
        return flatten(self.model_dump())

    # -- paths of the stage outputs, one place so stages never disagree --------------------
    @property
    def prepared_dir(self) -> Path:
        return resolve_path(self.data.out_dir) / "prepared"

    @property
    def latents_dir(self) -> Path:
        return resolve_path(self.data.out_dir) / "latents"

    @property
    def representations_dir(self) -> Path:
        return resolve_path(self.data.out_dir) / "representations"

    @property
    def checkpoints_dir(self) -> Path:
        return resolve_path(self.train.out_dir)

    @property
    def samples_dir(self) -> Path:
        return resolve_path(self.sample.out_dir)

    @property
    def metrics_dir(self) -> Path:
        return resolve_path(self.evaluate.out_dir)


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths are taken from the working directory (DVC runs stages in the repo root)."""
    return Path(path).expanduser()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = d
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["train.steps=10", "tasks.label.enabled=false"]`` -> ``{"train.steps": 10, ...}`` (YAML-typed)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        section = _model_at(first["loc"][:-1])
        allowed = ", ".join(sorted(section.model_fields)) if section else "?"
        msg = f"unknown key; allowed keys here: {allowed}"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def params_from_dict(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_params(path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Load ``params.yaml`` (or ``path``), merge its profile and ``overrides``, validate."""
    path = Path(path or os.environ.get("MTDIFF_PARAMS", "params.yaml"))
    if not path.exists() and path == Path("params.yaml"):
        path = DEFAULT_PARAMS
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat_over = parse_overrides(overrides)
    profile = flat_over.get("profile", raw.get("profile"))
    if profile:
        prof_path = PROFILES_DIR / f"{profile}.yaml"
        if not prof_path.exists():
            allowed = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
            raise ConfigError(f"{path}: profile: no profile '{profile}'; allowed: {allowed}")
        with open(prof_path) as f:
            raw = _deep_merge(raw, yaml.safe_load(f) or {})
    for key, value in flat_over.items():
        _set_dotted(raw, key, value)
    return params_from_dict(raw, str(path))
