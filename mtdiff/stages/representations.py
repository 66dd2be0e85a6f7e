"""Stage ``representations``: the representation modality ``x_i`` of the joint image-representation task.

- ``fmnist_cnn`` (default profile): trains :class:`mtdiff.encoders.FashionCNN` on the prepared train
  split (seeded; representations.epochs / batch_size / lr), saves ``encoder.pt`` and its test accuracy;
  and the evaluation network :class:`mtdiff.encoders.FashionEvalNet` (another architecture, another
  seed), ``eval_net.pt``, which no task trains on: the evaluate stage's second FID space.
- ``dinov2`` / ``clip``: a frozen timm image encoder (representations.name / weights_path).

Outputs (atomic): ``data/representations/{split}.npy`` float32 (N, D) aligned with prepared/latents
order, ``meta.json`` {encoder, dim, ...}, ``encoder.pt`` (fmnist_cnn); ``metrics/representations.json``
with the test accuracy (fmnist_cnn) and, for every encoder, the nearest-class-mean accuracy of the
features (a cheap check that they carry class information). Under ``torchrun`` each rank extracts a
contiguous slice of each split (whole batches) and rank 0 gathers them into the same files
(``mtdiff.sharding``); ``fmnist_cnn`` is trained by rank 0 alone and its weights sent to the others.

    python -m mtdiff.stages.representations [representations.epochs=1 ...]
    torchrun --standalone --nproc_per_node 8 -m mtdiff.stages.representations representations.encoder=dinov2
"""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtdiff.config import Params
from mtdiff.data import SPLITS, load_prepared
from mtdiff.encoders import (EVAL_NET_FILE, FashionCNN, FashionEvalNet, images_to_unit_range, load_image_encoder,
                             save_fmnist_encoder)
from mtdiff.evaluation.accuracy import classifier_accuracy
from mtdiff.io import write_json
from mtdiff.pipeline.tracking import file_metrics, main_stage_run
from mtdiff.sharding import (broadcast_from_main, gather_arrays, main_atomic_dir, rank_dir, save_arrays, shard_range,
                             shard_scratch)
from mtdiff.stages import stage_main
from mtdiff.distributed import DistInfo, distributed
from mtdiff.precision import autocast
from mtdiff.utils import get_logger, seed_everything

log = get_logger("mtdiff.representations")
EVAL_BATCH = 1024
EVAL_NET_SEED_OFFSET = 1000


@torch.no_grad()
def _extract(fn: Callable[[np.ndarray], torch.Tensor], images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=None):
        feats.append(fn(np.asarray(images[start:start + batch_size])).float().cpu().numpy())
    return np.concatenate(feats).astype(np.float32)


