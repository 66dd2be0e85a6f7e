"""Stage ``train``: MT-Diffusion training (M5) on the pre-extracted latents/representations.

Single process or DDP under ``torchrun`` (NCCL on GPU, gloo on CPU). Writes, on rank 0 only:

- the stage's outputs (DVC caches them, so the run-cache reuses an identical run):
  ``params.checkpoints_dir/ema.pt`` (EMA weights + meta, what inference loads; every
  ``train.ckpt_every`` steps and at the end), ``params.metrics_dir/train.json`` and
  ``params.metrics_dir/train_log.csv`` (the training curve, one row per ``train.log_every`` steps);
- the resumable training state, which is no output (DVC deletes outputs before it runs a stage):
  ``<project>/.mtdiff/train_state/<out_dir>/last.pt`` (:func:`train_state_dir`) and its
  ``train_log.csv``, every ``train.ckpt_every`` steps and at the end.

Resume: when ``last.pt`` exists and its ``params_hash`` equals the current one, training goes on
from it exactly: same weights, optimizer, LR schedule, EMA, data order (epoch permutation from
``(seed, epoch)`` plus the position in the epoch) and noise (the per-rank noise generator and the
global RNGs are restored). ``train.steps`` is not hashed, so raising it extends a finished run.
A different hash, a checkpoint past ``train.steps``, or a finished checkpoint of other code
(``checkpoint.code_hash`` of the package source: DVC reruns the stage because its code changed)
starts fresh and moves the old state aside (``last.pt.stale`` in the state dir); an unfinished one
of other code resumes with a warning. A ``last.pt`` left in ``checkpoints/`` by an older version is
moved into the state dir and resumed.

A non-finite loss stops training with :class:`NonFiniteLossError` (step, per-task losses) before
anything is saved, so the last good checkpoint stays.

The stage reads setup -> resume -> loop -> summary; the step itself is
:class:`mtdiff.training.TrainStep` (the one ``mtdiff bench train`` times).
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from mtdiff import checkpoint as ckpt_mod
from mtdiff.config import Params, project_root
from mtdiff.data import TrainDataset, collate_batch
from mtdiff.diffusion import MTDiffusion
from mtdiff.io import write_json
from mtdiff.models import TRAIN_FLOPS_PER_FORWARD, build_model, count_params, flops_per_image
from mtdiff.pipeline import registry
from mtdiff.pipeline.preemption import Preempted, PreemptionWatch
from mtdiff.pipeline.tracking import main_stage_run
from mtdiff.pipeline.tracking import file_metrics, parent_run_id
from mtdiff.sampling import preview_grid
from mtdiff.sampling_io import to_pil
from mtdiff.stages import stage_main
from mtdiff.training import (EMA, DistInfo, NonFiniteLossError, ResumableBatchSampler, TrainMeter,
                             TrainLog, TrainStep, Window, autocast_dtype, barrier, configure_backends,
                             distributed, make_sampler, per_rank_batch, ranks_in_sync, to_device)
from mtdiff.utils import derive_seed, format_duration, get_logger, seed_everything

log = get_logger("mtdiff.train")

__all__ = ["NonFiniteLossError", "TrainResult", "dataset_meta", "main", "run", "train", "train_state_dir"]

STATE_ROOT = Path(".mtdiff") / "train_state"  # under the project root: gitignored, .dvcignored, no output
TRAIN_LOG = "train_log.csv"
GRID_KEY = "train/samples"  # MLflow image key of the grids every train.grid_every steps
# per-window curves (train/step/loss, train/step/eps, train/step/lr, ...) beside the run's summary
# (train/final_loss, ... from train.json): one "train" group in MLflow's UI
STEP_KEY_PREFIX = "train/step/"


def train_state_dir(params: Params) -> Path:
    """Where the resumable state of the run writing ``params.checkpoints_dir`` lives:
    ``<project>/.mtdiff/train_state/<out_dir relative to the project>`` (``checkpoints`` by default),
    or ``<name>-<hash of the absolute path>`` for an out_dir outside the project."""
    out = params.checkpoints_dir.resolve()
    root = project_root().resolve()
    try:
        key = out.relative_to(root).as_posix().replace("/", "__")
    except ValueError:
        key = ""
    if not key or key.startswith("."):
        key = f"{out.name}-{hashlib.sha1(str(out).encode()).hexdigest()[:10]}"
    return root / STATE_ROOT / key


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw (unwrapped) model, its EMA, and the summary dict."""

    model: nn.Module
    ema: EMA
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Session:
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
class _Progress:
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


