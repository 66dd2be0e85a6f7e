"""What training reports: per-task losses and grad norm per logging window (kept on the device, so a
step never syncs), img/s, the first non-finite loss, and the training curve as CSV."""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from mtdiff.distributed import DistInfo, all_reduce_mean
from mtdiff.io import atomic_path
from mtdiff.train.step import NonFiniteLossError, StepOutput, stack_losses


@dataclass
class Throughput:
    images: int = 0
    seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds

    @property
    def img_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


@dataclass
class Window:
    """Means over one logging window (and over ranks): losses in ``names`` order, grad norm, img/s."""

    losses: dict[str, float]
    grad_norm: float
    images: int
    seconds: float

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds


class TrainMeter:
    """Per-task loss and grad-norm sums over a logging window, kept on the device (a step never
    syncs), the first non-finite step, and img/s per window, per session and steady (without the
    first window: warm-up, compilation)."""

    def __init__(self, names: Sequence[str], images_per_step: int, info: DistInfo):
        self.names = list(names)
        self.images_per_step = images_per_step
        self.info = info
        device = info.device
        self._loss_sum = torch.zeros(len(self.names), device=device)
        self._grad_norm_sum = torch.zeros((), device=device)
        self._count = 0
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_losses = torch.zeros(len(self.names), device=device)
        self._t0 = time.perf_counter()
        self._excluded_s = 0.0
        self.windows = 0
        self.session = Throughput()
        self.steady = Throughput()

    def add(self, step: int, out: StepOutput) -> None:
        losses = stack_losses(out.losses, self.names)
        newly_bad = ~torch.isfinite(losses).all() & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(newly_bad, torch.full_like(self._first_bad_step, step),
                                           self._first_bad_step)
        self._bad_losses = torch.where(newly_bad, losses, self._bad_losses)
        self._loss_sum += losses
        self._grad_norm_sum += out.grad_norm.detach().float()
        self._count += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (checkpoint writing) out of the current window's time."""
        self._excluded_s += seconds

    def check_finite(self, note: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if any rank saw a NaN/inf loss (one sync); ``note`` ends the message."""
        flag = all_reduce_mean((self._first_bad_step >= 0).float(), self.info)
        if float(flag) <= 0:
            return
        at = int(self._first_bad_step)
        where = f"non-finite loss at step {at}" if at >= 0 else "non-finite loss on another rank"
        values = {n: float(v) for n, v in zip(self.names, self._bad_losses.tolist())}
        raise NonFiniteLossError(f"{where}: per-task losses {values}{note}")

    def flush(self) -> Window:
        """Close the window (reduced over ranks) and start the next."""
        seconds = max(time.perf_counter() - self._t0 - self._excluded_s, 1e-9)
        means = all_reduce_mean(self._loss_sum / self._count, self.info).tolist()
        grad_norm = float(all_reduce_mean(self._grad_norm_sum / self._count, self.info))
        window = Window(dict(zip(self.names, means)), grad_norm, self._count * self.images_per_step, seconds)
        self.windows += 1
        self.session.add(window.images, seconds)
        if self.windows > 1:
            self.steady.add(window.images, seconds)
        self._loss_sum.zero_()
        self._grad_norm_sum.zero_()
        self._count = 0
        self._excluded_s = 0.0
        self._t0 = time.perf_counter()
        return window


# Columns of the per-step training log (metrics/train_log.csv, the `dvc plots` of dvc.yaml): every
# task has a column, empty when the task is off, so the plots' definitions fit every configuration.
TRAIN_LOG_COLUMNS = ("step", "epoch", "loss", "eps", "label", "representation", "masked", "transition",
                     "classifier", "lr", "grad_norm", "img_per_s")


class TrainLog:
    """The training curve as CSV: one row per logging window (``train.log_every`` steps, the window's
    mean losses), kept in the resumable state dir (``path``) and copied to the DVC plot output
    (``publish_to``), so a resumed run's curve starts at step 1, not at the resume."""

    def __init__(self, path: str | os.PathLike, publish_to: str | os.PathLike):
        self.path, self.publish_to = Path(path), Path(publish_to)

    def start(self, resumed_step: Optional[int]) -> None:
        """Fresh run: an empty log. Resumed run: keep the rows up to ``resumed_step`` (later ones were
        logged after the checkpoint that is resumed, and are redone)."""
        rows = self.rows() if resumed_step is not None else []
        rows = [r for r in rows if r.get("step") and int(r["step"]) <= int(resumed_step or 0)]
        self._write(self.path, rows)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def append(self, step: int, epoch: int, losses: Mapping[str, float], lr: float, grad_norm: float,
               img_per_s: float) -> None:
        row = {"step": step, "epoch": epoch, **{k: f"{v:.6g}" for k, v in losses.items() if k in TRAIN_LOG_COLUMNS},
               "lr": f"{lr:.6g}", "grad_norm": f"{grad_norm:.6g}", "img_per_s": f"{img_per_s:.1f}"}
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRAIN_LOG_COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def publish(self) -> None:
        """Copy the log to the plot output (atomically; a header-only file when nothing was logged)."""
        self._write(self.publish_to, self.rows())

    @staticmethod
    def _write(path: Path, rows: list[dict[str, Any]]) -> None:
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRAIN_LOG_COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