def ncm_accuracy(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray) -> float:
    """Nearest-class-mean accuracy on L2-normalised features (cosine to each class centroid)."""
    def norm(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    tr, te = norm(train_feats.astype(np.float64)), norm(test_feats.astype(np.float64))
    classes = np.unique(train_labels)
    centroids = norm(np.stack([tr[train_labels == c].mean(0) for c in classes]))
    pred = classes[np.argmax(te @ centroids.T, axis=1)]
    return float((pred == test_labels).mean())


def train_fmnist_classifier(params: Params, tracker, device: torch.device, build: Callable[..., torch.nn.Module], *,
                            seed: int, tag: str, metric_prefix: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the classifier ``build(in_channels=, num_classes=)`` makes (seeded by ``seed``: FashionCNN,
    the representation encoder, or FashionEvalNet, the evaluation network) on the prepared train split;
    logs its curve as ``<metric_prefix>train_loss`` / ``test_accuracy``; returns the eval-mode model and metrics."""
    cfg = params.representations
    seed_everything(seed)
    images, labels, classes = load_prepared(params, "train")
    test_images, test_labels, _ = load_prepared(params, "test")
    x_train = torch.from_numpy(np.array(images))  # a uint8 copy in memory (1 byte/pixel)
    y_train = torch.from_numpy(labels.astype(np.int64))
    model = build(in_channels=images.shape[-1], num_classes=len(classes)).to(device)
    # channels_last: oneDNN's fast conv layout on CPU (~30% faster steps here), harmless on CUDA.
    model = model.to(memory_format=torch.channels_last)
    n = len(x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    # One-cycle: short warm-up then cosine decay; converges in the few epochs the default profile affords.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.time()
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running, seen = 0.0, 0
        for start in tqdm(range(0, n, cfg.batch_size), desc=f"{tag} epoch {epoch + 1}/{cfg.epochs}",
                          unit="batch", disable=None):
            idx = perm[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs 2+ samples
            xb = images_to_unit_range(x_train[idx]).to(device).contiguous(memory_format=torch.channels_last)
            yb = y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step < total:
                sched.step()
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
        losses.append(running / max(seen, 1))
        acc = test_accuracy(model, test_images, test_labels, device)
        log.info("%s epoch %d/%d: train loss %.4f, test accuracy %.4f (%.0fs)",
                 tag, epoch + 1, cfg.epochs, losses[-1], acc, time.time() - t0)
        tracker.log_metrics({f"{metric_prefix}train_loss": losses[-1], f"{metric_prefix}test_accuracy": acc},
                            step=epoch + 1)
    model.eval()
    acc = test_accuracy(model, test_images, test_labels, device)
    return model, {"test_accuracy": acc, "train_loss": losses[-1] if losses else None,
                   "train_seconds": round(time.time() - t0, 2), "epochs": cfg.epochs}


def test_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Top-1 accuracy of the encoder's classifier head (the evaluate stage's ``classifier_accuracy``)."""
    return classifier_accuracy(model, images, labels, batch_size=EVAL_BATCH, device=device)[0]


FeatureFn = Callable[[np.ndarray], torch.Tensor]


def _fmnist_features(params: Params, tracker: Any, info: DistInfo,
                     out_dir: Optional[Path]) -> tuple[FeatureFn, int, dict[str, Any], dict[str, Any]]:
    """Rank 0 trains FashionCNN, saves it as ``encoder.pt``, and the evaluation network as ``eval_net.pt``
    (another architecture, seed + EVAL_NET_SEED_OFFSET); every rank gets the encoder (rank 0's weights:
    trained once, so every slice's features come from the same network); (features fn, dim, meta, metrics)."""
    model, metrics, device = None, {}, info.device
    if info.is_main:
        model, metrics = _train_fmnist_networks(params, tracker, device, out_dir)
    config, state = broadcast_from_main(
        (dict(model.config), {k: v.cpu() for k, v in model.state_dict().items()}) if model else None, info)
    if model is None:  # the other ranks: rank 0's encoder, laid out as trained (channels_last)
        model = FashionCNN(**config).to(device).to(memory_format=torch.channels_last)
        model.load_state_dict(state)
        model.eval()

    def features(batch: np.ndarray) -> torch.Tensor:
        return model.features(images_to_unit_range(batch).to(device))

    meta = {"checkpoint": "encoder.pt", "test_accuracy": metrics.get("test_accuracy")}
    return features, params.representations.dim, meta, metrics


def _train_fmnist_networks(params: Params, tracker: Any, device: torch.device,
                           out_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    classes = load_prepared(params, "train")[2]
    model, metrics = train_fmnist_classifier(params, tracker, device, partial(FashionCNN, dim=params.representations.dim),
                                             seed=params.seed, tag="fmnist_cnn", metric_prefix="representations/")
    save_fmnist_encoder(model, out_dir / "encoder.pt", classes=classes,
                        test_accuracy=metrics["test_accuracy"], seed=params.seed)
    eval_seed = params.seed + EVAL_NET_SEED_OFFSET
    eval_net, eval_metrics = train_fmnist_classifier(params, tracker, device, FashionEvalNet, seed=eval_seed,
                                                     tag="eval_net", metric_prefix="representations/eval_net_")
    save_fmnist_encoder(eval_net, out_dir / EVAL_NET_FILE, classes=classes,
                        test_accuracy=eval_metrics["test_accuracy"], seed=eval_seed)
    metrics.update({"eval_net_test_accuracy": eval_metrics["test_accuracy"],
                    "eval_net_train_seconds": eval_metrics["train_seconds"]})
    return model, metrics


def _pretrained_features(params: Params, device: torch.device) -> tuple[FeatureFn, int, dict[str, Any]]:
    """A frozen timm encoder (bf16 autocast on CUDA); (features fn, dim, meta)."""
    cfg = params.representations
    encoder, preprocess, dim = load_image_encoder(cfg.encoder, cfg.name, cfg.weights_path, device, cfg.image_size)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None

    def features(batch: np.ndarray) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return encoder(preprocess(batch))

    return features, dim, {"name": cfg.name, "weights_path": cfg.weights_path, "image_size": cfg.image_size}


def run(params: Params) -> dict[str, Any]:
    """Build the representations of both splits (over the torchrun ranks, when launched so); returns
    {out_dir, encoder, dim, metrics} (rank 0; the other ranks return ``{"rank": r}``)."""
    for split in SPLITS:
        load_prepared(params, split)  # clear error before any work when prepare has not run
    with distributed() as info:
        return _run(params, info)


def _run(params: Params, info: DistInfo) -> dict[str, Any]:
    cfg = params.representations
    out = params.representations_dir
    start = time.time()
    metrics: dict[str, Any] = {"encoder": cfg.encoder}
    with main_stage_run(params, "representations", out.parent, info) as tracker:
        with main_atomic_dir(out, info) as tmp, shard_scratch(out, info) as scratch:
            if cfg.encoder == "fmnist_cnn":
                features, dim, meta, train_metrics = _fmnist_features(params, tracker, info, tmp)
                metrics.update(train_metrics)
                batch_size = EVAL_BATCH
            else:
                features, dim, meta = _pretrained_features(params, info.device)
                batch_size = cfg.batch_size
            for split in SPLITS:
                images = load_prepared(params, split)[0]
                mine = shard_range(len(images), info, block=batch_size)
                if len(mine):
                    save_arrays(rank_dir(scratch / split, info),
                                {split: _extract(features, images[mine.start:mine.stop], batch_size, f"features {split}")})
                gather_arrays(scratch / split, tmp, info)  # -> tmp/<split>.npy
            if tmp is None:
                return {"rank": info.rank}
            feats = _check_features(tmp, cfg.encoder, dim, params)
            metrics["ncm_test_accuracy"] = ncm_accuracy(feats["train"], load_prepared(params, "train")[1],
                                                        feats["test"], load_prepared(params, "test")[1])
            metrics.update({"dim": dim, "num_train": len(feats["train"]), "num_test": len(feats["test"]),
                            "feature_mean_abs": float(np.abs(feats["train"]).mean()),
                            "seconds": round(time.time() - start, 2)})
            meta = {"encoder": cfg.encoder, **meta, "dim": dim, "num": {s: len(f) for s, f in feats.items()},
                    "ncm_test_accuracy": metrics["ncm_test_accuracy"]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        metrics_path = write_json(params.metrics_dir / "representations.json", metrics)
        tracker.log_metrics(file_metrics(metrics_path, metrics))  # representations/<key>, as the parent run
        tracker.log_artifact(metrics_path, artifact_path="representations")
    log.info("representations (%s, dim %d): test accuracy %s, nearest-class-mean accuracy %.4f -> %s, %s (%.1fs)",
             cfg.encoder, dim, metrics.get("test_accuracy", "n/a"), metrics["ncm_test_accuracy"], out,
             metrics_path, metrics["seconds"])
    return {"out_dir": str(out), "metrics_path": str(metrics_path), "dim": dim, **metrics}


def _check_features(folder: Path, encoder: str, dim: int, params: Params) -> dict[str, np.ndarray]:
    """The gathered ``<split>.npy`` features, each checked to be (num images, dim)."""
    feats: dict[str, np.ndarray] = {}
    for split in SPLITS:
        num = len(load_prepared(params, split)[0])
        path = folder / f"{split}.npy"
        feats[split] = np.load(path) if path.exists() else np.zeros((0, dim), np.float32)
        if feats[split].shape != (num, dim):
            raise RuntimeError(f"{encoder}: features {feats[split].shape}, expected ({num}, {dim})")
    return feats


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
