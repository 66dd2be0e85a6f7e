"""Stage ``evaluate``: generative and task metrics -> ``metrics/evaluate.json`` + DVC plots.

Inputs: ``samples/samples.npz`` (+ ``meta.json``), ``data/prepared/test_*``, ``data/latents/test``,
``data/representations/{test.npy,encoder.pt}`` and the checkpoint (``load_for_inference``), each
only where a metric needs it. ``evaluate.num_samples`` caps the generated samples (n below) and
``evaluate.num_ref`` the test images (the fidelity reference and the heads' test set; null: the
whole split, m below); the names carry no count: n and m are values of their own (``num_samples``,
``num_test_eval``), so runs with different counts share MLflow's columns.

``evaluate.json`` schema (flat; for a given config the same keys every run):

always
    ``num_samples`` n, ``num_reference`` (real images in the fidelity reference: the first m test
    images, or the paired targets for ``transition``), ``num_test_eval`` (test images for the
    heads), ``condition``, ``data_source`` (strings) and three strings that are ``""`` when the
    part ran, else why it did not: ``inception_skipped_reason``, ``domain_skipped_reason``,
    ``label_head_skipped_reason``.
Inception (torch-fidelity ``inception-v3-compat``, when its weights are local; downloaded only with ``evaluate.download_weights``)
    ``fid``, ``kid``, ``kid_std``, ``precision``, ``recall``, ``f_score``;
    ImageNet also ``isc``, ``isc_std``; with ``evaluate.ref_stats_npz`` ``fid_adm_ref``.
Domain (Fashion-MNIST CNN of the representations stage, default profile)
    the same six as ``<metric>_fmnist_cnn``; with sample labels ``cond_acc_fmnist_cnn``
    (condition ``label``: the CNN's accuracy against the asked labels) or
    ``joint_label_acc_fmnist_cnn`` (unconditional: agreement with the jointly generated labels);
    ``class_entropy_fmnist_cnn``: entropy of the network's class histogram of the samples over
    log K (1: every class equally often; unconditional samplers that favour a few classes fall below).
Label head (tasks.label)
    ``label_acc_t<t>`` for t in ``evaluate.classify_t``, ``label_acc_ens``: the model's classifier,
    the label head's softmax averaged over those t, or with ``tasks.label.classifier: clean`` the
    clean-image classifier (the head's ensemble then in ``label_acc_head_ens``); ImageNet also
    ``label_top5_t<t>``, ``label_top5_ens``.
Representation head (tasks.representation)
    ``repr_cos_t<t>``: mean cosine to the encoder's test features.
Diffusion Classifier (tasks.label or model.class_conditional; ``evaluate.diffusion_classifier_images`` > 0)
    ``diffusion_classifier_acc`` on the first N test images, with ``_images`` and ``_draws``: the label
    head's generative reference (Li et al. 2023; classes x draws network calls per image).
Masked / transition samples
    ``masked_mse``, ``masked_psnr`` (hidden pixels only) / ``transition_mse``,
    ``transition_psnr`` (MSE in [0,1] pixel units, PSNR in dB, capped at 100).

Plots (CSV, ``dvc plots show``; header-only when the part does not apply, so the outputs always exist):
``metrics/plots/label_accuracy_vs_t.csv`` (t, accuracy; t outside classify_t on the first 1000 test images),
``metrics/plots/per_class_accuracy.csv``
(class, class_index, accuracy: the clean-image classifier, else the label head at the smallest classify_t) and
``metrics/plots/per_class_sample_accuracy.csv`` (class, class_index, accuracy: domain CNN on samples).

    python -m mtdiff.stages.evaluate [evaluate.num_samples=500 ...]
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mtdiff.checkpoint import EMA, load_for_inference
from mtdiff.config import Params, resolve_path
from mtdiff.data import load_prepared
from mtdiff.encoders import EVAL_NET_FILE, load_fmnist_encoder
from mtdiff.evaluation import accuracy as acc
from mtdiff.evaluation import fidelity as fid
from mtdiff.io import atomic_path, write_json
from mtdiff.pipeline import registry
from mtdiff.pipeline.tracking import file_metrics, stage_run
from mtdiff.stages import stage_main
from mtdiff.utils import ProgressLog, get_logger, pick_device, seed_everything

log = get_logger("mtdiff.evaluate")

PLOTS_SUBDIR = "plots"
ACC_VS_T = "label_accuracy_vs_t.csv"
PER_CLASS = "per_class_accuracy.csv"
PER_CLASS_SAMPLES = "per_class_sample_accuracy.csv"
DOMAIN = "fmnist_cnn"
EVAL_SPACE = "fmnist_eval"
DOMAIN_SPACES = {DOMAIN: "encoder.pt", EVAL_SPACE: EVAL_NET_FILE}  # feature space -> network file
# Extra timesteps for the accuracy-vs-t curve (the metrics use evaluate.classify_t only).
CURVE_T = (1, 10, 50, 100, 250, 500, 750, 1000)
CURVE_IMAGES = 1000  # test images for the curve's timesteps outside classify_t
PSNR_CAP_DB = 100.0


# -- loading (module-level functions so tests can stub the model / encoder) ---------------------
def load_model(params: Params, device: torch.device):
    """(model, diffusion, meta) with EMA weights; FileNotFoundError when there is no checkpoint."""
    return load_for_inference(params, device=device)


def load_domain_encoder(path: Path) -> torch.nn.Module:
    return load_fmnist_encoder(path)


def _read_samples(params: Params) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = params.samples_dir / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples (run the sample stage first)")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if "arr_0" not in arrays:
        raise ValueError(f"{path}: no 'arr_0' image array (keys {sorted(arrays)})")
    meta_path = params.samples_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return arrays, meta


def _test_z0(params: Params, images: np.ndarray, n: int) -> Optional[np.ndarray]:
    """The first n test images in the diffusion space (latents stage's mean; pixel mode can scale the images)."""
    mean = params.latents_dir / "test" / "mean.npy"
    if mean.is_file():
        z = np.load(mean, mmap_mode="r")
        if len(z) < n:
            raise ValueError(f"{mean}: {len(z)} rows, fewer than the {n} test images evaluated")
        return z[:n]
    if params.diffusion.mode == "pixel":
        return images[:n].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return None


def _num_ref(params: Params, available: int) -> int:
    """Test images for the fidelity reference and the heads: ``evaluate.num_ref`` (null: all)."""
    return min(params.evaluate.num_ref or available, available)


@dataclass
class _Inputs:
    """What the metric groups read: the first n samples, their reference images and the test split."""

    params: Params
    device: torch.device
    arrays: dict[str, np.ndarray]  # samples.npz
    condition: str
    samples: np.ndarray  # uint8 NHWC, the first n
    reference: np.ndarray  # the real images the samples are compared with
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    _model: Optional[tuple[Any, Any, dict[str, Any]]] = field(default=None, repr=False)

    def model(self) -> tuple[Any, Any, dict[str, Any]]:
        """(model, diffusion, meta), loaded once for every metric group that reads the model;
        FileNotFoundError when there is no checkpoint."""
        if self._model is None:
            self._model = load_model(self.params, self.device)
        return self._model

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def n_test(self) -> int:
        return _num_ref(self.params, len(self.test_images))

    def name(self, metric: str, space: str = "") -> str:
        return fid.metric_name(metric, space)

    def fidelity_kwargs(self) -> dict[str, Any]:
        ev = self.params.evaluate
        return dict(cache_root=resolve_path(self.params.data.out_dir) / "fidelity_cache", device=self.device,
                    batch_size=ev.batch_size, seed=self.params.seed)


def _load_inputs(params: Params) -> _Inputs:
    arrays, sample_meta = _read_samples(params)
    condition = str(sample_meta.get("condition") or params.sample.condition)
    test_images, test_labels, classes = load_prepared(params, "test")
    samples = fid.as_nhwc_uint8(arrays["arr_0"], "samples.npz arr_0")
    n = min(params.evaluate.num_samples, len(samples))
    if condition == "transition":
        if "reference" not in arrays:
            raise ValueError("samples.npz: condition 'transition' but no 'reference' targets")
        reference = fid.as_nhwc_uint8(arrays["reference"][:n], "samples.npz reference")
    else:
        # an mmap slice: read per image, never copied whole
        reference = test_images[:_num_ref(params, len(test_images))]
    return _Inputs(params, pick_device(params.train.device), arrays, condition, samples[:n], reference,
                   test_images, test_labels, classes)


# -- outputs -------------------------------------------------------------------------------------
def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return path


def _per_class_rows(per_class: np.ndarray, classes: list[str]) -> list[list[Any]]:
    return [[classes[k] if k < len(classes) else str(k), k, round(float(a), 6)]
            for k, a in enumerate(per_class) if np.isfinite(a)]


def _psnr(mse: float) -> float:
    return min(PSNR_CAP_DB, acc.psnr(mse))


# -- the metric groups --------------------------------------------------------------------------
Plots = dict[str, list[list[Any]]]


def _inception_metrics(inp: _Inputs) -> tuple[dict[str, Any], str]:
    """Inception FID / KID / PR (/ IS on ImageNet) and the ADM reference batch; or why they are skipped."""
    ev, params = inp.params.evaluate, inp.params
    if not ev.inception:
        return {}, "evaluate.inception is false"
    weights, reason = fid.inception_weights(ev.feature_extractor_weights_path, ev.download_weights)
    if weights is None:
        return {}, reason or "no Inception weights"
    return fid.fidelity_metrics(inp.samples, inp.reference, extractor=fid.INCEPTION, weights_path=weights,
                                isc=params.data.source == "imagenet", ref_stats_npz=ev.ref_stats_npz,
                                **inp.fidelity_kwargs()), ""


def _domain_metrics(inp: _Inputs) -> tuple[dict[str, Any], Plots, str]:
    """FID / precision / recall in two Fashion-MNIST feature spaces, and each network as a classifier of
    the samples: the representation encoder (``fmnist_cnn``, ``encoder.pt``) and the evaluation network
    that no task trains on (``fmnist_eval``, ``eval_net.pt``), so a model that fits the encoder's
    features (the representation task) cannot win by its own metric alone."""
    params = inp.params
    if params.data.source != "fashion_mnist" or params.data.channels != 1:
        return {}, {}, f"no domain encoder for data.source {params.data.source!r} (Fashion-MNIST only)"
    m: dict[str, Any] = {}
    plots: Plots = {}
    missing = []
    for space, file_name in DOMAIN_SPACES.items():
        path = params.representations_dir / file_name
        if not path.is_file():
            missing.append(f"{path} missing (run the representations stage)")
            continue
        net = load_domain_encoder(path).to(inp.device).eval()
        extractor = fid.register_module_extractor(net, space)
        m.update(fid.fidelity_metrics(inp.samples, inp.reference, extractor=extractor, space=space,
                                      **inp.fidelity_kwargs()))
        pred = acc.classify(net, inp.samples, batch_size=params.evaluate.batch_size, device=inp.device)
        m[inp.name("class_entropy", space)] = acc.class_entropy(pred, len(inp.classes))
        labels = inp.arrays.get("labels")
        if labels is not None and inp.condition in ("label", "uncond"):
            accuracy, per_class = acc.prediction_accuracy(pred, labels[:inp.n])
            m[inp.name("cond_acc" if inp.condition == "label" else "joint_label_acc", space)] = accuracy
            if space == DOMAIN:
                plots[PER_CLASS_SAMPLES] = _per_class_rows(per_class, inp.classes)
    return m, plots, "; ".join(missing)


def _reconstruction_metrics(inp: _Inputs) -> dict[str, Any]:
    """Masked / transition samples against their references (MSE in [0, 1] units, PSNR)."""
    if inp.condition == "masked":
        if not {"reference", "mask"} <= set(inp.arrays):
            raise ValueError("samples.npz: condition 'masked' needs 'reference' and 'mask' arrays")
        mse = acc.masked_region_mse(inp.samples, inp.arrays["reference"][:inp.n], inp.arrays["mask"][:inp.n])
    elif inp.condition == "transition":
        mse = acc.image_mse(inp.samples, inp.reference)
    else:
        return {}
    return {inp.name(f"{inp.condition}_mse"): mse, inp.name(f"{inp.condition}_psnr"): _psnr(mse)}


def _diffusion_classifier_metrics(inp: _Inputs) -> tuple[dict[str, Any], str]:
    """The Diffusion Classifier's accuracy on the first ``evaluate.diffusion_classifier_images`` test
    images (the label head's generative reference); or why it is skipped."""
    params, ev = inp.params, inp.params.evaluate
    if not ev.diffusion_classifier_images:
        return {}, "evaluate.diffusion_classifier_images is 0"
    if not (params.tasks.label.enabled or params.model.class_conditional):
        return {}, "the model takes no label (tasks.label.enabled and model.class_conditional are false)"
    try:
        model, diffusion, _ = inp.model()
    except FileNotFoundError as exc:
        return {}, f"no checkpoint ({exc})"
    n = min(ev.diffusion_classifier_images, inp.n_test)
    z0 = _test_z0(params, inp.test_images, n)
    if z0 is None:
        return {}, f"no test latents at {params.latents_dir / 'test'} (run the latents stage)"
    accuracy = acc.diffusion_classifier_accuracy(
        model, diffusion, z0, inp.test_labels[:n], int(model.num_classes), draws=ev.diffusion_classifier_draws,
        batch_size=ev.batch_size, device=inp.device, seed=params.seed)
    return {"diffusion_classifier_acc": accuracy, "diffusion_classifier_images": float(n),
            "diffusion_classifier_draws": float(ev.diffusion_classifier_draws)}, ""


def _head_metrics(inp: _Inputs) -> tuple[dict[str, Any], Plots, str]:
    """The model's label and representation heads on the real test split; or why the label head is skipped."""
    params = inp.params
    reason = "" if params.tasks.label.enabled else "tasks.label.enabled is false"
    if not (params.tasks.label.enabled or params.tasks.representation.enabled):
        return {}, {}, reason
    try:
        model, diffusion, model_meta = inp.model()
    except FileNotFoundError as exc:
        return {}, {}, reason or f"no checkpoint ({exc})"
    z0 = _test_z0(params, inp.test_images, inp.n_test)
    if z0 is None:
        return {}, {}, reason or f"no test latents at {params.latents_dir / 'test'} (run the latents stage)"
    m: dict[str, Any] = {}
    plots: Plots = {}
    if params.tasks.label.enabled:
        m, plots = _label_head_metrics(inp, model, diffusion, int(model_meta.get("num_classes", 0)), z0)
    if params.tasks.representation.enabled:
        m.update(_representation_head_metrics(inp, model, diffusion, z0))
    return m, plots, reason


def _label_head_metrics(inp: _Inputs, model: Any, diffusion: Any, num_classes: int,
                        z0: np.ndarray) -> tuple[dict[str, Any], Plots]:
    """Top-1 (and on ImageNet top-5) accuracy of the label head per t in classify_t and their ensemble."""
    ev = inp.params.evaluate
    top5 = inp.params.data.source == "imagenet" and num_classes >= 5
    topk = (1, 5) if top5 else (1,)
    T = diffusion.T
    kw = dict(topk=topk, batch_size=ev.batch_size, device=inp.device, seed=inp.params.seed)
    res = acc.label_head_accuracy(model, diffusion, z0, inp.test_labels[:inp.n_test], ev.classify_t,
                                  ensemble_t=ev.classify_t, **kw)
    # the accuracy-vs-t curve's other timesteps are a plot, not a metric: a subset keeps them cheap
    extra_t = sorted(({t for t in CURVE_T if t <= T} | {T}) - set(ev.classify_t))
    n_curve = min(inp.n_test, CURVE_IMAGES)
    per_t = dict(res.per_t)
    if extra_t:
        per_t.update(acc.label_head_accuracy(model, diffusion, z0[:n_curve], inp.test_labels[:n_curve],
                                             extra_t, **kw).per_t)
    curve_t = sorted(per_t)
    name = fid.metric_name
    m: dict[str, Any] = {}
    for t in ev.classify_t:
        m[name(f"label_acc_t{t}")] = res.per_t[t][1]
        if top5:
            m[name(f"label_top5_t{t}")] = res.per_t[t][5]
    ensemble, per_class = res.ensemble, res.per_class
    if getattr(model, "classifier", None) is not None:  # the clean-image classifier is the model's
        m[name("label_acc_head_ens")] = ensemble[1]
        ensemble, per_class = acc.clean_classifier_accuracy(model, z0, inp.test_labels[:inp.n_test], topk=topk,
                                                            batch_size=ev.batch_size, device=inp.device)
    m[name("label_acc_ens")] = ensemble[1]
    if top5:
        m[name("label_top5_ens")] = ensemble[5]
    plots = {ACC_VS_T: [[t, round(per_t[t][1], 6)] for t in curve_t],
             PER_CLASS: _per_class_rows(per_class, inp.classes)}
    return m, plots


def _representation_head_metrics(inp: _Inputs, model: Any, diffusion: Any, z0: np.ndarray) -> dict[str, Any]:
    """Mean cosine between the representation head and the encoder's test features, per t in classify_t."""
    ev = inp.params.evaluate
    rep_path = inp.params.representations_dir / "test.npy"
    if not rep_path.is_file():
        raise FileNotFoundError(f"{rep_path}: tasks.representation is enabled but there are no "
                                f"test features (run the representations stage)")
    feats = np.load(rep_path, mmap_mode="r")[:inp.n_test]
    cos = acc.representation_similarity(model, diffusion, z0, feats, ev.classify_t, batch_size=ev.batch_size,
                                        device=inp.device, seed=inp.params.seed)
    return {f"repr_cos_t{t}": c for t, c in cos.items()}


# -- the stage -----------------------------------------------------------------------------------
def compute(params: Params) -> tuple[dict[str, Any], Plots]:
    """All metrics that apply to ``params``: (flat metrics dict, plot rows by file name)."""
    seed_everything(params.seed)
    inp = _load_inputs(params)
    m: dict[str, Any] = {
        "num_samples": float(inp.n), "num_reference": float(len(inp.reference)), "num_test_eval": float(inp.n_test),
        "condition": inp.condition, "data_source": params.data.source,
    }
    plots: Plots = {ACC_VS_T: [], PER_CLASS: [], PER_CLASS_SAMPLES: []}
    progress = ProgressLog(log, "evaluate: metric groups (Inception, domain, reconstruction, heads, "
                                "Diffusion Classifier)", 5, every_s=0)
    inception, m["inception_skipped_reason"] = _inception_metrics(inp)
    progress.update(1)
    domain, domain_plots, m["domain_skipped_reason"] = _domain_metrics(inp)
    progress.update(2)
    reconstruction = _reconstruction_metrics(inp)
    progress.update(3)
    heads, head_plots, m["label_head_skipped_reason"] = _head_metrics(inp)
    progress.update(4)
    generative, m["diffusion_classifier_skipped_reason"] = _diffusion_classifier_metrics(inp)
    progress.update(5)
    for part, what in (("inception", "Inception"), ("domain", "domain (Fashion-MNIST CNN)"),
                       ("label_head", "label-head")):
        if m[f"{part}_skipped_reason"]:
            log.warning("%s metrics skipped: %s", what, m[f"{part}_skipped_reason"])
    m.update({**inception, **domain, **reconstruction, **heads, **generative})
    plots.update({**domain_plots, **head_plots})
    log.info("evaluated %s samples against %s reference images, condition %s", inp.n, len(inp.reference), inp.condition)
    return m, plots


def run(params: Params) -> dict[str, Any]:
    """Compute the metrics that apply, write ``evaluate.json`` and the plot CSVs, log them to MLflow."""
    t0 = time.time()
    out_dir = params.metrics_dir
    metrics, plots = compute(params)
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"evaluate: metric {k} is {v}")  # never write NaN/inf into the metrics file
    metrics_path = write_json(out_dir / "evaluate.json", metrics)
    plot_paths = {
        ACC_VS_T: _write_csv(out_dir / PLOTS_SUBDIR / ACC_VS_T, ["t", "accuracy"], plots[ACC_VS_T]),
        PER_CLASS: _write_csv(out_dir / PLOTS_SUBDIR / PER_CLASS, ["class", "class_index", "accuracy"],
                              plots[PER_CLASS]),
        PER_CLASS_SAMPLES: _write_csv(out_dir / PLOTS_SUBDIR / PER_CLASS_SAMPLES,
                                      ["class", "class_index", "accuracy"], plots[PER_CLASS_SAMPLES]),
    }
    numbers = file_metrics(metrics_path, metrics)  # evaluate/<key>: the parent and sweep runs' keys too
    with stage_run(params, "evaluate", out_dir) as mlrun:
        # the model these samples came from (by ema.pt's digest): its numbers, then the registry alias
        version = registry.evaluated_version(params.checkpoints_dir / EMA) if mlrun.online else None
        mlrun.log_metrics({**numbers, "evaluate/wall_time_s": time.time() - t0},
                          model_id=registry.model_id_of(version))
        mlrun.set_tags({f"evaluate.{k}": v for k, v in metrics.items() if isinstance(v, str) and v})
        mlrun.log_artifact(metrics_path)
        for p in plot_paths.values():
            mlrun.log_artifact(p, artifact_path=PLOTS_SUBDIR)
        registry.promote(params, version)
    log.info("wrote %s (%d metrics) in %.1f s", metrics_path, len(numbers), time.time() - t0)
    return {"metrics_path": str(metrics_path), "plots": {k: str(v) for k, v in plot_paths.items()},
            "metrics": metrics, "wall_time_s": time.time() - t0}


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
