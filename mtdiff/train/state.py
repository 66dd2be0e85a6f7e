"""What a training run holds and how it is saved and resumed.

The stage's output is ``params.checkpoints_dir/ema.pt`` (EMA weights + meta, what inference loads).
The resumable state is no output (DVC deletes outputs before it runs a stage):
``<project>/.mtdiff/train_state/<out_dir>/last.pt`` (:func:`train_state_dir`), written every
``train.ckpt_every`` steps and at the end. ``$MTDIFF_TRAIN_STATE_ROOT`` moves it out of the project:
a sweep point runs in a temporary copy of the repo (``dvc exp run --temp``) that a kill throws away,
so the sweep keeps each point's state beside the sweep instead, and a rerun resumes it.

Resume: when ``last.pt`` exists and its ``params_hash`` equals the current one, training goes on
from it exactly: same weights, optimizer, LR schedule, EMA, data order (epoch permutation from
``(seed, epoch)`` plus the position in the epoch) and noise (the per-rank noise generator and the
global RNGs are restored). ``train.steps`` is not hashed, so raising it extends a finished run.
A different hash, a checkpoint past ``train.steps``, or a finished checkpoint of other code
(``checkpoint.code_hash`` of the package source: DVC reruns the stage because its code changed)
starts fresh and moves the old state aside (``last.pt.stale.<n>`` in the state dir); an unfinished
one of other code resumes with a warning.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from mtdiff import checkpoint as ckpt_mod
from mtdiff.config import TRAIN_STATE_ROOT_ENV, ConfigError, Params, project_root
from mtdiff.data import TrainDataset
from mtdiff.distributed import DistInfo, barrier, gather_objects
from mtdiff.train.meter import TrainLog, Window
from mtdiff.train.step import TrainStep
from mtdiff.utils import get_logger

log = get_logger("mtdiff.train")

STATE_ROOT = Path(".mtdiff") / "train_state"  # under the project root: gitignored, .dvcignored, no output


def train_state_dir(params: Params) -> Path:
    """Where the resumable state of the run writing ``params.checkpoints_dir`` lives:
    ``<project>/.mtdiff/train_state/<out_dir relative to the project>`` (``checkpoints`` by default),
    or ``<name>-<hash of the absolute path>`` for an out_dir outside the project; under
    ``$MTDIFF_TRAIN_STATE_ROOT`` instead of ``<project>/.mtdiff/train_state`` where that is set."""
    out = params.checkpoints_dir.resolve()
    root = project_root().resolve()
    try:
        key = out.relative_to(root).as_posix().replace("/", "__")
    except ValueError:
        key = ""
    if not key or key.startswith("."):
        key = f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:10]}"
    override = os.environ.get(TRAIN_STATE_ROOT_ENV)
    if override and not Path(override).is_absolute():  # relative: inside the copy a kill throws away
        raise ConfigError(f"{TRAIN_STATE_ROOT_ENV}={override!r}: must be an absolute path")
    return (Path(override) if override else root / STATE_ROOT) / key


@dataclass
class Session:
    """What setup fixes for the whole session: data, sampler, the step (model + optimizer state)."""

    params: Params
    info: DistInfo
    dataset: TrainDataset
    sampler: DistributedSampler
    batch_size: int  # per rank
    steps_per_epoch: int
    meta: dict[str, Any]
    params_hash: str
    step: TrainStep
    noise_gen: torch.Generator
    started: float

    state_dir: Path
    train_log: Optional[TrainLog] = None  # rank 0 only
    preview_model: Optional[nn.Module] = None  # rank 0: the EMA weights the grids are drawn from

    @property
    def ckpt_dir(self) -> Path:
        """The stage's output folder (``ema.pt``)."""
        return self.params.checkpoints_dir

    @property
    def last_path(self) -> Path:
        """The resumable state (no DVC output)."""
        return self.state_dir / ckpt_mod.LAST

    @property
    def ema_path(self) -> Path:
        return self.ckpt_dir / ckpt_mod.EMA


@dataclass
class Progress:
    """Where training stands (saved in ``last.pt``); ``stats`` accumulate over resumed sessions."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stats: dict[str, Any] = field(default_factory=lambda: {"train_time_s": 0.0, "images": 0, "last_losses": {}})
    resumed_from: Optional[int] = None
    last_saved_step: Optional[int] = None

    def position(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epoch, batch) the next step starts at: a finished epoch rolls over to the next one."""
        if self.batch_in_epoch >= steps_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch_in_epoch

    def record(self, window: Window) -> None:
        self.stats["images"] = int(self.stats["images"]) + window.images
        self.stats["train_time_s"] = float(self.stats["train_time_s"]) + window.seconds
        self.stats["last_losses"] = dict(window.losses)


