"""Typed, validated configuration, loaded once from ``params.yaml``.

``load_params()`` reads ``params.yaml`` and validates it with one precedence rule: ``key.sub=value``
overrides, then what params.yaml sets (a value other than the built-in default it ships with), then
``configs/<profile>.yaml`` (``default``: empty sections), then the built-in defaults. A wrong key, type
or value raises :class:`ConfigError` with one line naming the dotted key and what is allowed.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
PROFILES_DIR = REPO_ROOT / "configs"
LATENT_DOWNSAMPLE = 8  # SD-VAE's spatial downsampling (the one definition; mtdiff.models.factory uses it)
FMNIST_DIR_ENV = "MTDIFF_FMNIST_DIR"  # when set, overrides data.fashion_mnist_dir (before key=value overrides)
TRAIN_STATE_ROOT_ENV = "MTDIFF_TRAIN_STATE_ROOT"  # when set: where training keeps its resumable state (mtdiff.train.state)
_PROFILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2; PyYAML's 1.1 rules make it a string)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(path: str | os.PathLike, what: str = "params file") -> Any:
    """Parse a YAML file; unreadable, non-UTF-8 or malformed content is a one-line ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this {what} ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                          f"save the {what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_ParamsLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}malformed YAML ({problem})") from None


class ConfigError(ValueError):
    """A bad parameter: the message names the dotted key and what is allowed."""


class _Section(BaseModel):
    # strict: `steps: '3000'` or `seed: true` is an error, not silently coerced (an int is still
    # accepted for a float field, and YAML's `1e-4` is read as a float by _ParamsLoader)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
    # reference_unet / reference_dit: diffusers' UNet2DModel / DiTTransformer2DModel (eps only), the
    # library baselines the engine is measured against (mtdiff.models.reference); not MT-Diffusion models
    backbone: Literal["unet", "dit", "reference_unet", "reference_dit"] = "unet"
    # DiT (latent mode, or backbone: dit)
    size: Literal["S", "B", "L", "XL", "custom"] = "custom"
    depth: int = Field(4, ge=1)
    hidden_size: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    patch_size: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    # U-Net (pixel mode)
    channels: int = Field(32, ge=8)
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1)
    num_res_blocks: int = Field(1, ge=1)
    attn_resolutions: list[int] = Field(default_factory=lambda: [7])
    dropout: float = Field(0.0, ge=0, lt=1)
    norm_groups: int = Field(8, ge=1)   # GroupNorm groups (gcd with the channels); also the reference's
    # heads and conditioning
    head_hidden: int = Field(256, ge=1)
    label_feedback: bool = True
    class_conditional: bool = False
    class_dropout: float = Field(0.1, ge=0, lt=1)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(depth, hidden_size, num_heads): DiT's table for S/B/L/XL, else the custom fields."""
        return DIT_SIZES[self.size] if self.size != "custom" else (self.depth, self.hidden_size, self.num_heads)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        depth, hidden, heads = self.dims
        if self.backbone in ("dit", "reference_dit") and hidden % heads:
            raise ValueError(f"hidden_size {hidden} must be divisible by num_heads {heads}")
        if self.backbone == "unet" and self.channels % heads:
            raise ValueError(f"channels {self.channels} must be divisible by num_heads {heads}")
        return self


class DiffusionConfig(_Section):
    mode: Literal["pixel", "latent"] = "pixel"
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    # sigma: c_t = w_max * sqrt(1 - abar_t), the task signal a fixed fraction of the noise (M3)
    w_schedule: Literal["linear", "constant", "cosine", "sigma"] = "sigma"
    w_max: float = Field(0.5, ge=0)
    prediction: Literal["eps", "z0"] = "eps"
    # weight of the eps term per timestep: none (Ho et al.'s simple loss) or min_snr, Hang et al.'s
    # Min-SNR-gamma, min(SNR_t, gamma) / SNR_t for eps prediction (SNR_t = abar_t / (1 - abar_t))
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = Field(5.0, gt=0)