def dataset_meta(dataset: TrainDataset, params: Params) -> dict[str, Any]:
    """num_classes / repr_dim / shape (C, H, W) of the training data, as stored in checkpoints."""
    shape = [int(s) for s in dataset.shape]
    repr_dim = getattr(dataset, "repr_dim", None)
    return {"num_classes": int(dataset.num_classes), "repr_dim": int(repr_dim) if repr_dim else None,
            "shape": shape, "mode": params.diffusion.mode}


# -- setup / resume -----------------------------------------------------------------------------

def _setup(params: Params, info: DistInfo) -> _Session:
    """Data, model and the training step, seeded identically on every rank."""
    started = time.time()
    tc, device = params.train, info.device
    configure_backends(device, tc.tf32)
    dataset = TrainDataset(params, split="train")
    phash = ckpt_mod.params_hash(params)
    meta = {**dataset_meta(dataset, params), "arch": ckpt_mod.arch_config(params), "params_hash": phash,
            "code_hash": ckpt_mod.code_hash()}
    batch_size = per_rank_batch(tc.batch_size, info)
    sampler = make_sampler(len(dataset), info, params.seed)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(dataset)} items, fewer than one batch of "
                         f"train.batch_size {tc.batch_size} ({batch_size} per process)")

    seed_everything(params.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(params, repr_dim=meta["repr_dim"], num_classes=meta["num_classes"],
                        input_shape=meta["shape"]).to(device)
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(derive_seed(params.seed, "noise", info.rank))
    step = TrainStep(model, MTDiffusion(params.diffusion), params, device, generator=noise_gen,
                     amp_dtype=autocast_dtype(device, tc.precision), compile_model=tc.compile,
                     ddp=info.distributed)
    seed_everything(derive_seed(params.seed, "global", info.rank))  # distinct global RNG streams per rank
    return _Session(params, info, dataset, sampler, batch_size, steps_per_epoch, meta, phash, step, noise_gen, started,
                    train_state_dir(params))


def _adopt_legacy_state(session: _Session) -> None:
    """``checkpoints/last.pt`` of an older version (when it was a persistent output): move it into the
    state dir once, so such a run still resumes and the output folder holds only ``ema.pt``."""
    legacy = session.ckpt_dir / ckpt_mod.LAST
    if session.info.is_main and legacy.exists() and not session.last_path.exists():
        session.state_dir.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, session.last_path)
        log.info("moved %s (older layout) to %s", legacy, session.last_path)


def _resume(session: _Session) -> _Progress:
    """Progress restored from ``last.pt`` of the same run, else a fresh start (old files moved aside)."""
    progress = _Progress()
    info, steps = session.info, session.params.train.steps
    _adopt_legacy_state(session)
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


def _fresh_start_reason(session: _Session, state: dict[str, Any], steps: int) -> Optional[str]:
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


def _restore(session: _Session, state: dict[str, Any]) -> _Progress:
    info = session.info
    session.step.load_state_dict(state)
    progress = _Progress(step=int(state["step"]), epoch=int(state["epoch"]),
                         batch_in_epoch=int(state["batch_in_epoch"]),
                         stats=dict(state.get("stats") or _Progress().stats))
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


def _move_aside(session: _Session, reason: str) -> None:
    """The state of another run is kept as ``last.pt.stale.<n>`` (numbered, never overwritten; its EMA
    included); its ``ema.pt`` in the output folder goes (extra files there would join the DVC output)."""
    ckpt_mod.move_aside(session.last_path.parent, reason, names=(session.last_path.name,))
    session.ema_path.unlink(missing_ok=True)


# -- checkpoints --------------------------------------------------------------------------------