# -- resume -------------------------------------------------------------------------------------

def resume(session: Session) -> Progress:
    """Progress restored from ``last.pt`` of the same run, else a fresh start (old files moved aside)."""
    progress = Progress()
    info, steps = session.info, session.params.train.steps
    barrier(info)
    if session.last_path.exists():
        state = ckpt_mod.load_checkpoint(session.last_path, map_location="cpu")
        reason = _fresh_start_reason(session, state, steps)
        if reason is None:
            progress = _restore(session, state)
        else:
            barrier(info)
            if info.is_main:
                _move_aside(session, reason)
        del state
    barrier(info)
    return progress


def _fresh_start_reason(session: Session, state: dict[str, Any], steps: int) -> Optional[str]:
    """Why ``state`` must not be resumed (None: resume it).

    steps is outside the params hash so a longer run extends a shorter one; a checkpoint already past
    train.steps belongs to a longer run, and reusing it would break a fixed training budget. A
    *finished* state from other code is retrained: the stage runs on a finished state when DVC saw
    its code change, and re-exporting the old weights would label them as the new code's. An
    unfinished one (a killed run, the code edited meanwhile) resumes with a warning: the user's call."""
    if state.get("params_hash") != session.params_hash:
        return f"params hash {state.get('params_hash')} != current {session.params_hash}"
    step = int(state["step"])
    if step > steps:
        return f"checkpoint step {step} is past train.steps {steps}"
    theirs, ours = state.get("meta", {}).get("code_hash"), session.meta["code_hash"]
    if theirs == ours:
        return None
    if step == steps:
        return f"a finished run of other code (code hash {theirs} != current {ours})"
    if session.info.is_main:
        log.warning("resuming a run started with other code (code hash %s != current %s)", theirs, ours)
    return None


def _restore(session: Session, state: dict[str, Any]) -> Progress:
    info = session.info
    session.step.load_state_dict(state)
    progress = Progress(step=int(state["step"]), epoch=int(state["epoch"]),
                         batch_in_epoch=int(state["batch_in_epoch"]),
                         stats=dict(state.get("stats") or Progress().stats))
    progress.resumed_from = progress.last_saved_step = progress.step
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        ckpt_mod.restore_rng_state(rngs[info.rank]["global"])
        session.noise_gen.set_state(rngs[info.rank]["noise"].cpu())  # generator states are CPU byte tensors
    else:
        log.warning("checkpoint was written by %d processes, now %d: weights and data order "
                    "resume exactly, the noise stream does not", len(rngs), info.world_size)
    if info.is_main:
        log.info("resuming from %s at step %d (epoch %d, batch %d)", session.last_path, progress.step,
                 progress.epoch, progress.batch_in_epoch)
        if progress.step == session.params.train.steps:
            log.info("the checkpoint is at train.steps %d already: nothing to train "
                     "(raise train.steps to continue)", progress.step)
    return progress


def _move_aside(session: Session, reason: str) -> None:
    """The state of another run is kept as ``last.pt.stale.<n>`` (numbered, never overwritten; its EMA
    included); its ``ema.pt`` in the output folder goes (extra files there would join the DVC output)."""
    ckpt_mod.move_aside(session.last_path.parent, reason, names=(session.last_path.name,))
    session.ema_path.unlink(missing_ok=True)


# -- save ---------------------------------------------------------------------------------------

def save_checkpoint(session: Session, progress: Progress) -> None:
    """``last.pt`` (everything to resume, every rank's RNGs) and ``ema.pt``, written by rank 0."""
    rng_state = {"global": ckpt_mod.capture_rng_state(), "noise": session.noise_gen.get_state()}
    rngs = gather_objects(rng_state, session.info)
    epoch, batch = progress.position(session.steps_per_epoch)
    params, step = session.params, progress.step
    if session.info.is_main:
        state = {**session.step.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch, "rng": rngs,
                 "sampler": {"seed": params.seed, "epoch": epoch, "batch_in_epoch": batch,
                             "world_size": session.info.world_size},
                 "params_hash": session.params_hash, "meta": session.meta, "stats": dict(progress.stats),
                 "params": params.model_dump(mode="json")}
        ckpt_mod.save_checkpoint(session.last_path, state)
        save_ema(session, step)
    progress.last_saved_step = step


def save_ema(session: Session, step: int) -> None:
    """``ema.pt``: the stage's output, the EMA weights + meta that inference loads (rank 0)."""
    ckpt_mod.save_checkpoint(session.ema_path, {
        "ema": session.step.ema.state_dict(), "step": step, "params_hash": session.params_hash,
        "meta": session.meta})


def project_relative(path: Path) -> str:
    """``path`` relative to the project when inside it: metrics files stay the same on every machine."""
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)