class LabelTask(_Section):
    enabled: bool = True
    weight: float = Field(0.1, ge=0)
    # P(label absent from A in a training example; M2: absent modalities contribute 0). The head
    # then learns to read the image, and the sampler can guide between label given and absent.
    dropout: float = Field(0.1, ge=0, lt=1)
    # the label loss only on samples with t <= max_t (null: every t): the head is read as a
    # classifier at small t (evaluate.classify_t), so its capacity can go there
    max_t: Optional[int] = Field(None, ge=1)
    # What classifies an image (evaluate's label_acc_ens). head: the label head above, on z_t at
    # evaluate.classify_t; it mostly sees z_t carrying the label's code, so it learns to read the code
    # back (docs/study.md). clean: a second head on pooled features of every encoder block and the
    # middle, reading the clean image (t = 0, no task code) as it is evaluated; trained jointly, its
    # cross-entropy weighted by classifier_weight (Joint Diffusion, Deja et al.). Default clean at 0.1:
    # 0.876 +- 0.003 against the head's 0.753 +- 0.007 (3 seeds) at joint_label's FID; weight 1 classifies
    # no better and costs FID (its gradient dominates the clipped step; docs/study.md, issue #33)
    classifier: Literal["head", "clean"] = "clean"
    classifier_weight: float = Field(0.1, ge=0)
    classifier_dropout: float = Field(0.7, ge=0, lt=1)


class RepresentationTask(_Section):
    enabled: bool = False
    weight: float = Field(0.1, ge=0)
    loss: Literal["mse", "cosine"] = "mse"


class MaskedTask(_Section):
    enabled: bool = False
    weight: float = Field(0.5, ge=0)
    mask_ratio: float = Field(0.5, ge=0, lt=1)
    # P(masked image absent from A in a training example, every patch hidden), as the label's
    # dropout: the sampler may then leave it out (sample.predicted_masked: absent)
    dropout: float = Field(0.0, ge=0, lt=1)


class TransitionTask(_Section):
    enabled: bool = False
    weight: float = Field(0.5, ge=0)
    pairing: Literal["rot90", "edges"] = "rot90"


TASKS = ("label", "representation", "masked", "transition")  # the extra tasks, in their fixed order


class TasksConfig(_Section):
    label: LabelTask = LabelTask()
    representation: RepresentationTask = RepresentationTask()
    masked: MaskedTask = MaskedTask()
    transition: TransitionTask = TransitionTask()

    @property
    def enabled(self) -> list[str]:
        """Names of the enabled extra tasks, in a fixed order."""
        return [n for n in TASKS if getattr(self, n).enabled]

    @property
    def clean_classifier(self) -> bool:
        """Whether the model carries the clean-image classifier (a loss term of its own)."""
        return self.label.enabled and self.label.classifier == "clean"


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
    # dinov2 / clip input size (null: the model's own, 518 for DINOv2); a multiple of the patch size
    image_size: Optional[int] = Field(None, ge=1)
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    dim: int = Field(128, ge=1)


class TrainConfig(_Section):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)
    # auto: bf16 on CUDA and on CPUs with bf16 units (amx_bf16 / avx512_bf16); bf16 / fp16: CUDA only
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool = True
    compile: bool = False
    num_workers: int = Field(0, ge=0)
    ckpt_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    grid_every: int = Field(200, ge=0)  # 0: off
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out_dir: str = "checkpoints"
    # the paper's single-task fine-tune, inside the budget: the last finetune_steps of train.steps
    # train the image (eps) loss alone; finetune_tasks stay in the forward process as the condition
    # the sampler gives (e.g. [label]), the other tasks leave it; the EMA restarts at the switch
    finetune_steps: int = Field(0, ge=0)
    finetune_tasks: list[Literal["label", "representation", "masked", "transition"]] = []