def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _save_checkpoint(session: _Session, progress: _Progress) -> None:
    """``last.pt`` (everything to resume, every rank's RNGs) and ``ema.pt``, written by rank 0."""
    rng_state = {"global": ckpt_mod.capture_rng_state(), "noise": session.noise_gen.get_state()}
    rngs = _gather_objects(rng_state, session.info)
    epoch, batch = progress.position(session.steps_per_epoch)
    params, step = session.params, progress.step
    if session.info.is_main:
        state = {**session.step.state_dict(), "step": step, "epoch": epoch, "batch_in_epoch": batch, "rng": rngs,
                 "sampler": {"seed": params.seed, "epoch": epoch, "batch_in_epoch": batch,
                             "world_size": session.info.world_size},
                 "params_hash": session.params_hash, "meta": session.meta, "stats": dict(progress.stats),
                 "params": params.model_dump(mode="json")}
        ckpt_mod.save_checkpoint(session.last_path, state)
        _save_ema(session, step)
    progress.last_saved_step = step


def _save_ema(session: _Session, step: int) -> None:
    """``ema.pt``: the stage's output, the EMA weights + meta that inference loads (rank 0)."""
    ckpt_mod.save_checkpoint(session.ema_path, {
        "ema": session.step.ema.state_dict(), "step": step, "params_hash": session.params_hash,
        "meta": session.meta})


# -- the loop -----------------------------------------------------------------------------------

def _epoch_loader(session: _Session, epoch: int, start_batch: int) -> DataLoader:
    """This rank's batches of ``epoch`` from batch ``start_batch`` on (the permutation depends on (seed, epoch))."""
    session.sampler.set_epoch(epoch)
    session.dataset.set_epoch(epoch)  # per-sample draws seeded by (seed, epoch, index): exact resume with workers
    tc = session.params.train
    batches = ResumableBatchSampler(session.sampler, session.batch_size, start_batch)
    # its own generator: creating a loader must not draw from the global RNG
    generator = torch.Generator().manual_seed(derive_seed(session.params.seed, f"loader/{epoch}"))
    return DataLoader(session.dataset, batch_sampler=batches, collate_fn=collate_batch, num_workers=tc.num_workers,
                      pin_memory=session.info.device.type == "cuda", generator=generator)


def _loop(session: _Session, progress: _Progress, tracker: Any,
          on_step: Optional[Callable[[int], None]], watch: PreemptionWatch) -> TrainMeter:
    """Train from ``progress`` to ``train.steps``, logging and checkpointing on the way; a stop
    signal (``watch``) saves the resumable state at the next step boundary and raises Preempted."""
    tc = session.params.train
    meter = TrainMeter(["loss", "eps", *session.params.tasks.enabled], tc.batch_size, session.info)
    bar = tqdm(total=tc.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=(not session.info.is_main) or None, mininterval=1.0)
    while progress.step < tc.steps:
        for batch in _epoch_loader(session, progress.epoch, progress.batch_in_epoch):
            out = session.step(to_device(batch, session.info.device))
            progress.step += 1
            progress.batch_in_epoch += 1
            meter.add(progress.step, out)
            bar.update(1)
            _end_of_step(session, progress, meter, tracker, bar)
            if on_step is not None:
                on_step(progress.step)
            stop = _stop_signal(watch, session.info, progress.step)
            if stop is not None:
                if progress.last_saved_step != progress.step:
                    _flush_window(session, progress, meter, tracker, bar)
                    _save_checkpoint(session, progress)
                bar.close()
                raise Preempted(stop, progress.step, tc.steps, _project_relative(session.last_path))
            if progress.step >= tc.steps:
                break
        if progress.batch_in_epoch >= session.steps_per_epoch:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    return meter


# Under DDP the ranks agree on a stop by an all-reduce, which waits for the device: every N steps
# only (all ranks at the same steps), so a step does not sync for it; the grace period pays N steps.
DDP_STOP_CHECK_EVERY = 10


