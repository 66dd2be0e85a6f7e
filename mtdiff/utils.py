"""Small shared helpers: logging, progress with an ETA, seeding, device choice."""
from __future__ import annotations

import hashlib
import logging
import os
import random
import time

import numpy as np
import torch

from mtdiff.host_memory import retain_freed_memory

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("MTDIFF_LOG_LEVEL", "INFO"), format=LOG_FORMAT)
    return logging.getLogger(name)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; ``65`` -> ``1:05``."""
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """Log lines "<what> i/n (p %), elapsed, ETA" at most every ``every_s`` seconds and at the end.

    Why not tqdm alone: under DVC and Prefect a stage's output is a pipe, where tqdm's bar is off;
    these lines reach the flow's log and the terminal of ``make run``.
    """

    def __init__(self, log: logging.Logger, what: str, total: int, every_s: float = 30.0):
        self.log, self.what, self.total, self.every_s = log, what, total, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        self.log.info("%s %d/%d (%.0f %%), %s elapsed, ETA %s", self.what, done, self.total,
                      100 * done / max(self.total, 1), format_duration(elapsed),
                      format_duration(eta) if done else "-")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, stream: str, rank: int = 0) -> int:
    """The seed of one named random stream (``"noise"``, ``"loader/3"`` ...) of process ``rank``, or
    of part ``rank`` of a stream cut into parts (``"sample/noise"``: one generator per sampling batch).

    A hash rather than arithmetic such as ``seed * k + rank``: streams of different seeds, names
    and ranks never collide, and a new stream needs no new magic constant. 63 bits fit every RNG
    torch and NumPy take (``seed_everything`` folds it for NumPy).
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pick_device(choice: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is an error, not a silent fallback.
    On CPU the process also keeps the memory it frees (``host_memory.retain_freed_memory``: steps
    reuse their activations' pages instead of page-faulting them in again)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(choice)
    if device.type == "cpu":
        retain_freed_memory()
    return device