class SampleConfig(_Section):
    num_samples: int = Field(750, ge=1)
    batch_size: int = Field(250, ge=1)
    steps: int = Field(50, ge=1)
    sampler: Literal["ddpm", "ddim", "dpmpp2m"] = "ddim"   # dpmpp2m: DPM-Solver++(2M), deterministic
    eta: float = Field(1.0, ge=0)
    condition: Literal["uncond", "label", "masked", "transition"] = "label"
    cfg_scale: float = Field(1.0, ge=0)       # classifier-free guidance (model.class_conditional)
    task_guidance: float = Field(1.5, ge=0)   # MT task guidance: eps_absent + s (eps_given - eps_absent)
    # a label the sampler is not given enters A_hat as the head's softmax (soft: the method's expected
    # code), its argmax (hard: one class's code, as training shows), or not at all (absent: code 0,
    # the label-dropout state of training), or as one class drawn from the head's softmax at z_T and
    # held for the chain (drawn: y first, then x | y)
    predicted_label: Literal["soft", "hard", "absent", "drawn"] = "soft"
    # a masked image the sampler is not given enters A_hat as (1 - mask_ratio) times the head's image
    # (expected: its mean over masks), times a patch mask drawn per sample (masked: training's form),
    # or not at all (absent: every patch hidden, what tasks.masked.dropout trains)
    predicted_masked: Literal["expected", "masked", "absent"] = "expected"
    # most images per network call (guidance's doubled batch is split): on CPU a call above ~128
    # images of the default U-Net falls out of the cache (measured 1.8x slower per image); null: one call
    forward_batch: Optional[int] = Field(100, ge=1)
    out_dir: str = "samples"


class EvaluateConfig(_Section):
    num_samples: int = Field(750, ge=1)
    # test images used as the fidelity reference and by the task heads; null: the whole test split
    num_ref: Optional[int] = Field(10000, ge=1)
    batch_size: int = Field(250, ge=1)
    inception: bool = True
    feature_extractor_weights_path: Optional[str] = None
    # offline by default: without local Inception weights, Inception metrics are skipped, not downloaded
    download_weights: bool = False
    ref_stats_npz: Optional[str] = None
    classify_t: list[int] = Field(default_factory=lambda: [1, 10, 50], min_length=1)
    # the Diffusion Classifier (a generative reference for the label head): the first N test images,
    # classes x draws network calls each; 0: off
    diffusion_classifier_images: int = Field(200, ge=0)
    diffusion_classifier_draws: int = Field(8, ge=1)
    out_dir: str = "metrics"


class MlflowConfig(_Section):
    tracking_uri: Optional[str] = None
    experiment: str = "mtdiff"
    # registry alias of the newest evaluated model version: moved by the evaluate stage outside a sweep
    # (models:/mtdiff@champion; rule in mtdiff/pipeline/registry.py); null: no alias
    model_alias: Optional[str] = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")


# Seeds are derived per rank/stream (train: seed * 1_000_003 + 17 + rank for torch's 64-bit seeds):
# 32 bits keeps every derived seed in range, as NumPy's legacy seeding requires anyway.
MAX_SEED = 2**32 - 1


class Params(_Section):
    profile: str = "default"  # configs/<profile>.yaml: the values of the keys params.yaml leaves at their default
    seed: int = Field(0, ge=0, le=MAX_SEED)
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
        if self.sample.condition == "label" and not (t.label.enabled or self.model.class_conditional):
            raise ValueError("sample.condition 'label' needs tasks.label.enabled: true "
                             "or model.class_conditional: true")
        if self.sample.condition == "masked" and not t.masked.enabled:
            raise ValueError("sample.condition 'masked' needs tasks.masked.enabled: true")
        if self.sample.condition == "transition" and not t.transition.enabled:
            raise ValueError("sample.condition 'transition' needs tasks.transition.enabled: true")
        if self.sample.steps > self.diffusion.timesteps:
            raise ValueError(f"sample.steps {self.sample.steps} exceeds diffusion.timesteps {self.diffusion.timesteps}")
        if self.data.source == "imagenet" and not self.data.imagenet_dir:
            raise ValueError("data.source 'imagenet' needs data.imagenet_dir (an ImageFolder root)")
        T = self.diffusion.timesteps
        bad_t = sorted({t for t in self.evaluate.classify_t if not 1 <= t <= T})
        if bad_t:
            raise ValueError(f"evaluate.classify_t {bad_t} outside [1, diffusion.timesteps={T}]")
        if t.label.max_t is not None and t.label.max_t > T:
            raise ValueError(f"tasks.label.max_t {t.label.max_t} exceeds diffusion.timesteps {T}")
        if self.model.backbone.startswith("reference_") and t.enabled:
            raise ValueError(f"model.backbone '{self.model.backbone}' (a library baseline) has no task heads; "
                             f"disable tasks {t.enabled} or use backbone 'unet' / 'dit'")
        if self.model.backbone == "reference_dit" and not self.model.class_conditional:
            raise ValueError("model.backbone 'reference_dit' is class-conditional only (its adaLN takes a "
                             "label): set model.class_conditional: true")
        _check_finetune(self)
        _check_patch_divides(self)
        check_output_dirs(self)
        return self

    # -- the tasks in effect: all of tasks.* until the fine-tune, then only train.finetune_tasks --
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


