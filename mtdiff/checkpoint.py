"""Checkpoints: atomic save, ``weights_only`` load, the training-params hash, RNG capture and
``load_for_inference``.

Everything stored is ``torch.load(weights_only=True)``-loadable: tensors, ints, floats, strings,
bools, None, lists/tuples and dicts of those. NumPy's RNG state is stored as a tensor and plain
ints, Python's as a list of ints.

Files:
- ``last.pt``: the full training state (model, EMA, optimizer, scheduler, scaler, step, epoch,
  batch_in_epoch, RNG states, params_hash, meta); resumed when its hash matches. It lives in the
  train stage's state dir (``mtdiff.train.state.train_state_dir``: ``.mtdiff/train_state/<out_dir>``),
  not in the DVC output, so that the run-cache can restore the output.
- ``ema.pt`` in ``params.checkpoints_dir`` (the train stage's DVC output): the EMA weights + meta
  only, the small file inference loads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtdiff.config import ConfigError, Params
from mtdiff.io import save_torch

log = logging.getLogger(__name__)

LAST = "last.pt"
EMA = "ema.pt"

# Keys that only say where/how often to write, or how long/fast to run: changing them must not
# invalidate a run (train.steps is excluded so that raising it extends a run by resuming).
_TRAIN_KEYS_IGNORED = {"out_dir", "log_every", "ckpt_every", "grid_every", "steps", "num_workers", "compile",
                       "device"}


def hashed_params(params: Params) -> dict[str, Any]:
    """The params that change what training computes (the input of :func:`params_hash`)."""
    dump = params.model_dump()
    data = {k: v for k, v in dump["data"].items() if k != "out_dir"}
    train = {k: v for k, v in dump["train"].items() if k not in _TRAIN_KEYS_IGNORED}
    out = {"seed": dump["seed"], "data": data, "model": dump["model"], "diffusion": dump["diffusion"],
           "tasks": dump["tasks"], "train": train}
    if params.diffusion.mode == "latent":  # the VAE and its scale define the training data
        out["latents"] = {k: v for k, v in dump["latents"].items() if k != "batch_size"}
    if params.tasks.representation.enabled:  # the encoder defines the representation targets
        out["representations"] = {k: v for k, v in dump["representations"].items() if k != "batch_size"}
    return out


def params_hash(params: Params) -> str:
    """A short stable hash of :func:`hashed_params`; a checkpoint resumes only under the same hash."""
    blob = json.dumps(hashed_params(params), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


# What computes no result: the pipeline machinery (tracking, registry, sweeps), the benchmarks, the CLI.
NOT_RESULT_CODE = ("pipeline", "bench", "cli.py")


def code_hash() -> str:
    """A short hash of the source that computes results (the ``mtdiff`` package less
    :data:`NOT_RESULT_CODE`): which code a training state came from."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in NOT_RESULT_CODE:
            continue
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def arch_config(params: Params) -> dict[str, Any]:
    """What inference needs to rebuild the network and the diffusion exactly as trained."""
    dump = params.model_dump()
    return {"model": dump["model"], "diffusion": dump["diffusion"],
            "tasks_enabled": list(params.tasks.enabled),
            "mask_ratio": params.tasks.masked.mask_ratio, "pairing": params.tasks.transition.pairing}


