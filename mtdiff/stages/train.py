"""Stage ``train``: MT-Diffusion training (M5) on the pre-extracted latents/representations.

Single process or DDP under ``torchrun`` (NCCL on GPU, gloo on CPU). Writes, on rank 0 only:
``params.checkpoints_dir/last.pt`` (resumable, every ``train.ckpt_every`` steps and at the end),
``ema.pt`` (EMA weights + meta for inference) and ``params.metrics_dir/train.json``.

Resume: when ``last.pt`` exists and its ``params_hash`` equals the current one, training goes on
from it exactly: same weights, optimizer, LR schedule, EMA, data order (epoch permutation from
``(seed, epoch)`` plus the position in the epoch) and noise (the per-rank noise generator and the
global RNGs are restored). ``train.steps`` is not hashed, so raising it extends a finished run.
A different hash, or a checkpoint past ``train.steps``, starts fresh and moves the old files aside
(``last.pt.stale``).

A non-finite loss stops training with :class:`NonFiniteLossError` (step, per-task losses) before
anything is saved, so the last good checkpoint stays.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from mtdiff import checkpoint as ckpt_mod
from mtdiff.config import Params
from mtdiff.io import write_json
from mtdiff.stages import stage_main
from mtdiff.training import (EMA, DistInfo, ResumableBatchSampler, all_reduce_mean, autocast,
                             autocast_dtype, barrier, build_optimizer, build_scheduler,
                             configure_backends, init_distributed, make_grad_scaler, make_sampler,
                             per_rank_batch, ranks_in_sync, shutdown_distributed, stack_losses, to_device)
from mtdiff.utils import get_logger, seed_everything

log = get_logger("mtdiff.train")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the per-task losses."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw (unwrapped) model, its EMA, and the summary dict."""

    model: nn.Module
    ema: EMA
    summary: dict[str, Any] = field(default_factory=dict)


