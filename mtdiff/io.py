"""Atomic output writes: write to a temp file beside the target, fsync, then rename.

A stage killed mid-write leaves either the old file or none, never a partial one.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mtdiff.config import ConfigError


_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")  # numpy's tofile on a full disk: no errno


@contextlib.contextmanager
def _naming_failed_writes(path: Path) -> Iterator[None]:
    """An OSError while writing the output ``path`` names ``path`` (numpy's short write names no
    file and carries no errno: it becomes ENOSPC, 'disk full or file-size limit')."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        if err.errno is None and _SHORT_WRITE.match(str(err)):
            raise OSError(errno.ENOSPC, f"short write ({err}): disk full or file-size limit", str(path)) from err
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success rename it onto ``path``. Temp files a
    killed earlier writer of ``path`` left behind are removed on entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes 0600
    try:
        with _naming_failed_writes(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temps(path: Path) -> None:
    """Remove ``.<name>.<random>.tmp`` beside ``path``: what a killed atomic write of ``path`` left (one
    writer per output; the random part never holds a dot, so ``.<name>.x.<random>.tmp`` of another
    output ``<name>.x`` is not matched)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[^.]+\.tmp$")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not pattern.match(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


# Every folder atomic_dir writes holds this file: only such a folder (or an empty one) is ever replaced,
# so a mistyped out dir can never wipe a folder the pipeline did not make.
OUTPUT_MARKER = ".mtdiff-output"


class OutputError(ConfigError):
    """An output path that would replace something the pipeline did not write."""


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise :class:`OutputError` unless ``path`` is absent, an empty folder or a folder atomic_dir made."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; an output folder would replace it "
                          f"(move it away or choose another out_dir)")
    if (path / OUTPUT_MARKER).is_file() or not any(path.iterdir()):
        return
    raise OutputError(f"{path} exists and was not written by an mtdiff stage (no {OUTPUT_MARKER} in it); "
                      f"refusing to replace it: move it away or choose another out_dir")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success swap it in place of ``path``.

    Only a folder this function made (it holds :data:`OUTPUT_MARKER`) or an empty one is replaced;
    anything else raises :class:`OutputError` before any work. Temp folders a killed earlier run
    left behind (``.<name>.*.tmp``) are removed on entry.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700; outputs should follow the umask
    try:
        with _naming_failed_writes(path):
            yield tmp
            (tmp / OUTPUT_MARKER).write_text("written by an mtdiff stage; replaced on its next run\n")
        check_replaceable(path)  # again: something may have appeared there meanwhile
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return Path(path)


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    # through a file object: torch.save names the zip's root after a path it is given, here the random
    # temp name, so equal objects would give different bytes (and DVC hashes); a file object's root is fixed
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha1_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
