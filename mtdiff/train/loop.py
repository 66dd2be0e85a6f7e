"""The training loop: setup -> resume -> steps (logging, checkpoints, preview grids) -> summary.

Single process or DDP under ``torchrun``. The step itself is :class:`mtdiff.train.step.TrainStep`;
what is saved and resumed, :mod:`mtdiff.train.state`. The loop reports to a ``tracker`` it is
given (``log_metrics``, ``log_image``; the train stage passes its MLflow run) and stops at the next
step boundary on SIGTERM / SIGINT / SIGUSR1 after saving its state (:class:`Preempted`).

A non-finite loss stops training with :class:`NonFiniteLossError` (step, per-task losses) before
anything is saved, so the last good checkpoint stays.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtdiff import checkpoint as ckpt_mod
from mtdiff.config import Params
from mtdiff.data import TrainDataset, collate_batch
from mtdiff.diffusion import MTDiffusion
from mtdiff.distributed import DistInfo, per_rank_batch, ranks_in_sync
from mtdiff.models import TRAIN_FLOPS_PER_FORWARD, build_model, count_params, flops_per_image
from mtdiff.precision import autocast_dtype, configure_backends, device_name
from mtdiff.sampling import preview_grid
from mtdiff.sampling_io import to_pil
from mtdiff.train.loader import ResumableBatchSampler, make_sampler, to_device
from mtdiff.train.meter import TrainLog, TrainMeter, Window
from mtdiff.train.optim import EMA
from mtdiff.train.preemption import Preempted, PreemptionWatch
from mtdiff.train.schedule import tasks_at
from mtdiff.train.state import (Progress, Session, project_relative, resume, save_checkpoint, save_ema,
                                train_state_dir)
from mtdiff.train.step import TrainStep
from mtdiff.utils import derive_seed, format_duration, get_logger, seed_everything

log = get_logger("mtdiff.train")

TRAIN_LOG = "train_log.csv"
GRID_KEY = "train/samples"  # MLflow image key of the grids every train.grid_every steps
# per-window curves (train/step/loss, train/step/eps, train/step/lr, ...) beside the run's summary
# (train/final_loss, ... from train.json): one "train" group in MLflow's UI
STEP_KEY_PREFIX = "train/step/"


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw (unwrapped) model, its EMA, and the summary dict."""

    model: nn.Module
    ema: EMA
    summary: dict[str, Any] = field(default_factory=dict)


def dataset_meta(dataset: TrainDataset, params: Params) -> dict[str, Any]:
    """num_classes / repr_dim / shape (C, H, W) of the training data, as stored in checkpoints."""
    shape = [int(s) for s in dataset.shape]
    repr_dim = getattr(dataset, "repr_dim", None)
    return {"num_classes": int(dataset.num_classes), "repr_dim": int(repr_dim) if repr_dim else None,
            "shape": shape, "mode": params.diffusion.mode}


# -- setup --------------------------------------------------------------------------------------

def _setup(params: Params, info: DistInfo) -> Session:
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
    return Session(params, info, dataset, sampler, batch_size, steps_per_epoch, meta, phash, step, noise_gen, started,
                    train_state_dir(params))


# -- the loop -----------------------------------------------------------------------------------

def _epoch_loader(session: Session, epoch: int, start_batch: int) -> DataLoader:
    """This rank's batches of ``epoch`` from batch ``start_batch`` on (the permutation depends on (seed, epoch))."""
    session.sampler.set_epoch(epoch)
    session.dataset.set_epoch(epoch)  # per-sample draws seeded by (seed, epoch, index): exact resume with workers
    tc = session.params.train
    batches = ResumableBatchSampler(session.sampler, session.batch_size, start_batch)
    # its own generator: creating a loader must not draw from the global RNG
    generator = torch.Generator().manual_seed(derive_seed(session.params.seed, f"loader/{epoch}"))
    return DataLoader(session.dataset, batch_sampler=batches, collate_fn=collate_batch, num_workers=tc.num_workers,
                      pin_memory=session.info.device.type == "cuda", generator=generator)


def _loop(session: Session, progress: Progress, tracker: Any,
          on_step: Optional[Callable[[int], None]], watch: PreemptionWatch) -> TrainMeter:
    """Train from ``progress`` to ``train.steps``, logging and checkpointing on the way; a stop
    signal (``watch``) saves the resumable state at the next step boundary and raises Preempted."""
    tc = session.params.train
    tasks = session.params.tasks
    meter = TrainMeter(["loss", "eps", *tasks.enabled, *(["classifier"] if tasks.clean_classifier else [])],
                       tc.batch_size, session.info)
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
            stop = stop_signal(watch, session.info, progress.step)
            if stop is not None:
                if progress.last_saved_step != progress.step:
                    _flush_window(session, progress, meter, tracker, bar)
                    save_checkpoint(session, progress)
                bar.close()
                raise Preempted(stop, progress.step, tc.steps, project_relative(session.last_path))
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