class _LossModule(nn.Module):
    """``forward(z0, targets) -> training_losses(...)`` so DDP sees the whole step (encoders E_i
    of M2 run inside ``aggregate``, which DDP must also cover) as one forward."""

    def __init__(self, model: nn.Module, diffusion, tasks_cfg, generator: torch.Generator):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.tasks_cfg = tasks_cfg
        self.generator = generator

    def forward(self, z0: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.diffusion.training_losses(self.model, z0, targets, tasks_cfg=self.tasks_cfg,
                                              generator=self.generator)


class _NullRun:
    """MLflow stand-in for ranks other than 0 (they log nothing)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


# -- data ---------------------------------------------------------------------------------------

def _open_dataset(params: Params):
    from mtdiff.data import TrainDataset

    return TrainDataset(params, split="train")


def dataset_meta(dataset, params: Params) -> dict[str, Any]:
    """num_classes / repr_dim / shape (C, H, W) of the training data, as stored in checkpoints."""
    shape = [int(s) for s in dataset.shape]
    repr_dim = getattr(dataset, "repr_dim", None)
    return {"num_classes": int(dataset.num_classes), "repr_dim": int(repr_dim) if repr_dim else None,
            "shape": shape, "mode": params.diffusion.mode}


def make_targets(batch: dict[str, torch.Tensor], params: Params,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(z0, targets)`` for :meth:`MTDiffusion.training_losses` from a collated batch on the device.

    The masked task's input is ``z0 * mask`` with a fresh random patch mask per image
    (``tasks.masked.mask_ratio`` of the ``model.patch_size`` patches hidden), drawn from the
    noise generator so a resumed run draws the same masks.
    """
    from mtdiff.data import random_patch_mask

    z0 = batch["z0"]
    targets: dict[str, torch.Tensor] = {}
    for name in params.tasks.enabled:
        if name == "masked":
            mask = random_patch_mask(z0.shape[0], z0.shape[1:], params.tasks.masked.mask_ratio,
                                     params.model.patch_size, generator=generator, device=z0.device)
            targets["masked"] = z0 * mask.to(z0.dtype)
        else:
            if name not in batch:
                raise KeyError(f"tasks.{name} is enabled but the training batch has no '{name}' "
                               f"(batch keys: {sorted(batch)}); re-run the data stages")
            targets[name] = batch[name]
    return z0, targets


# -- checkpoint state ---------------------------------------------------------------------------

def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _rng_bundle(noise_gen: torch.Generator) -> dict[str, Any]:
    return {"global": ckpt_mod.capture_rng_state(), "noise": noise_gen.get_state()}


def _move_aside(ckpt_dir: Path, reason: str) -> None:
    for name in (ckpt_mod.LAST, ckpt_mod.EMA):
        p = ckpt_dir / name
        if p.exists():
            stale = p.with_name(p.name + ".stale")
            p.replace(stale)
            log.warning("%s: %s; moved to %s and starting fresh", p, reason, stale)


# -- the loop -----------------------------------------------------------------------------------

def train(params: Params, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train per ``params.train``; ``on_step(step)`` is called after every completed step (tests/bench)."""
    info = init_distributed(params.train.device)
    try:
        return _train(params, info, on_step)
    finally:
        shutdown_distributed(info)


def _train(params: Params, info: DistInfo, on_step: Optional[Callable[[int], None]]) -> TrainResult:
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.models import build_model, count_params, flops_per_image

    t_start = time.time()
    tc = params.train
    device = info.device
    configure_backends(device, tc.tf32)
    amp_dtype = autocast_dtype(device, tc.precision)
    ckpt_dir = params.checkpoints_dir
    last_path = ckpt_dir / ckpt_mod.LAST
    phash = ckpt_mod.params_hash(params)

    dataset = _open_dataset(params)
    meta = dataset_meta(dataset, params)
    meta["arch"] = ckpt_mod.arch_config(params)
    meta["params_hash"] = phash
    batch_size = per_rank_batch(tc.batch_size, info)
    sampler = make_sampler(len(dataset), info, params.seed)
    steps_per_epoch = len(sampler) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"the training set has {len(dataset)} items, fewer than one batch of "
                         f"train.batch_size {tc.batch_size} ({batch_size} per process)")

    seed_everything(params.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(params, repr_dim=meta["repr_dim"], num_classes=meta["num_classes"],
                        input_shape=meta["shape"]).to(device)
    diffusion = MTDiffusion(params.diffusion)
    ema = EMA(model, tc.ema_decay)
    opt = build_optimizer(model, tc.lr, tc.weight_decay, device)
    sched = build_scheduler(opt, tc.warmup_steps)
    scaler = make_grad_scaler(device, amp_dtype)
    noise_gen = torch.Generator(device=device)
    noise_gen.manual_seed(params.seed * 1_000_003 + 17 + info.rank)
    seed_everything(params.seed + 7919 * info.rank)  # distinct global RNG streams per rank

    step, epoch, batch_in_epoch = 0, 0, 0
    stats = {"train_time_s": 0.0, "images": 0, "last_losses": {}}
    resumed_from: Optional[int] = None
    if last_path.exists():
        state = ckpt_mod.load_checkpoint(last_path, map_location="cpu")
        same_run = state.get("params_hash") == phash
        # steps is outside the hash so a longer run extends a shorter one; a checkpoint already past
        # train.steps belongs to a longer run, and reusing it would break a fixed training budget.
        past_budget = same_run and int(state["step"]) > tc.steps
        if same_run and not past_budget:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step, epoch, batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
            stats = dict(state.get("stats", stats))
            rngs = state["rng"]
            if len(rngs) == info.world_size:
                ckpt_mod.restore_rng_state(rngs[info.rank]["global"])
                noise_gen.set_state(rngs[info.rank]["noise"].cpu())  # generator states are CPU byte tensors
            else:
                log.warning("checkpoint was written by %d processes, now %d: weights and data order "
                            "resume exactly, the noise stream does not", len(rngs), info.world_size)
            resumed_from = step
            if info.is_main:
                log.info("resuming from %s at step %d (epoch %d, batch %d)", last_path, step, epoch, batch_in_epoch)
                if step == tc.steps:
                    log.info("the checkpoint is at train.steps %d already: nothing to train "
                             "(raise train.steps to continue)", step)
        else:
            barrier(info)
            if info.is_main:
                reason = (f"checkpoint step {state['step']} is past train.steps {tc.steps}" if past_budget
                          else f"params hash {state.get('params_hash')} != current {phash}")
                _move_aside(ckpt_dir, reason)
        del state
    barrier(info)

    loss_module: nn.Module = _LossModule(torch.compile(model) if tc.compile else model, diffusion,
                                         params.tasks, noise_gen)
    if info.distributed:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)

    from mtdiff.data import collate_batch

    names = ["loss", "eps", *params.tasks.enabled]
    n_params = count_params(model)
    fpi = flops_per_image(model)
    summary: dict[str, Any] = {}
    with _open_tracking(params, info, ckpt_dir) as run:
        if info.is_main:
            run.log_metrics({"model/params": n_params, "model/gflops_per_image": fpi / 1e9}, step=step)
            log.info("training %s params (%.3f GFLOPs/img) on %s x%d, %d steps, global batch %d, "
                     "%d steps/epoch", f"{n_params:,}", fpi / 1e9, device, info.world_size, tc.steps,
                     tc.batch_size, steps_per_epoch)
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   disable=(not info.is_main) or None, mininterval=1.0)
        win_sum = torch.zeros(len(names), device=device)
        win_gnorm = torch.zeros((), device=device)
        win_n = 0
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        bad_vec = torch.zeros(len(names), device=device)
        win_t0 = time.perf_counter()
        win_excluded = 0.0
        last_saved_step = step if resumed_from is not None else -1
        session_images, session_time = 0, 0.0
        steady_images, steady_time, windows = 0, 0.0, 0  # steady: without the first window (warm-up, compile)

        def check_finite() -> None:
            flag = (first_bad >= 0).float()
            if info.distributed:
                flag = all_reduce_mean(flag, info)
            if float(flag) > 0:
                at = int(first_bad)
                vals = {n: float(v) for n, v in zip(names, bad_vec.tolist())}
                msg = (f"non-finite loss at step {at}" if at >= 0 else "non-finite loss on another rank")
                raise NonFiniteLossError(
                    f"{msg}: per-task losses {vals}; stopped without saving, the last good checkpoint "
                    f"({last_path}, step {last_saved_step if last_saved_step >= 0 else 'none'}) is kept. "
                    "Lower train.lr, raise train.warmup_steps, or use train.precision fp32/bf16.")

        def save(at_step: int) -> None:
            nonlocal last_saved_step, win_excluded
            t0 = time.perf_counter()
            rngs = _gather_objects(_rng_bundle(noise_gen), info)
            e, b = (epoch + 1, 0) if batch_in_epoch >= steps_per_epoch else (epoch, batch_in_epoch)
            if info.is_main:
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "sched": sched.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                         "step": at_step, "epoch": e, "batch_in_epoch": b, "rng": rngs,
                         "sampler": {"seed": params.seed, "epoch": e, "batch_in_epoch": b,
                                     "world_size": info.world_size},
                         "params_hash": phash, "meta": meta, "stats": dict(stats),
                         "params": params.model_dump(mode="json")}
                ckpt_mod.save_checkpoint(last_path, state)
                ckpt_mod.save_checkpoint(ckpt_dir / ckpt_mod.EMA, {
                    "ema": ema.state_dict(), "step": at_step, "params_hash": phash, "meta": meta})
            last_saved_step = at_step
            win_excluded += time.perf_counter() - t0

        while step < tc.steps:
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_sampler=ResumableBatchSampler(sampler, batch_size, batch_in_epoch),
                                collate_fn=collate_batch, num_workers=tc.num_workers,
                                pin_memory=device.type == "cuda",
                                # its own generator: creating a loader must not draw from the global RNG
                                generator=torch.Generator().manual_seed(params.seed * 1009 + epoch))
            for batch in loader:
                batch = to_device(batch, device)
                z0, targets = make_targets(batch, params, noise_gen)
                with autocast(device, amp_dtype):
                    losses = loss_module(z0, targets)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if tc.grad_clip > 0:
                    scaler.unscale_(opt)
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                else:
                    gnorm = torch.zeros((), device=device)
                scaler.step(opt)
                scaler.update()
                sched.step()
                ema.update(model)
                step += 1
                batch_in_epoch += 1

                vec = stack_losses(losses, names)
                bad = ~torch.isfinite(vec).all()
                newly = bad & (first_bad < 0)
                first_bad = torch.where(newly, torch.full_like(first_bad, step), first_bad)
                bad_vec = torch.where(newly, vec, bad_vec)
                win_sum += vec
                win_gnorm += gnorm.detach().float()
                win_n += 1
                bar.update(1)

                is_last = step >= tc.steps
                if step % tc.log_every == 0 or step % tc.ckpt_every == 0 or is_last:
                    check_finite()
                    mean = all_reduce_mean(win_sum / win_n, info).tolist()
                    gn = float(all_reduce_mean(win_gnorm / win_n, info))
                    elapsed = max(time.perf_counter() - win_t0 - win_excluded, 1e-9)
                    imgs = win_n * tc.batch_size
                    session_images += imgs
                    session_time += elapsed
                    windows += 1
                    if windows > 1:
                        steady_images += imgs
                        steady_time += elapsed
                    stats["images"] = int(stats["images"]) + imgs
                    stats["train_time_s"] = float(stats["train_time_s"]) + elapsed
                    stats["last_losses"] = dict(zip(names, mean))
                    ips = imgs / elapsed
                    if info.is_main:
                        lr = sched.get_last_lr()[0]
                        metrics = {f"loss/{n}" if n != "loss" else "loss": v for n, v in zip(names, mean)}
                        metrics.update({"lr": lr, "img_per_s": ips, "grad_norm": gn, "epoch": epoch})
                        run.log_metrics(metrics, step=step)
                        bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{ips:.0f}", refresh=False)
                        log.info("step %d/%d loss %.4f (%s) lr %.2e grad %.3f %.0f img/s", step, tc.steps,
                                 mean[0], " ".join(f"{n} {v:.4f}" for n, v in zip(names[1:], mean[1:])),
                                 lr, gn, ips)
                    win_sum.zero_()
                    win_gnorm.zero_()
                    win_n = 0
                    win_excluded = 0.0
                    win_t0 = time.perf_counter()
                if step % tc.ckpt_every == 0 or is_last:
                    save(step)
                if on_step is not None:
                    on_step(step)
                if is_last:
                    break
            if batch_in_epoch >= steps_per_epoch:
                epoch += 1
                batch_in_epoch = 0
        bar.close()
        in_sync = ranks_in_sync(model.state_dict(), info) and ranks_in_sync(ema.shadow, info)
        if not in_sync:
            raise RuntimeError("DDP ranks ended with different weights; the checkpoint is not trustworthy")
        wall = time.time() - t_start
        last = stats.get("last_losses") or {}
        summary = {
            "steps": step, "resumed_from_step": resumed_from, "epochs": epoch + batch_in_epoch / steps_per_epoch,
            "final_loss": last.get("loss"), "final_losses": {k: v for k, v in last.items() if k != "loss"},
            "img_per_s": (session_images / session_time) if session_time > 0 else None,
            "img_per_s_steady": (steady_images / steady_time) if steady_time > 0 else None,
            "img_per_s_all_sessions": (stats["images"] / stats["train_time_s"]) if stats["train_time_s"] else None,
            "train_time_s": stats["train_time_s"], "wall_time_s": wall, "images_seen": stats["images"],
            "world_size": info.world_size, "device": str(device), "precision": tc.precision if amp_dtype else "fp32",
            "global_batch_size": tc.batch_size, "params_count": n_params, "flops_per_image": fpi,
            # model FLOPs (forward x3 for forward + backward) per second at the steady rate
            "train_tflops_per_s": (3 * fpi * steady_images / steady_time / 1e12) if steady_time > 0 else None,
            "params_hash": phash, "ranks_in_sync": in_sync,
            "checkpoint": str(last_path), "ema_checkpoint": str(ckpt_dir / ckpt_mod.EMA),
        }
        if info.is_main:
            metrics_path = write_json(params.metrics_dir / "train.json", summary)
            run.set_tags({"checkpoint": str(last_path), "params_hash": phash,
                          "resumed_from_step": resumed_from if resumed_from is not None else "none"})
            run.log_metrics({k: summary[k] for k in ("img_per_s", "wall_time_s", "train_time_s")
                             if summary[k] is not None}, step=step)
            run.log_artifact(metrics_path)
            log.info("done: %d steps, final loss %s, %.1f img/s, wall %.1f s -> %s", step,
                     f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a",
                     summary["img_per_s"] or float("nan"), wall, last_path)
        barrier(info)
    return TrainResult(model=model, ema=ema, summary=summary)


def _open_tracking(params: Params, info: DistInfo, out_dir: Path):
    import contextlib

    if not info.is_main:
        return contextlib.nullcontext(_NullRun())
    from mtdiff.tracking import stage_run

    return stage_run(params, "train", out_dir)


def run(params: Params) -> dict[str, Any]:
    """DVC stage entry point: train (or resume) and return the summary written to train.json."""
    return train(params).summary


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
