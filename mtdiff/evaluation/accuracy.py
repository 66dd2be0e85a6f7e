"""Task metrics: the label head as a classifier, class-conditional sample accuracy, the
representation head, inpainting (masked) and image-transition errors.

- :func:`label_head_accuracy`: ``MTDiffusion.classify`` (the label head on ``q_sample(z0, t)``, M3
  with A = 0 since nothing but the image is given) on the real test split, top-1 (and top-5) per
  t, an ensemble over several t (mean softmax) and per-class accuracy.
- :func:`clean_classifier_accuracy`: the joint model's clean-image classifier
  (``tasks.label.classifier: clean``: pooled encoder features of z0 at t = 0, no task code).
- :func:`diffusion_classifier_accuracy`: the generative reference (Li et al.'s Diffusion Classifier):
  the class whose condition makes the noise easiest to predict, for the class-conditional baseline
  and the joint model alike.
- :func:`classifier_accuracy`: a domain classifier (Fashion-MNIST CNN) on generated images vs the
  labels they were asked for (class-conditional sampling) or predicted with (joint sampling);
  :func:`class_entropy`: how evenly its predictions spread over the classes.
- :func:`representation_similarity`: cosine between the representation head's prediction and the
  encoder's features of the same test images.
- :func:`masked_region_mse` / :func:`image_mse`: errors in [0, 1] pixel units (and PSNR).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mtdiff.evaluation.fidelity import as_nhwc_uint8


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _to_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        # float32 copy (float16 latents, read-only mmap slices) before torch sees it
        x = torch.from_numpy(np.array(x, dtype=np.float32))
    return x.to(device=device, dtype=torch.float32)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B,): is the true label among the ``k`` largest logits."""
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def per_class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) accuracy per true class; NaN for classes absent from ``labels``."""
    correct = np.asarray(correct, dtype=np.float64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


@dataclass
class LabelAccuracy:
    """Label-head accuracy: ``per_t[t][k]`` top-k accuracy at timestep t; ``ensemble[k]`` over ``ensemble_t``."""

    n: int
    num_classes: int
    per_t: dict[int, dict[int, float]]
    ensemble_t: list[int]
    ensemble: dict[int, float]
    per_class_t: int
    per_class: np.ndarray = field(repr=False)


@torch.no_grad()
def label_head_accuracy(model: Any, diffusion: Any, z0: np.ndarray | torch.Tensor, labels: np.ndarray,
                        t_values: Sequence[int], *, ensemble_t: Optional[Sequence[int]] = None,
                        topk: Sequence[int] = (1,), batch_size: int = 256, device: torch.device | str = "cpu",
                        seed: int = 0) -> LabelAccuracy:
    """Classify clean test images ``z0`` (N,C,H,W) with the label head at each t in ``t_values``.

    ``ensemble_t`` (default: ``t_values``) are also combined by averaging the softmax, as
    ``MTDiffusion.classify(model, z0, ensemble_t)`` does (the same forward passes are reused).
    Per-class accuracy is reported at the smallest t. Noise is seeded: same inputs, same numbers.
    """
    device = torch.device(device)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if len(z0) != n:
        raise ValueError(f"label_head_accuracy: {len(z0)} images but {n} labels")
    t_values = sorted({int(t) for t in t_values})
    ensemble_t = sorted({int(t) for t in (ensemble_t if ensemble_t is not None else t_values)})
    T = int(diffusion.T)
    bad = [t for t in {*t_values, *ensemble_t} if not 1 <= t <= T]
    if bad:
        raise ValueError(f"evaluate.classify_t: timesteps {sorted(bad)} are outside [1, {T}]")
    all_t = sorted({*t_values, *ensemble_t})
    gen = torch.Generator().manual_seed(seed)
    hits = {t: {k: [] for k in topk} for t in t_values}
    ens_hits: dict[int, list[torch.Tensor]] = {k: [] for k in topk}
    t_pc = t_values[0]
    pc_correct: list[np.ndarray] = []
    K = None
    for sl in _batches(n, batch_size):
        z = _to_tensor(z0[sl], device)
        y = torch.as_tensor(labels[sl], device=device)
        probs_sum = None
        for t in all_t:
            logp = diffusion.classify(model, z, [t], generator=gen).float()
            K = logp.shape[-1]
            if t in hits:
                for k in topk:
                    hits[t][k].append(topk_hits(logp, y, k).cpu())
            if t == t_pc:
                pc_correct.append(topk_hits(logp, y, 1).cpu().numpy())
            if t in ensemble_t:
                p = logp.exp()
                probs_sum = p if probs_sum is None else probs_sum + p
        ens = torch.log(probs_sum / len(ensemble_t) + 1e-12)
        for k in topk:
            ens_hits[k].append(topk_hits(ens, y, k).cpu())
    if K is not None and labels.max(initial=0) >= K:
        raise ValueError(f"label_head_accuracy: labels go up to {labels.max()} but the label head has {K} classes")
    mean = lambda xs: float(torch.cat(xs).float().mean())  # noqa: E731
    return LabelAccuracy(
        n=n, num_classes=int(K or 0),
        per_t={t: {k: mean(v) for k, v in hits[t].items()} for t in t_values},
        ensemble_t=ensemble_t, ensemble={k: mean(v) for k, v in ens_hits.items()},
        per_class_t=t_pc, per_class=per_class_accuracy(np.concatenate(pc_correct), labels, int(K or 0)))


@torch.no_grad()
def clean_classifier_accuracy(model: Any, z0: np.ndarray | torch.Tensor, labels: np.ndarray, *,
                              topk: Sequence[int] = (1,), batch_size: int = 256,
                              device: torch.device | str = "cpu") -> tuple[dict[int, float], np.ndarray]:
    """``model.classifier_logits`` on clean test images ``z0``: ``({k: top-k accuracy}, per-class top-1)``."""
    device = torch.device(device)
    labels = np.asarray(labels, dtype=np.int64)
    if len(z0) != len(labels):
        raise ValueError(f"clean_classifier_accuracy: {len(z0)} images but {len(labels)} labels")
    hits: dict[int, list[torch.Tensor]] = {k: [] for k in topk}
    K = 0
    for sl in _batches(len(labels), batch_size):
        logits = model.classifier_logits(_to_tensor(z0[sl], device)).float()
        K = logits.shape[-1]
        y = torch.as_tensor(labels[sl], device=device)
        for k in topk:
            hits[k].append(topk_hits(logits, y, k).cpu())
    top1 = torch.cat(hits[topk[0]]).numpy() if labels.size else np.zeros(0, bool)
    return ({k: float(torch.cat(v).float().mean()) for k, v in hits.items()},
            per_class_accuracy(top1, labels, K))


def _class_condition(model: Any, z: torch.Tensor, c: int):
    """How class ``c`` enters ``model``: (the aggregated label code A of M2 for the joint model, the
    label input for the class-conditional baseline)."""
    labels = torch.full((z.shape[0],), c, dtype=torch.long, device=z.device)
    if getattr(model, "class_conditional", False):
        return None, labels
    return model.aggregate({"label": labels}, like=z), None


@torch.no_grad()
def diffusion_classifier_accuracy(model: Any, diffusion: Any, z0: np.ndarray | torch.Tensor, labels: np.ndarray,
                                  num_classes: int, *, draws: int, batch_size: int = 256,
                                  device: torch.device | str = "cpu", seed: int = 0) -> float:
    """Diffusion Classifier (Li et al., 2023) top-1 accuracy on clean images ``z0``.

    Each image goes to ``argmin_c sum_k ||eps_k - eps_hat(z_{t_k}(c), t_k, c)||^2`` over ``draws`` pairs
    (t_k, eps_k) shared by every class (t stratified over [1, T], eps seeded), as the paper pairs them
    to cancel the draw's noise. Costs ``num_classes x draws`` network calls per image.
    """
    device = torch.device(device)
    labels = np.asarray(labels, dtype=np.int64)
    T = int(diffusion.T)
    t_draws = [min(T, max(1, round((k + 0.5) * T / draws))) for k in range(draws)]
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for sl in _batches(len(labels), batch_size):
        z = _to_tensor(z0[sl], device)
        noise = torch.randn((draws, *z.shape), generator=gen).to(device)
        err = torch.zeros(z.shape[0], num_classes, device=device)
        for c in range(num_classes):
            A, class_labels = _class_condition(model, z, c)
            for k, t_int in enumerate(t_draws):
                t = torch.full((z.shape[0],), t_int, dtype=torch.long, device=device)
                z_t = diffusion.q_sample(z, A, t, noise[k])
                out = model(z_t, t, class_labels) if class_labels is not None else model(z_t, t)
                eps_hat = diffusion.predict_eps(z_t, diffusion.predict_z0(z_t, out, A, t), A, t)
                err[:, c] += (eps_hat.float() - noise[k]).square().flatten(1).mean(1)
        correct += int((err.argmin(1).cpu() == torch.as_tensor(labels[sl])).sum())
    return correct / max(len(labels), 1)


@torch.no_grad()
def classify(classifier: torch.nn.Module, images: np.ndarray, *, batch_size: int = 256,
             device: torch.device | str = "cpu") -> np.ndarray:
    """``classifier``'s top-1 class (logits from float (B,C,H,W) in [-1,1]) of each uint8 image."""
    device = torch.device(device)
    images = as_nhwc_uint8(images, "images")
    was_training = classifier.training
    classifier.eval()
    preds = []
    try:
        for sl in _batches(len(images), batch_size):
            x = torch.from_numpy(np.array(images[sl])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            preds.append(classifier(x).argmax(-1).cpu().numpy())
    finally:
        classifier.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def prediction_accuracy(pred: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """``(accuracy, per_class_accuracy)`` of predicted classes against ``labels``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} predictions but {len(labels)} labels")
    correct = pred == labels
    K = int(max(labels.max(initial=0), pred.max(initial=0)) + 1)
    return float(correct.mean()), per_class_accuracy(correct, labels, K)


def classifier_accuracy(classifier: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *,
                        batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[float, np.ndarray]:
    """Top-1 accuracy of ``classifier`` on uint8 images vs ``labels``: ``(accuracy, per_class_accuracy)``."""
    return prediction_accuracy(classify(classifier, images, batch_size=batch_size, device=device), labels)


def class_entropy(pred: np.ndarray, num_classes: int) -> float:
    """Entropy of the predicted-class histogram over ``log K``: 1 when every class is drawn equally
    often (a balanced test split), 0 when every sample is one class; unconditional samplers that
    collapse onto a few classes fall below what FID alone makes visible."""
    if num_classes < 2 or len(pred) == 0:
        raise ValueError(f"class_entropy needs >= 2 classes and >= 1 prediction, got {num_classes}, {len(pred)}")
    p = np.bincount(np.asarray(pred, dtype=np.int64), minlength=num_classes) / len(pred)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(num_classes))


@torch.no_grad()
def representation_similarity(model: Any, diffusion: Any, z0: np.ndarray | torch.Tensor, features: np.ndarray,
                              t_values: Sequence[int], *, batch_size: int = 256,
                              device: torch.device | str = "cpu", seed: int = 0) -> dict[int, float]:
    """Mean cosine similarity between the representation head on ``q_sample(z0, t)`` and the encoder's features."""
    device = torch.device(device)
    if len(z0) != len(features):
        raise ValueError(f"representation_similarity: {len(z0)} images but {len(features)} feature rows")
    gen = torch.Generator().manual_seed(seed)
    sums = {int(t): 0.0 for t in t_values}
    for sl in _batches(len(z0), batch_size):
        z = _to_tensor(z0[sl], device)
        f = _to_tensor(features[sl], device)
        for t in sums:
            tt = torch.full((len(z),), t, dtype=torch.long, device=device)
            pred = model.head("representation", diffusion.q_sample(z, None, tt, generator=gen), tt).float()
            if pred.shape != f.shape:
                raise ValueError(f"representation head gives {tuple(pred.shape)}, features are {tuple(f.shape)}")
            sums[t] += float(F.cosine_similarity(pred, f, dim=-1).sum())
    return {t: s / len(z0) for t, s in sums.items()}


def _unit(images: np.ndarray, what: str) -> np.ndarray:
    return as_nhwc_uint8(images, what).astype(np.float64) / 255.0


def psnr(mse: float) -> float:
    """PSNR in dB for an MSE in [0, 1] pixel units (inf for a perfect match)."""
    return float("inf") if mse <= 0 else float(10.0 * np.log10(1.0 / mse))


def masked_region_mse(samples: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """MSE over the hidden pixels (``mask == 0``; mask (N,H,W) with 1 = visible to the model), [0,1] units."""
    s, r = _unit(samples, "samples"), _unit(reference, "reference")
    if s.shape != r.shape:
        raise ValueError(f"samples {s.shape} and reference {r.shape} differ")
    mask = np.asarray(mask)
    if mask.shape != s.shape[:3]:
        raise ValueError(f"mask {mask.shape} does not match images {s.shape[:3]} (want (N,H,W))")
    hidden = (mask == 0)[..., None] * np.ones(s.shape[-1], dtype=bool)
    if not hidden.any():
        raise ValueError("masked_region_mse: the mask hides no pixel")
    return float(((s - r) ** 2)[hidden].mean())


def image_mse(samples: np.ndarray, reference: np.ndarray) -> float:
    """MSE over all pixels, [0,1] units."""
    s, r = _unit(samples, "samples"), _unit(reference, "reference")
    if s.shape != r.shape:
        raise ValueError(f"samples {s.shape} and reference {r.shape} differ")
    return float(((s - r) ** 2).mean())