def _check_finetune(p: "Params") -> None:
    tc, enabled = p.train, p.tasks.enabled
    if tc.finetune_steps >= tc.steps:
        raise ValueError(f"train.finetune_steps {tc.finetune_steps} must be below train.steps {tc.steps}")
    stray = [n for n in tc.finetune_tasks if n not in enabled]
    if stray:
        raise ValueError(f"train.finetune_tasks {stray} are not enabled (tasks enabled: {enabled})")
    cond = p.sample.condition
    if tc.finetune_steps and cond in enabled and cond not in tc.finetune_tasks:
        raise ValueError(f"sample.condition {cond!r} needs {cond!r} in train.finetune_tasks "
                         f"(the fine-tuned model is conditioned only on those)")


def _check_patch_divides(params: "Params") -> None:
    """data.resolution (pixel) or its latent size (latent: /8) must be a multiple of model.patch_size."""
    model = params.model
    kind = next((str(getattr(model, a)) for a in ("arch", "backbone", "kind") if hasattr(model, a)), "dit")
    patch = getattr(model, "patch_size", None)
    if "dit" not in kind.lower() or not patch:
        return
    res = params.data.resolution
    if params.diffusion.mode == "latent":
        if res % LATENT_DOWNSAMPLE:
            return  # the latents stage names this one (the VAE's factor); nothing for the patch to divide
        size, what = res // LATENT_DOWNSAMPLE, f"the latent size {res // LATENT_DOWNSAMPLE} (data.resolution/8)"
    else:
        size, what = res, f"data.resolution {res}"
    if size % patch:
        raise ValueError(f"model.patch_size {patch} must divide {what}")


# -- output folders: where stages may write ---------------------------------------------------
OUTPUT_ROOTS_ENV = "MTDIFF_OUTPUT_ROOTS"  # extra folders (os.pathsep-separated) outputs may live in
# Top-level entries of the project that no output folder may be, or be inside, or contain.
_RESERVED = {".git", ".dvc", ".venv", ".mtdiff", ".prefect", "mtdiff", "flows", "tests", "configs",
             "params.yaml", "dvc.yaml", "dvc.lock", "pyproject.toml", "Makefile", "README.md"}
OUTPUT_KEYS = ("data.out_dir", "train.out_dir", "sample.out_dir", "evaluate.out_dir")
INPUT_KEYS = ("data.fashion_mnist_dir", "data.imagenet_dir", "representations.weights_path",
              "evaluate.feature_extractor_weights_path", "evaluate.ref_stats_npz", "latents.vae")


