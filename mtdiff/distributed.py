"""Where this process sits among the torchrun ranks, and the few collectives the stages use.

One process is rank 0 of 1 and every collective is then the identity, so the stages read the same
single-process or under ``torchrun`` (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from mtdiff.utils import get_logger, pick_device

log = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank / world size / device; ``distributed`` when a group is up."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_choice: str = "auto") -> DistInfo:
    """Join the torchrun group when ``WORLD_SIZE > 1`` (NCCL on GPU, gloo on CPU), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice)
    if world <= 1:
        return DistInfo(0, 1, 0, device, False)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    log.info("DDP rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistInfo(rank, world, local_rank, device, True)


def shutdown_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_choice: str = "auto") -> Iterator[DistInfo]:
    """This process's place among the torchrun ranks for the duration (a single process: rank 0 of 1)."""
    info = init_distributed(device_choice)
    try:
        yield info
    finally:
        shutdown_distributed(info)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (a copy; identity when single-process)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def weights_checksum(module_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A float64 fingerprint of a state dict (sum and weighted sum per tensor), to compare ranks."""
    parts = []
    for i, (_, v) in enumerate(sorted(module_state.items())):
        if torch.is_tensor(v) and v.numel():
            v = v.detach().double().flatten()
            parts.append(torch.stack([v.sum(), (v * torch.linspace(1, 2, v.numel(), dtype=torch.float64,
                                                                   device=v.device)).sum() * (i + 1)]))
    return torch.cat(parts).cpu() if parts else torch.zeros(1, dtype=torch.float64)


def ranks_in_sync(state: Mapping[str, torch.Tensor], info: DistInfo) -> bool:
    """True when every rank holds the same weights (bitwise-equal fingerprints)."""
    if not info.distributed:
        return True
    local = weights_checksum(state)
    if info.device.type == "cuda":
        local = local.to(info.device)
    gathered = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(gathered, local)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one when single-process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    if global_batch % info.world_size:
        raise ValueError(f"train.batch_size {global_batch} must be divisible by the number of "
                         f"processes ({info.world_size})")
    return global_batch // info.world_size
