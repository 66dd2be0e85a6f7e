"""Stage ``evaluate``: generative and task metrics -> ``metrics/evaluate.json`` + DVC plots.

Inputs: ``samples/samples.npz`` (+ ``meta.json``), ``data/prepared/test_*``, ``data/latents/test``,
``data/representations/{test.npy,encoder.pt}`` and the checkpoint (``load_for_inference``), each
only where a metric needs it. ``evaluate.num_samples`` caps the generated samples and the test
images used; n below is that count and every figure's name ends in ``count_tag(n)`` (``1k``, ``500`` ...).

``evaluate.json`` schema (flat; for a given config the same keys every run):

always
    ``num_samples`` n, ``num_reference`` (real images in the fidelity reference: the first n test
    images, or the paired targets for ``transition``), ``num_test_eval`` (test images for the
    heads), ``condition``, ``data_source`` (strings) and three strings that are ``""`` when the
    part ran, else why it did not: ``inception_skipped_reason``, ``domain_skipped_reason``,
    ``label_head_skipped_reason``.
Inception (torch-fidelity ``inception-v3-compat``, when its weights are available)
    ``fid_<n>``, ``kid_<n>``, ``kid_std_<n>``, ``precision_<n>``, ``recall_<n>``, ``f_score_<n>``;
    ImageNet also ``isc_<n>``, ``isc_std_<n>``; with ``evaluate.ref_stats_npz`` ``fid_adm_ref_<n>``.
Domain (Fashion-MNIST CNN of the representations stage, default profile)
    the same six as ``<metric>_fmnist_cnn_<n>``; with sample labels ``cond_acc_fmnist_cnn_<n>``
    (condition ``label``: the CNN's accuracy against the asked labels) or
    ``joint_label_acc_fmnist_cnn_<n>`` (unconditional: agreement with the jointly generated labels).
Label head (tasks.label)
    ``label_acc_t<t>_<n>`` for t in ``evaluate.classify_t``, ``label_acc_ens_<n>`` (softmax
    averaged over those t), ImageNet also ``label_top5_t<t>_<n>``, ``label_top5_ens_<n>``.
Representation head (tasks.representation)
    ``repr_cos_t<t>_<n>``: mean cosine to the encoder's test features.
Masked / transition samples
    ``masked_mse_<n>``, ``masked_psnr_<n>`` (hidden pixels only) / ``transition_mse_<n>``,
    ``transition_psnr_<n>`` (MSE in [0,1] pixel units, PSNR in dB, capped at 100).

Plots (CSV, ``dvc plots show``; header-only when the part does not apply, so the outputs always exist):
``metrics/plots/label_accuracy_vs_t.csv`` (t, accuracy), ``metrics/plots/per_class_accuracy.csv``
(class, class_index, accuracy: label head at the smallest classify_t) and
``metrics/plots/per_class_sample_accuracy.csv`` (class, class_index, accuracy: domain CNN on samples).

    python -m mtdiff.stages.evaluate [evaluate.num_samples=500 ...]
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mtdiff.config import Params, resolve_path
from mtdiff.data import load_prepared
from mtdiff.evaluation import accuracy as acc
from mtdiff.evaluation import fidelity as fid
from mtdiff.io import atomic_path, write_json
from mtdiff.stages import stage_main
from mtdiff.utils import get_logger, pick_device, seed_everything

log = get_logger("mtdiff.evaluate")

PLOTS_SUBDIR = "plots"
ACC_VS_T = "label_accuracy_vs_t.csv"
PER_CLASS = "per_class_accuracy.csv"
PER_CLASS_SAMPLES = "per_class_sample_accuracy.csv"
DOMAIN = "fmnist_cnn"
# Extra timesteps for the accuracy-vs-t curve (the metrics use evaluate.classify_t only).
CURVE_T = (1, 10, 50, 100, 250, 500, 750, 1000)
PSNR_CAP_DB = 100.0


# -- loading (module-level functions so tests can stub the model / encoder) ---------------------
def load_model(params: Params, device: torch.device):
    """(model, diffusion, meta) with EMA weights; FileNotFoundError when there is no checkpoint."""
    from mtdiff.checkpoint import load_for_inference

    return load_for_inference(params, device=device)


def load_domain_encoder(path: Path) -> torch.nn.Module:
    from mtdiff.encoders import load_fmnist_encoder

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


# -- the stage -----------------------------------------------------------------------------------
def compute(params: Params) -> tuple[dict[str, Any], dict[str, list[list[Any]]]]:
    """All metrics that apply to ``params``: (flat metrics dict, plot rows by file name)."""
    ev = params.evaluate
    seed_everything(params.seed)
    device = pick_device(params.train.device)
    arrays, sample_meta = _read_samples(params)
    condition = str(sample_meta.get("condition") or params.sample.condition)
    test_images, test_labels, classes = load_prepared(params, "test")

    samples = fid.as_nhwc_uint8(arrays["arr_0"], "samples.npz arr_0")
    n = min(ev.num_samples, len(samples))
    samples = samples[:n]
    if condition == "transition":
        if "reference" not in arrays:
            raise ValueError("samples.npz: condition 'transition' but no 'reference' targets")
        reference = fid.as_nhwc_uint8(arrays["reference"][:n], "samples.npz reference")
    else:
        reference = test_images[:min(n, len(test_images))]  # an mmap slice: read per image, never copied whole
    n_test = min(ev.num_samples, len(test_images))
    tag = fid.count_tag(n)
    name = lambda metric, space="": fid.metric_name(metric, n, space)  # noqa: E731

    m: dict[str, Any] = {
        "num_samples": float(n), "num_reference": float(len(reference)), "num_test_eval": float(n_test),
        "condition": condition, "data_source": params.data.source,
        "inception_skipped_reason": "", "domain_skipped_reason": "", "label_head_skipped_reason": "",
    }
    plots: dict[str, list[list[Any]]] = {ACC_VS_T: [], PER_CLASS: [], PER_CLASS_SAMPLES: []}
    cache_root = resolve_path(params.data.out_dir) / "fidelity_cache"
    common = dict(cache_root=cache_root, device=device, batch_size=ev.batch_size, seed=params.seed)

    # Inception FID / KID / PR (/ IS on ImageNet) and the ADM reference batch
    reason = ""
    if not ev.inception:
        reason = "evaluate.inception is false"
    else:
        weights, reason = fid.inception_weights(ev.feature_extractor_weights_path)
        if weights is not None:
            reason = ""
            m.update(fid.fidelity_metrics(samples, reference, extractor=fid.INCEPTION, weights_path=weights,
                                          isc=params.data.source == "imagenet", ref_stats_npz=ev.ref_stats_npz,
                                          **common))
    if reason:
        log.warning("Inception metrics skipped: %s", reason)
    m["inception_skipped_reason"] = reason or ""

    # Domain FID with the project's Fashion-MNIST encoder, and the encoder as a classifier of the samples
    reason = ""
    encoder = None
    enc_path = params.representations_dir / "encoder.pt"
    if params.data.source != "fashion_mnist" or params.data.channels != 1:
        reason = f"no domain encoder for data.source {params.data.source!r} (Fashion-MNIST only)"
    elif not enc_path.is_file():
        reason = f"{enc_path} missing (run the representations stage)"
    else:
        encoder = load_domain_encoder(enc_path).to(device).eval()
        ext = fid.register_module_extractor(encoder, DOMAIN)
        m.update(fid.fidelity_metrics(samples, reference, extractor=ext, space=DOMAIN, **common))
        labels = arrays.get("labels")
        if labels is not None and condition in ("label", "uncond"):
            a, per_class = acc.classifier_accuracy(encoder, samples, labels[:n], batch_size=ev.batch_size,
                                                   device=device)
            key = "cond_acc" if condition == "label" else "joint_label_acc"
            m[name(key, DOMAIN)] = a
            plots[PER_CLASS_SAMPLES] = _per_class_rows(per_class, classes)
    if reason:
        log.warning("domain (Fashion-MNIST CNN) metrics skipped: %s", reason)
    m["domain_skipped_reason"] = reason

    # Masked / transition reconstructions against their references
    if condition == "masked":
        if not {"reference", "mask"} <= set(arrays):
            raise ValueError("samples.npz: condition 'masked' needs 'reference' and 'mask' arrays")
        mse = acc.masked_region_mse(samples, arrays["reference"][:n], arrays["mask"][:n])
        m[name("masked_mse")], m[name("masked_psnr")] = mse, _psnr(mse)
    elif condition == "transition":
        mse = acc.image_mse(samples, reference)
        m[name("transition_mse")], m[name("transition_psnr")] = mse, _psnr(mse)

    # Heads of the model on the real test split
    wants_heads = params.tasks.label.enabled or params.tasks.representation.enabled
    reason = "" if params.tasks.label.enabled else "tasks.label.enabled is false"
    if wants_heads:
        try:
            model, diffusion, model_meta = load_model(params, device)
        except FileNotFoundError as exc:
            model = None
            reason = reason or f"no checkpoint ({exc})"
        z0 = _test_z0(params, test_images, n_test) if model is not None else None
        if model is not None and z0 is None:
            reason = reason or f"no test latents at {params.latents_dir / 'test'} (run the latents stage)"
        if model is not None and z0 is not None:
            n_tag = lambda metric: fid.metric_name(metric, n_test)  # noqa: E731
            if params.tasks.label.enabled:
                topk = (1, 5) if params.data.source == "imagenet" and int(model_meta.get("num_classes", 0)) >= 5 \
                    else (1,)
                T = diffusion.T
                curve_t = sorted({t for t in CURVE_T if t <= T} | {T} | set(ev.classify_t))
                res = acc.label_head_accuracy(model, diffusion, z0, test_labels[:n_test], curve_t,
                                              ensemble_t=ev.classify_t, topk=topk, batch_size=ev.batch_size,
                                              device=device, seed=params.seed)
                for t in ev.classify_t:
                    m[n_tag(f"label_acc_t{t}")] = res.per_t[t][1]
                    if 5 in topk:
                        m[n_tag(f"label_top5_t{t}")] = res.per_t[t][5]
                m[n_tag("label_acc_ens")] = res.ensemble[1]
                if 5 in topk:
                    m[n_tag("label_top5_ens")] = res.ensemble[5]
                plots[ACC_VS_T] = [[t, round(res.per_t[t][1], 6)] for t in curve_t]
                plots[PER_CLASS] = _per_class_rows(res.per_class, classes)
            rep_path = params.representations_dir / "test.npy"
            if params.tasks.representation.enabled:
                if not rep_path.is_file():
                    raise FileNotFoundError(f"{rep_path}: tasks.representation is enabled but there are no "
                                            f"test features (run the representations stage)")
                feats = np.load(rep_path, mmap_mode="r")[:n_test]
                cos = acc.representation_similarity(model, diffusion, z0, feats, ev.classify_t,
                                                    batch_size=ev.batch_size, device=device, seed=params.seed)
                for t, c in cos.items():
                    m[n_tag(f"repr_cos_t{t}")] = c
    if reason:
        log.warning("label-head metrics skipped: %s", reason)
    m["label_head_skipped_reason"] = reason
    log.info("evaluated %s samples (tag %s), condition %s", n, tag, condition)
    return m, plots


def run(params: Params) -> dict[str, Any]:
    """Compute the metrics that apply, write ``evaluate.json`` and the plot CSVs, log them to MLflow."""
    from mtdiff.tracking import stage_run

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
    numbers = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    with stage_run(params, "evaluate", out_dir) as mlrun:
        mlrun.log_metrics({**numbers, "eval/wall_time_s": time.time() - t0})
        mlrun.set_tags({f"eval.{k}": v for k, v in metrics.items() if isinstance(v, str) and v})
        mlrun.log_artifact(metrics_path)
        for p in plot_paths.values():
            mlrun.log_artifact(p, artifact_path=PLOTS_SUBDIR)
    log.info("wrote %s (%d metrics) in %.1f s", metrics_path, len(numbers), time.time() - t0)
    return {"metrics_path": str(metrics_path), "plots": {k: str(v) for k, v in plot_paths.items()},
            "metrics": metrics, "wall_time_s": time.time() - t0}


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