def project_root(cwd: str | os.PathLike | None = None) -> Path:
    """The project the stages run in: the nearest folder from ``cwd`` up holding dvc.yaml, else ``cwd``
    (DVC runs stages in the project root; ``dvc exp run --temp`` in a copy that has its own dvc.yaml)."""
    here = Path(os.path.abspath(cwd or os.getcwd()))
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def _output_roots(root: Path) -> list[Path]:
    extra = [Path(os.path.abspath(os.path.expanduser(p)))
             for p in os.environ.get(OUTPUT_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [root, *extra]


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _overlap(a: Path, b: Path) -> bool:
    return _within(a, b) or _within(b, a)


def _get(params: "Params", dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


def check_output_dirs(params: "Params", cwd: str | os.PathLike | None = None) -> None:
    """Refuse output folders that could wipe something a stage did not make.

    Each ``*.out_dir`` must lie inside the project (or a folder of $MTDIFF_OUTPUT_ROOTS), be none of
    its source/config entries, and neither equal nor contain (nor lie inside) another stage's output
    folder or a data input (``data.fashion_mnist_dir`` & co.). Checked lexically (``~``, ``..``) and
    after resolving symlinks.
    """
    root = project_root(cwd)
    roots = _output_roots(root)
    outs: dict[str, tuple[Path, Path]] = {}
    for key in OUTPUT_KEYS:
        raw = str(_get(params, key))
        if raw.startswith("~"):
            raise ValueError(f"{key} {raw!r}: a home-relative output folder lies outside the project {root}; "
                             f"use a path inside it (or list its parent in ${OUTPUT_ROOTS_ENV})")
        lexical = Path(os.path.abspath(os.path.join(os.getcwd() if cwd is None else cwd, raw)))
        if not any(_within(lexical, r) for r in roots):
            raise ValueError(f"{key} {raw!r} resolves to {lexical}, outside the project {root}; "
                             f"outputs stay inside it (or list the folder in ${OUTPUT_ROOTS_ENV})")
        if any(lexical == r or _within(r, lexical) for r in roots):
            raise ValueError(f"{key} {raw!r} is the project folder {root} itself (or holds it); "
                             f"use a subfolder")
        if _within(lexical, root):
            rel = lexical.relative_to(root).parts
            if rel and rel[0] in _RESERVED:
                raise ValueError(f"{key} {raw!r} is inside {rel[0]}, which is part of the project, "
                                 f"not an output folder")
        outs[key] = (lexical, lexical.resolve())
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if any(_overlap(x, y) for x in outs[a] for y in outs[b]):
                raise ValueError(f"{a} {_get(params, a)!r} and {b} {_get(params, b)!r} overlap: one stage's "
                                 f"output folder would replace the other's; give each its own folder")
    for key in INPUT_KEYS:
        raw = _get(params, key)
        if not raw:
            continue
        if key == "latents.vae" and not (os.sep in str(raw) and Path(str(raw)).expanduser().exists()):
            continue  # a hub name, not a local folder
        inp = Path(os.path.abspath(os.path.expanduser(str(raw))))
        for out_key, paths in outs.items():
            if any(_overlap(p, q) for p in paths for q in (inp, inp.resolve())):
                raise ValueError(f"{out_key} {_get(params, out_key)!r} overlaps the input {key} {raw!r}: "
                                 f"an output folder must not hold (or be inside) data the pipeline reads")


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
        try:
            out[key.strip()] = yaml.load(raw, Loader=_ParamsLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': not a YAML value ({getattr(exc, 'problem', exc)})") from None
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


def _read_profile(profile: Any, path: Path) -> dict[str, Any]:
    """``configs/<profile>.yaml``. Every profile is a file, the default one too (empty sections):
    dvc.yaml tracks ``configs/${profile}.yaml`` for every run."""
    allowed = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
    # a profile is a plain name of a file in configs/, never a path
    if not isinstance(profile, str) or not _PROFILE_RE.match(profile) or ".." in profile:
        raise ConfigError(f"{path}: profile: {profile!r} is not a profile name (a file name in "
                          f"{PROFILES_DIR} without .yaml, no path); allowed: {allowed}")
    prof_path = PROFILES_DIR / f"{profile}.yaml"
    if not prof_path.is_file():
        raise ConfigError(f"{path}: profile: no profile '{profile}'; allowed: {allowed}")
    prof = read_yaml(prof_path, "profile") or {}
    if not isinstance(prof, dict):
        raise ConfigError(f"{prof_path}: expected a mapping at the top level")
    return prof


@functools.cache
def _builtin_defaults() -> dict[str, Any]:
    return Params().model_dump()


def _same(a: Any, b: Any) -> bool:
    # by type too: `grad_clip: 1` is not taken for the default 1.0, nor `seed: false` for 0
    return type(a) is type(b) and a == b


def _set_in_file(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``raw`` whose value differs from the built-in default: what the user set. params.yaml
    lists every key at its default, so a key still at it says nothing and the profile's value applies."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            if changed := _set_in_file(value, default):
                out[key] = changed
        elif key not in defaults or not _same(value, default):
            out[key] = value
    return out


def _resolve(raw: dict[str, Any], overrides: dict[str, Any], path: Path) -> Params:
    """The one precedence rule: overrides > what params.yaml sets (differs from the built-in default)
    > configs/<profile>.yaml > built-in defaults (= params.yaml as shipped)."""
    profile = overrides.get("profile", raw.get("profile", "default"))
    set_keys = _set_in_file({k: v for k, v in raw.items() if k != "profile"}, _builtin_defaults())
    merged = _deep_merge(_read_profile(profile, path), set_keys)
    merged["profile"] = profile
    if os.environ.get(FMNIST_DIR_ENV):
        _set_dotted(merged, "data.fashion_mnist_dir", os.environ[FMNIST_DIR_ENV])
    for key, value in overrides.items():
        _set_dotted(merged, key, value)
    return params_from_dict(merged, str(path))


def _read_params_file(path: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    path = Path(path or os.environ.get("MTDIFF_PARAMS", "params.yaml"))
    if not path.exists() and path == Path("params.yaml"):
        path = DEFAULT_PARAMS
    if not path.exists():
        raise ConfigError(f"{path}: no such params file")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return path, raw


def load_params(path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Params:
    """Load ``params.yaml`` (or ``path``) with its profile and ``overrides`` (command-line ``key=value``,
    which win over everything), validated. The rule: :func:`_resolve`."""
    path, raw = _read_params_file(path)
    return _resolve(raw, parse_overrides(overrides), path)


def load_params_written(path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None) -> Params:
    """What the stages read once ``overrides`` are written into ``path`` (as ``dvc exp run -S`` and the
    flows do). An override that, written, would not run as given is refused: a key set back to its
    built-in default under a profile that changes it reads as unset, so the profile's value would run."""
    path, raw = _read_params_file(path)
    over = parse_overrides(overrides)
    written = copy.deepcopy(raw)
    for key, value in over.items():
        _set_dotted(written, key, value)
    params = _resolve(written, {}, path)
    asked, runs = load_params(path, over).flat(), params.flat()
    lost = [k for k in asked if not _same(asked[k], runs[k])]
    if lost:
        key, profile = lost[0], params.profile
        by_env = key == "data.fashion_mnist_dir" and os.environ.get(FMNIST_DIR_ENV)
        why = (f"${FMNIST_DIR_ENV} overrides it" if by_env else
               f"a key at its built-in default reads as unset there, and profile {profile!r} sets it; set it in "
               f"configs/{profile}.yaml, or pass it to the stage (python -m mtdiff.stages.<name> {key}=...)")
        raise ConfigError(f"{path}: {key}={asked[key]!r} cannot be written into params.yaml: the stages would "
                          f"read {runs[key]!r}, since {why}")
    return params


# -- what each param means (stage --help, `mtdiff config --explain`) ---------------------------------
def _field_docs(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, str]]:
    """Dotted key -> (type, Field description) of every leaf of ``model``."""
    out: dict[str, tuple[str, str]] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_field_docs(ann, f"{prefix}{name}."))
        else:
            shown = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            out[prefix + name] = (shown, field.description or "")
    return out


def _yaml_comments(path: Path = DEFAULT_PARAMS) -> dict[str, str]:
    """Dotted key -> its end-of-line comment in params.yaml (the file documents most keys there)."""
    from ruamel.yaml import YAML

    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for key in node:
            if isinstance(node[key], dict):
                walk(node[key], f"{prefix}{key}.")
                continue
            token = (node.ca.items.get(key) or [None] * 3)[2]
            text = token.value.split("\n", 1)[0].lstrip("#").strip() if token is not None else ""
            if text:
                out[prefix + key] = text

    try:
        walk(YAML().load(path.read_text()) or {}, "")
    except Exception:  # noqa: BLE001 - descriptions are a help text nicety
        pass
    return out


def param_docs() -> dict[str, tuple[str, str]]:
    """Dotted key -> (type, one-line description): the Field's description, else params.yaml's comment."""
    comments = _yaml_comments()
    return {k: (t, d or comments.get(k, "")) for k, (t, d) in _field_docs(Params).items()}


def params_help(prefixes: list[str], values: dict[str, Any] | None = None) -> str:
    """One line per param under ``prefixes`` (``train`` or ``train.steps``): key = value  # description.
    ``values``: the flat params that would run (default: the built-in defaults)."""
    values = values if values is not None else Params().flat()
    docs = param_docs()
    keys = [k for k in docs if any(k == p or k.startswith(p + ".") for p in prefixes)]
    width = max((len(k) for k in keys), default=0)
    lines = []
    for key in keys:
        kind, text = docs[key]
        lines.append(f"  {key:<{width}} = {values.get(key)!r:<14} {text or '(' + kind + ')'}")
    return "\n".join(lines)