def stop_signal(watch: PreemptionWatch, info: DistInfo, step: int) -> Optional[str]:
    """The stop signal's name if this rank (or, under DDP, any rank) got one: all ranks stop together."""
    name = watch.requested
    if info.world_size == 1:
        return name
    if step % DDP_STOP_CHECK_EVERY:
        return None
    flag = torch.tensor([0 if name is None else 1], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (name or "SIGTERM") if int(flag.item()) else None


def _flush_window(session: Session, progress: Progress, meter: TrainMeter, tracker: Any, bar: tqdm) -> None:
    """Check the window's losses are finite (else stop before saving anything), record and log it."""
    kept = progress.last_saved_step if progress.last_saved_step is not None else "none"
    meter.check_finite(f"; stopped without saving, the last good checkpoint ({session.last_path}, step {kept}) "
                       "is kept. Lower train.lr, raise train.warmup_steps, or use train.precision fp32/bf16.")
    window = meter.flush()
    progress.record(window)
    if session.info.is_main:
        _log_window(session, progress, window, tracker, bar)


def _end_of_step(session: Session, progress: Progress, meter: TrainMeter, tracker: Any, bar: tqdm) -> None:
    """Every ``log_every`` steps: check the losses are finite and log the window; every
    ``ckpt_every`` steps (and at the end): also checkpoint; every ``grid_every`` steps: a sample grid.
    The checkpoint's and the grid's time is not training time."""
    tc, step = session.params.train, progress.step
    save_now = step % tc.ckpt_every == 0 or step >= tc.steps
    if save_now or step % tc.log_every == 0:
        _flush_window(session, progress, meter, tracker, bar)
    if save_now:
        t0 = time.perf_counter()
        save_checkpoint(session, progress)
        meter.exclude(time.perf_counter() - t0)
    if tc.grid_every and step % tc.grid_every == 0 and session.info.is_main:
        t0 = time.perf_counter()
        _log_grid(session, step, tracker)
        meter.exclude(time.perf_counter() - t0)


def _log_grid(session: Session, step: int, tracker: Any) -> None:
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
                            session.meta, device, tasks=tasks_at(session.params, step - 1))
    tracker.log_image(to_pil(grid), key=GRID_KEY, step=step)


def _log_window(session: Session, progress: Progress, window: Window, tracker: Any, bar: tqdm) -> None:
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

def _summary(session: Session, progress: Progress, meter: TrainMeter, in_sync: bool) -> dict[str, Any]:
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
        "device_name": device_name(session.info.device),
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(session.step.amp_dtype, "fp32"), "global_batch_size": tc.batch_size,
        "params_count": count_params(model), "flops_per_image": fpi,
        "train_tflops_per_s": (TRAIN_FLOPS_PER_FORWARD * fpi * steady.img_per_s / 1e12) if steady.img_per_s else None,
        "params_hash": session.params_hash, "ranks_in_sync": in_sync,
        "checkpoint": project_relative(session.last_path), "ema_checkpoint": str(session.ema_path),
    }


def _log_start(session: Session, progress: Progress, tracker: Any) -> None:
    tc, model = session.params.train, session.step.model
    n_params, fpi = count_params(model), flops_per_image(model)
    tracker.log_metrics({"model/params": n_params, "model/gflops_per_image": fpi / 1e9}, step=progress.step)
    log.info("training %s params (%.3f GFLOPs/img) on %s (%s) x%d, %d steps, global batch %d, %d steps/epoch",
             f"{n_params:,}", fpi / 1e9, session.info.device, device_name(session.info.device),
             session.info.world_size, tc.steps, tc.batch_size, session.steps_per_epoch)


# -- entry point --------------------------------------------------------------------------------

def start(params: Params, info: DistInfo) -> tuple[Session, Progress]:
    """Set up the run and resume its state (or start fresh); rank 0 opens the training curve."""
    session = _setup(params, info)
    progress = resume(session)
    if info.is_main:
        session.train_log = TrainLog(session.state_dir / TRAIN_LOG, params.metrics_dir / TRAIN_LOG)
        session.train_log.start(progress.resumed_from)
    return session, progress


def fit(session: Session, progress: Progress, tracker: Any,
        on_step: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Train from ``progress`` to ``train.steps`` (``on_step(step)`` after every step: tests, bench);
    returns the summary that train.json holds. Rank 0 leaves ``ema.pt`` and the curve in place."""
    info = session.info
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
            save_ema(session, progress.step)
        session.train_log.publish()
    return summary