# -- RNG state ---------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """torch CPU/CUDA, NumPy and Python RNG states in a weights_only-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": [int(x) for x in py_state[1]],
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state((np_s["name"], np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: restore what maps onto the visible devices
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# -- save / load -------------------------------------------------------------------------------

def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomic write (temp file + rename): a crash mid-save keeps the previous checkpoint intact."""
    return save_torch(path, state)


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be used (corrupt, truncated, not a checkpoint): the message names
    the file and what to do. The file is never deleted; retrying cannot help (a ConfigError: exit 2)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: no arbitrary unpickling of checkpoint files.

    A zero-byte, truncated or garbage file raises :class:`CheckpointError` naming it; it is left in
    place (``mmap=True`` maps the tensors lazily: cheap when only ``step`` & co. are read).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; run the train stage first")
    size = path.stat().st_size
    try:
        if size == 0:
            raise EOFError("the file is empty (0 bytes)")
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - zip, pickle, EOF, runtime errors: all mean "unreadable"
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({size} bytes; {type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"It was left untouched: restore it (`dvc checkout`) or move it away (e.g. `mv {path} {path}.bad`) "
            f"to train from scratch") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an mtdiff checkpoint (holds a {type(state).__name__}, not a dict); "
                              f"left untouched: move it away to train from scratch")
    return state


def _peek(path: Path) -> dict[str, Any] | None:
    """``step`` and ``params_hash`` of a checkpoint, read lazily; None when unreadable."""
    try:
        state = load_checkpoint(path, mmap=True)
    except (CheckpointError, OSError):
        return None
    return {"step": state.get("step"), "params_hash": state.get("params_hash")}


def default_inference_path(params: Params) -> Path:
    """``ema.pt`` (small) when it belongs to ``last.pt``, else ``last.pt`` (which holds the EMA too).

    A run killed between writing ``last.pt`` and ``ema.pt`` leaves an older ``ema.pt``: its step (or
    params hash) differs from ``last.pt``'s, and the newer EMA inside ``last.pt`` is used instead.
    """
    ema, last = params.checkpoints_dir / EMA, params.checkpoints_dir / LAST
    if not ema.exists():
        return last
    if not last.exists():
        return ema
    e, l = _peek(ema), _peek(last)
    if e is None or l is None or e != l:
        log.warning("%s (%s) does not match %s (%s): a run stopped between writing the two; using %s",
                    ema, e, last, l, last)
        return last
    return ema


def move_aside(ckpt_dir: str | os.PathLike, reason: str, names: tuple[str, ...] = (LAST, EMA)) -> list[Path]:
    """Move ``names`` in ``ckpt_dir`` to ``<name>.stale.<n>`` (n = 1 + the highest kept so far), never
    overwriting an earlier set-aside checkpoint; logs where each went. Returns the new paths."""
    ckpt_dir = Path(ckpt_dir)
    present = [ckpt_dir / n for n in names if (ckpt_dir / n).exists()]
    if not present:
        return []
    taken = [0]
    for n in names:
        pattern = re.compile(rf"^{re.escape(n)}\.stale(?:\.(\d+))?$")
        taken += [int(m.group(1) or 0) for f in ckpt_dir.iterdir() if (m := pattern.match(f.name))]
    number = max(taken) + 1
    while any(src.with_name(f"{src.name}.stale.{number}").exists() for src in present):
        number += 1
    moved = []
    for src in present:
        dst = src.with_name(f"{src.name}.stale.{number}")
        os.replace(src, dst)
        log.warning("%s: %s; kept as %s, starting fresh", src, reason, dst)
        moved.append(dst)
    return moved


def _check_arch(stored: dict[str, Any] | None, params: Params, path: Path) -> None:
    if not stored:
        return
    current = arch_config(params)
    diffs = []
    for section in ("model", "diffusion"):
        for k, v in current[section].items():
            if k in stored.get(section, {}) and stored[section][k] != v:
                diffs.append(f"{section}.{k}: checkpoint {stored[section][k]!r}, params {v!r}")
    if sorted(stored.get("tasks_enabled", [])) != sorted(current["tasks_enabled"]):
        diffs.append(f"tasks enabled: checkpoint {stored.get('tasks_enabled')}, params {current['tasks_enabled']}")
    if diffs:
        raise ValueError(f"{path} was trained with other params than the current ones: " + "; ".join(diffs)
                         + " (re-run the train stage or pass the params it was trained with)")


def load_for_inference(params: Params, path: str | os.PathLike | None = None,
                       device: str | torch.device | None = None):
    """``(model with EMA weights in eval mode, MTDiffusion, meta)`` from ``ema.pt``/``last.pt``.

    The architecture and diffusion schedule come from ``params`` and must match what the
    checkpoint was trained with (checked; a mismatch is a clear error, not silently wrong samples).
    """
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.models import build_model
    from mtdiff.utils import pick_device

    path = Path(path) if path is not None else default_inference_path(params)
    device = torch.device(device) if device is not None else pick_device(params.train.device)
    ckpt = load_checkpoint(path)
    meta = dict(ckpt.get("meta", {}))
    if "ema" not in ckpt:
        raise ValueError(f"{path}: no 'ema' weights in this checkpoint (keys: {sorted(ckpt)})")
    _check_arch(meta.get("arch"), params, path)
    model = build_model(params, repr_dim=meta.get("repr_dim"), num_classes=int(meta["num_classes"]))
    ema_state = ckpt["ema"]["shadow"] if "shadow" in ckpt["ema"] else ckpt["ema"]
    missing, unexpected = model.load_state_dict(ema_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: EMA weights do not fit the model built from params "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.to(device).eval().requires_grad_(False)
    meta.setdefault("step", ckpt.get("step"))
    meta.setdefault("params_hash", ckpt.get("params_hash"))
    meta["path"] = str(path)
    return model, MTDiffusion(params.diffusion), meta
