"""Scale-out of the inference stages (sample, latents, representations) over ``torchrun`` ranks.

Each rank takes a contiguous slice of the items, whole batches at a time (:func:`shard_range`), and
writes its slice's arrays as ``.npy`` files into its own folder (:func:`rank_dir`); rank 0 then
concatenates them in rank order (:func:`gather_arrays`). Contiguous slices in rank order restore
the item order, and whole batches keep every batch what one process makes of it, so the gathered
files are those one process writes. The folders lie beside the stage's output
(:func:`shard_scratch`): every rank must see them (one node, or a filesystem the nodes share, as the
output's is). Rank and world come from :func:`mtdiff.distributed.init_distributed` (torchrun's env).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch.distributed as dist

from mtdiff.io import atomic_dir
from mtdiff.distributed import DistInfo, barrier

COPY_ROWS = 1 << 14  # rows per copy when concatenating: bounded memory for 1.28M-item arrays


def shard_range(n: int, info: DistInfo, block: int = 1) -> range:
    """The items of ``n`` that rank ``info.rank`` of ``info.world_size`` handles: contiguous, disjoint,
    covering ``0..n-1`` in rank order, cut at multiples of ``block`` (the batch size, so each batch is
    the one a single process makes). The first ranks take one block more when they do not divide
    evenly (as ``np.array_split``), so rank 0 is never empty while ``n > 0``."""
    if block < 1:
        raise ValueError(f"shard_range: block {block} must be >= 1")
    blocks = -(-n // block)
    base, extra = divmod(blocks, info.world_size)
    first = info.rank * base + min(info.rank, extra)
    count = base + (info.rank < extra)
    return range(min(first * block, n), min((first + count) * block, n))


@contextlib.contextmanager
def shard_scratch(out: Path, info: DistInfo) -> Iterator[Path]:
    """``.<out name>.shards`` beside ``out``: where the ranks leave their slices. Rank 0 empties it
    first (a killed run's leftovers) and removes it at the end."""
    scratch = Path(out).parent / f".{Path(out).name}.shards"
    if info.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    barrier(info)  # nobody writes into the folder before it is emptied
    try:
        yield scratch
    finally:
        if info.is_main:
            shutil.rmtree(scratch, ignore_errors=True)


def rank_dir(scratch: Path, info: DistInfo) -> Path:
    """This rank's folder under ``scratch`` (made) for its slice's ``<name>.npy`` files."""
    path = scratch / f"rank{info.rank:05d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def gather_arrays(scratch: Path, dest: Optional[Path], info: DistInfo) -> list[str]:
    """Rank 0 writes ``dest/<name>.npy``: every rank's ``<name>.npy`` under ``scratch``, concatenated
    along axis 0 in rank order (a rank with an empty slice leaves none). Called by every rank; it
    returns (the sorted names, on rank 0) once ``dest`` is complete. One process: a rename."""
    barrier(info)  # every rank has written its slice
    names: list[str] = []
    if info.is_main:
        assert dest is not None, "rank 0 needs the folder to gather into"
        dest.mkdir(parents=True, exist_ok=True)
        parts = [scratch / f"rank{r:05d}" for r in range(info.world_size)]
        names = sorted({p.stem for d in parts if d.is_dir() for p in d.glob("*.npy")})
        for name in names:
            _concat_npy([d / f"{name}.npy" for d in parts if (d / f"{name}.npy").exists()], dest / f"{name}.npy")
    barrier(info)  # the other ranks may not tear the group down while rank 0 still copies
    return names


def _concat_npy(parts: list[Path], dest: Path) -> None:
    if len(parts) == 1:
        os.replace(parts[0], dest)  # one process (or one non-empty rank): nothing to copy
        return
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    tail, dtype = arrays[0].shape[1:], arrays[0].dtype
    for p, a in zip(parts, arrays):
        if a.shape[1:] != tail or a.dtype != dtype:
            raise ValueError(f"gather: {p} is {a.dtype} {a.shape}, the first rank's {dtype} (N, {tail})")
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=dtype, shape=(sum(len(a) for a in arrays), *tail))
    row = 0
    for a in arrays:
        for start in range(0, len(a), COPY_ROWS):
            chunk = a[start:start + COPY_ROWS]
            out[row:row + len(chunk)] = chunk
            row += len(chunk)
    out.flush()
    del out


def save_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """A rank's slice as ``<name>.npy`` files (for :func:`gather_arrays`)."""
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)


def load_arrays(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.load(folder / f"{name}.npy") for name in names}


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. weights only rank 0 trained); ``obj`` itself on one process."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_atomic_dir(out: Path, info: DistInfo) -> Iterator[Optional[Path]]:
    """:func:`mtdiff.io.atomic_dir` on rank 0 (the one writer of outputs); None on the other ranks."""
    if not info.is_main:
        yield None
        return
    with atomic_dir(out) as tmp:
        yield tmp
