"""The order training reads the data in: a per-epoch permutation from ``(seed, epoch)`` split across
ranks, entered at any batch (a mid-epoch resume replays it exactly). ``train.batch_size`` is the
**global** batch; each of W ranks takes ``batch_size / W``."""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DistributedSampler, Sampler

from mtdiff.distributed import DistInfo


def make_sampler(num_items: int, info: DistInfo, seed: int) -> DistributedSampler:
    """Per-epoch permutation from ``(seed, epoch)`` split across ranks (also with one rank).

    The order depends only on (seed, epoch), so a resumed run replays it exactly; ``drop_last``
    keeps every rank's epoch the same length.
    """
    return DistributedSampler(range(num_items), num_replicas=info.world_size, rank=info.rank,
                              shuffle=True, seed=seed, drop_last=True)


class ResumableBatchSampler(Sampler[list[int]]):
    """Full batches of ``sampler``'s indices, starting at batch ``start`` (for mid-epoch resume)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, start: int = 0):
        self.sampler = sampler
        self.batch_size = batch_size
        self.start = start

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size - self.start  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        idx = list(iter(self.sampler))
        for b in range(self.start, len(idx) // self.batch_size):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors of a (nested) batch to ``device``; non-blocking from pinned memory."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