def _stop_signal(watch: PreemptionWatch, info: DistInfo, step: int) -> Optional[str]:
    """The stop signal's name if this rank (or, under DDP, any rank) got one: all ranks stop together."""
    name = watch.requested
    if info.world_size == 1:
        return name
    if step % DDP_STOP_CHECK_EVERY:
        return None
    flag = torch.tensor([0 if name is None else 1], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (name or "SIGTERM") if int(flag.item()) else None


def _flush_window(session: _Session, progress: _Progress, meter: TrainMeter, tracker: Any, bar: tqdm) -> None:
    """Check the window's losses are finite (else stop before saving anything), record and log it."""
    kept = progress.last_saved_step if progress.last_saved_step is not None else "none"
    meter.check_finite(f"; stopped without saving, the last good checkpoint ({session.last_path}, step {kept}) "
                       "is kept. Lower train.lr, raise train.warmup_steps, or use train.precision fp32/bf16.")
    window = meter.flush()
    progress.record(window)
    if session.info.is_main:
        _log_window(session, progress, window, tracker, bar)


def _end_of_step(session: _Session, progress: _Progress, meter: TrainMeter, tracker: Any, bar: tqdm) -> None:
    """Every ``log_every`` steps: check the losses are finite and log the window; every
    ``ckpt_every`` steps (and at the end): also checkpoint; every ``grid_every`` steps: a sample grid.
    The checkpoint's and the grid's time is not training time."""
    tc, step = session.params.train, progress.step
    save_now = step % tc.ckpt_every == 0 or step >= tc.steps
    if save_now or step % tc.log_every == 0:
        _flush_window(session, progress, meter, tracker, bar)
    if save_now:
        t0 = time.perf_counter()
        _save_checkpoint(session, progress)
        meter.exclude(time.perf_counter() - t0)
    if tc.grid_every and step % tc.grid_every == 0 and session.info.is_main:
        t0 = time.perf_counter()
        _log_grid(session, step, tracker)
        meter.exclude(time.perf_counter() - t0)


def _log_grid(session: _Session, step: int, tracker: Any) -> None:
    """A sample grid from the EMA weights, logged as a step-tagged MLflow image (the UI shows samples
    improving). It leaves training's trajectory alone: a copy of the model, the sampler's own seeded
    generator, and the global RNGs forked (so a run with grids trains the same weights as one without)."""
    device = session.info.device
    if session.preview_model is None:
        session.preview_model = copy.deepcopy(session.step.model).eval().requires_grad_(False)
        session.preview_model.zero_grad(set_to_none=True)  # the copied .grad tensors are not needed
    session.step.ema.copy_to(session.preview_model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        grid = preview_grid(session.params, session.preview_model, MTDiffusion(session.params.diffusion),
                            session.meta, device, tasks=session.params.tasks_at(step - 1))
    tracker.log_image(to_pil(grid), key=GRID_KEY, step=step)


def _log_window(session: _Session, progress: _Progress, window: Window, tracker: Any, bar: tqdm) -> None:
    lr = session.step.scheduler.get_last_lr()[0]
    loss = window.losses["loss"]
    curves = {**window.losses, "lr": lr, "img_per_s": window.img_per_s, "grad_norm": window.grad_norm,
              "epoch": progress.epoch}
    tracker.log_metrics({STEP_KEY_PREFIX + k: v for k, v in curves.items()}, step=progress.step)
    if session.train_log is not None:
        session.train_log.append(progress.step, progress.epoch, window.losses, lr, window.grad_norm, window.img_per_s)
        session.train_log.publish()
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{window.img_per_s:.0f}", refresh=False)
    per_task = " ".join(f"{n} {v:.4f}" for n, v in window.losses.items() if n != "loss")
    tc = session.params.train
    eta_s = (tc.steps - progress.step) * tc.batch_size / max(window.img_per_s, 1e-9)
    log.info("step %d/%d loss %.4f (%s) lr %.2e grad %.3f %.0f img/s, ETA %s", progress.step, tc.steps,
             loss, per_task, lr, window.grad_norm, window.img_per_s, format_duration(eta_s))


# -- summary ------------------------------------------------------------------------------------

def _summary(session: _Session, progress: _Progress, meter: TrainMeter, in_sync: bool) -> dict[str, Any]:
    tc, stats = session.params.train, progress.stats
    model = session.step.model
    fpi = flops_per_image(model)
    last = stats.get("last_losses") or {}
    steady = meter.steady
    return {
        "steps": progress.step, "resumed_from_step": progress.resumed_from,
        "epochs": progress.epoch + progress.batch_in_epoch / session.steps_per_epoch,
        "final_loss": last.get("loss"), "final_losses": {k: v for k, v in last.items() if k != "loss"},
        "img_per_s": meter.session.img_per_s, "img_per_s_steady": steady.img_per_s,
        "img_per_s_all_sessions": (stats["images"] / stats["train_time_s"]) if stats["train_time_s"] else None,
        "train_time_s": stats["train_time_s"], "wall_time_s": time.time() - session.started,
        "images_seen": stats["images"], "world_size": session.info.world_size, "device": str(session.info.device),
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(session.step.amp_dtype, "fp32"), "global_batch_size": tc.batch_size,
        "params_count": count_params(model), "flops_per_image": fpi,
        "train_tflops_per_s": (TRAIN_FLOPS_PER_FORWARD * fpi * steady.img_per_s / 1e12) if steady.img_per_s else None,
        "params_hash": session.params_hash, "ranks_in_sync": in_sync,
        "checkpoint": _project_relative(session.last_path), "ema_checkpoint": str(session.ema_path),
    }


def _project_relative(path: Path) -> str:
    """``path`` relative to the project when inside it: metrics files stay the same on every machine."""
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)


def _report(session: _Session, summary: dict[str, Any], tracker: Any) -> None:
    """train.json, the run's final MLflow metrics/tags and one log line (rank 0)."""
    metrics_path = write_json(session.params.metrics_dir / "train.json", summary)
    resumed = summary["resumed_from_step"]
    tracker.set_tags({"checkpoint": str(session.last_path), "params_hash": session.params_hash,
                      "resumed_from_step": resumed if resumed is not None else "none"})
    # train/<key> of train.json, the keys the parent and sweep runs log them under
    tracker.log_metrics(file_metrics(metrics_path, summary), step=summary["steps"])
    tracker.log_artifact(metrics_path)
    final = summary["final_loss"]
    log.info("done: %d steps, final loss %s, %.1f img/s, wall %.1f s -> %s", summary["steps"],
             f"{final:.4f}" if final is not None else "n/a", summary["img_per_s"] or float("nan"),
             summary["wall_time_s"], session.last_path)


def _log_start(session: _Session, progress: _Progress, tracker: Any) -> None:
    tc, model = session.params.train, session.step.model
    n_params, fpi = count_params(model), flops_per_image(model)
    tracker.log_metrics({"model/params": n_params, "model/gflops_per_image": fpi / 1e9}, step=progress.step)
    log.info("training %s params (%.3f GFLOPs/img) on %s x%d, %d steps, global batch %d, %d steps/epoch",
             f"{n_params:,}", fpi / 1e9, session.info.device, session.info.world_size, tc.steps, tc.batch_size,
             session.steps_per_epoch)


def _log_model_and_data(session: _Session, summary: dict[str, Any], tracker: Any) -> None:
    """The data set as the run's input and the EMA model in the registry (rank 0, MLflow on)."""
    if getattr(tracker, "online", False) is not True:  # no run, or its server went away mid-run
        return
    digest = registry.log_dataset(session.params)
    if digest:
        tracker.set_tags({"data_digest": digest})
    registry.log_model(session.params, session.ema_path, summary, parent_run_id=parent_run_id())


# -- entry points -------------------------------------------------------------------------------

def train(params: Params, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train per ``params.train``; ``on_step(step)`` is called after every completed step (tests/bench)."""
    with distributed(params.train.device) as info:
        session = _setup(params, info)
        progress = _resume(session)
        if info.is_main:
            session.train_log = TrainLog(session.state_dir / TRAIN_LOG, params.metrics_dir / TRAIN_LOG)
            session.train_log.start(progress.resumed_from)
        with main_stage_run(params, "train", session.ckpt_dir, info, system_metrics=True) as tracker:
            if info.is_main:
                _log_start(session, progress, tracker)
            with PreemptionWatch() as watch:
                meter = _loop(session, progress, tracker, on_step, watch)
            step = session.step
            in_sync = ranks_in_sync(step.model.state_dict(), info) and ranks_in_sync(step.ema.shadow, info)
            if not in_sync:
                raise RuntimeError("DDP ranks ended with different weights; the checkpoint is not trustworthy")
            summary = _summary(session, progress, meter, in_sync)
            if info.is_main:
                if not session.ema_path.exists():  # resumed at train.steps after DVC removed the outputs
                    _save_ema(session, progress.step)
                session.train_log.publish()
                _report(session, summary, tracker)
                _log_model_and_data(session, summary, tracker)
            barrier(info)
        return TrainResult(model=session.step.model, ema=session.step.ema, summary=summary)


def run(params: Params) -> dict[str, Any]:
    """DVC stage entry point: train (or resume) and return the summary written to train.json."""
    return train(params).summary


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
