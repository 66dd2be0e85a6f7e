"""Training: the M5 training step, its loss/throughput meter, and the helpers around it (DDP setup,
optimizer, LR schedule, EMA, mixed precision, resumable batches).

:class:`TrainStep` is the one definition of a training step (targets -> M5 loss -> backward ->
clip -> AdamW -> LR schedule -> EMA); the train stage and ``mtdiff bench train`` both call it.

Choices (documented here, used by ``mtdiff.stages.train``):
- LR: linear warmup over ``train.warmup_steps`` then **constant** (as DiT and ADM train). A
  cosine decay would depend on ``train.steps``, which is deliberately outside the params hash so
  that raising it extends a finished run by resuming; a constant tail keeps that exact.
- AdamW, betas (0.9, 0.999), weight decay only on matrices (not norms, biases, embeddings' 1-d
  params); ``fused=True`` on CUDA, ``foreach`` elsewhere.
- EMA: fp32 shadow of the full ``state_dict``; decay ``min(ema_decay, (1+n)/(10+n))`` after n
  updates (the usual warmup, so a short run's EMA is not dominated by the random init).
- ``train.batch_size`` is the **global** batch; each of W ranks takes ``batch_size / W``.
"""
from __future__ import annotations

import contextlib
import functools
import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from mtdiff.config import Params, TasksConfig
from mtdiff.data import keep_rows, random_patch_mask
from mtdiff.io import atomic_path
from mtdiff.utils import get_logger, pick_device

log = get_logger(__name__)


# -- distributed -------------------------------------------------------------------------------

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


# -- numerics ---------------------------------------------------------------------------------

def configure_backends(device: torch.device, tf32: bool) -> None:
    """TF32 matmuls/convs on Ampere+ when asked (no effect on CPU)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix / dot-product units


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """The CPU's model name and flags from /proc/cpuinfo (Linux; elsewhere unknown, no flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"model": "unknown", "flags": frozenset()}
    fields = dict((k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines if ":" in line))
    return {"model": fields.get("model name", "unknown"), "flags": frozenset(fields.get("flags", "").split())}


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix unit (``amx_bf16``, else ``avx512_bf16``), or None (AVX2-only CPUs, where
    bf16 autocast is slower than fp32; non-Linux hosts)."""
    return next((f for f in CPU_BF16_FLAGS if f in cpu_info()["flags"]), None)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32).

    ``auto``: bf16 on CUDA; on CPU bf16 where it has bf16 units (:func:`cpu_bf16_units`), else fp32.
    ``bf16`` / ``fp16``: autocast on CUDA, fp32 on CPU (the default run's numerics, until the CPU's
    bf16 is shown to keep its quality). Timesteps, schedules, coefficients, loss and EMA stay fp32.
    """
    if precision == "fp32":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if precision == "auto" and cpu_bf16_units() else None
    if precision in ("auto", "bf16") and not torch.cuda.is_bf16_supported():
        log.warning("train.precision %s: bf16 unsupported on this GPU; using fp16 with a GradScaler", precision)
        return torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Enabled only for fp16 on CUDA (bf16 has fp32's range and needs no loss scaling; CPU fp16
    autocast, which only the benchmark can ask for, runs unscaled)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)


# -- optimizer / schedule ---------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices/conv kernels; never norms, biases or 1-d params."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith("embedding.weight") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU; on CPU 5x faster than foreach: 30 vs 167 ms for
    DiT-S/2's 32M weights), the multi-tensor (foreach) one on other devices."""
    kwargs: dict[str, Any] = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8, **kwargs)


class WarmupConstant:
    """LR multiplier: linear from 1/(warmup+1) to 1 over ``warmup`` steps, then 1 (picklable, stateless)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / (self.warmup_steps + 1))


def build_scheduler(opt: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, WarmupConstant(warmup_steps))


# -- EMA --------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a module's weights, kept in fp32 (on the module's device)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
            for k, v in model.state_dict().items()}
        self._param_names = [n for n, _ in model.named_parameters()]

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        shadows = [self.shadow[n] for n in self._param_names]
        currents = [params[n].detach().float() for n in self._param_names]
        # shadow += (1 - d) * (param - shadow), one multi-tensor kernel
        torch._foreach_lerp_(shadows, currents, 1.0 - d)
        for k, v in model.state_dict().items():  # buffers follow the model (none are learned)
            if k not in params:
                self.shadow[k].copy_(v)

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """Start the average afresh from ``model``'s weights (its warm-up decay included)."""
        for k, v in model.state_dict().items():
            self.shadow[k].copy_(v)
        self.num_updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])

    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict({k: v for k, v in self.shadow.items()})


# -- data order -------------------------------------------------------------------------------

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


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    if global_batch % info.world_size:
        raise ValueError(f"train.batch_size {global_batch} must be divisible by the number of "
                         f"processes ({info.world_size})")
    return global_batch // info.world_size


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors of a (nested) batch to ``device``; non-blocking from pinned memory."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def stack_losses(losses: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Per-task losses as one fp32 vector in ``names`` order (for one all-reduce and one sync)."""
    return torch.stack([losses[n].detach().float().reshape(()) for n in names])


# -- the training step ------------------------------------------------------------------------

class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the per-task losses."""


def make_targets(batch: Mapping[str, torch.Tensor], params: Params,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(z0, targets)`` for :meth:`MTDiffusion.training_losses` from a collated batch on the device.

    The masked task's input is ``z0 * mask`` with a fresh random patch mask per image
    (``tasks.masked.mask_ratio`` of the ``model.patch_size`` patches hidden), drawn from the
    noise generator so a resumed run draws the same masks.
    """
    z0 = batch["z0"]
    targets: dict[str, torch.Tensor] = {}
    for name in params.tasks.enabled:
        if name == "masked":
            mask = random_patch_mask(z0.shape[0], z0.shape[1:], params.tasks.masked.mask_ratio,
                                     params.model.patch_size, generator=generator, device=z0.device)
            drop = params.tasks.masked.dropout
            if drop > 0:  # absent: every patch hidden (drawn only then, so the stream is unchanged at 0)
                mask = mask * keep_rows(z0.shape[0], drop, generator, mask.device).to(mask.dtype)[:, None, None, None]
            targets["masked"] = z0 * mask.to(z0.dtype)
        else:
            if name not in batch:
                raise KeyError(f"tasks.{name} is enabled but the training batch has no '{name}' "
                               f"(batch keys: {sorted(batch)}); re-run the data stages")
            targets[name] = batch[name]
    if params.model.class_conditional:  # the class-conditional baseline's label (not an M2 task input)
        targets["class_label"] = batch["label"]
    return z0, targets


class LossModule(nn.Module):
    """``forward(z0, targets) -> training_losses(...)`` so DDP sees the whole step (encoders E_i
    of M2 run inside ``aggregate``, which DDP must also cover) as one forward."""

    def __init__(self, model: nn.Module, diffusion: Any, generator: torch.Generator):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.generator = generator

    def forward(self, z0: torch.Tensor, targets: dict[str, torch.Tensor],
                tasks: TasksConfig) -> dict[str, torch.Tensor]:
        return self.diffusion.training_losses(self.model, z0, targets, tasks_cfg=tasks, generator=self.generator)


@dataclass
class StepOutput:
    """What one step returns, still on the device (reading it would sync every step)."""

    losses: dict[str, torch.Tensor]
    grad_norm: torch.Tensor


class TrainStep:
    """One M5 training step on a collated batch, with the optimizer state it updates.

    ``make_targets`` -> ``diffusion.training_losses`` under autocast (in DDP when ``ddp``) ->
    backward (GradScaler for fp16) -> grad-norm clip (``train.grad_clip``) -> AdamW -> LR
    schedule -> EMA update (left out with ``use_ema=False``, for the benchmark only).
    Noise and masks come from ``generator``, so a resumed run replays them.
    """

    def __init__(self, model: nn.Module, diffusion: Any, params: Params, device: torch.device, *,
                 generator: torch.Generator, amp_dtype: torch.dtype | None = None,
                 compile_model: bool = False, ddp: bool = False, use_ema: bool = True):
        tc = params.train
        self.model, self.params, self.device, self.amp_dtype = model, params, device, amp_dtype
        self.generator = generator
        self.ema = EMA(model, tc.ema_decay) if use_ema else None
        self.optimizer = build_optimizer(model, tc.lr, tc.weight_decay, device)
        self.scheduler = build_scheduler(self.optimizer, tc.warmup_steps)
        self.scaler = make_grad_scaler(device, amp_dtype)
        forward_model = torch.compile(model) if compile_model else model
        self.loss_module: nn.Module = LossModule(forward_model, diffusion, generator)
        if ddp:  # a fine-tune leaves task encoders and heads out of the loss: unused parameters
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=params.train.finetune_steps > 0)
        model.train()

    @property
    def steps_done(self) -> int:
        return int(self.scheduler.last_epoch)  # one scheduler step per training step; restored on resume

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> StepOutput:
        done = self.steps_done
        if self.ema is not None and done == self.params.finetune_starts_at():
            self.ema.restart(self.model)  # the fine-tuned model's average holds only fine-tuned weights
        tasks = self.params.tasks_at(done)
        z0, targets = make_targets(batch, self.params, self.generator)
        with autocast(self.device, self.amp_dtype):
            losses = self.loss_module(z0, targets, tasks)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        grad_norm = self._clip_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return StepOutput(losses, grad_norm)

    def _clip_gradients(self) -> torch.Tensor:
        clip = self.params.train.grad_clip
        if clip <= 0:
            return torch.zeros((), device=self.device)
        self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of ``last.pt`` this step owns (model, ema, opt, sched, scaler)."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else {},
                "opt": self.optimizer.state_dict(), "sched": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["opt"])
        self.scheduler.load_state_dict(state["sched"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# -- the meter --------------------------------------------------------------------------------

@dataclass
class Throughput:
    images: int = 0
    seconds: float = 0.0

    def add(self, images: int, seconds: float) -> None:
        self.images += images
        self.seconds += seconds

    @property
    def img_per_s(self) -> Optional[float]:
        return self.images / self.seconds if self.seconds > 0 else None


@dataclass
class Window:
    """Means over one logging window (and over ranks): losses in ``names`` order, grad norm, img/s."""

    losses: dict[str, float]
    grad_norm: float
    images: int
    seconds: float

    @property
    def img_per_s(self) -> float:
        return self.images / self.seconds


class TrainMeter:
    """Per-task loss and grad-norm sums over a logging window, kept on the device (a step never
    syncs), the first non-finite step, and img/s per window, per session and steady (without the
    first window: warm-up, compilation)."""

    def __init__(self, names: Sequence[str], images_per_step: int, info: DistInfo):
        self.names = list(names)
        self.images_per_step = images_per_step
        self.info = info
        device = info.device
        self._loss_sum = torch.zeros(len(self.names), device=device)
        self._grad_norm_sum = torch.zeros((), device=device)
        self._count = 0
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_losses = torch.zeros(len(self.names), device=device)
        self._t0 = time.perf_counter()
        self._excluded_s = 0.0
        self.windows = 0
        self.session = Throughput()
        self.steady = Throughput()

    def add(self, step: int, out: StepOutput) -> None:
        losses = stack_losses(out.losses, self.names)
        newly_bad = ~torch.isfinite(losses).all() & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(newly_bad, torch.full_like(self._first_bad_step, step),
                                           self._first_bad_step)
        self._bad_losses = torch.where(newly_bad, losses, self._bad_losses)
        self._loss_sum += losses
        self._grad_norm_sum += out.grad_norm.detach().float()
        self._count += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (checkpoint writing) out of the current window's time."""
        self._excluded_s += seconds

    def check_finite(self, note: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if any rank saw a NaN/inf loss (one sync); ``note`` ends the message."""
        flag = all_reduce_mean((self._first_bad_step >= 0).float(), self.info)
        if float(flag) <= 0:
            return
        at = int(self._first_bad_step)
        where = f"non-finite loss at step {at}" if at >= 0 else "non-finite loss on another rank"
        values = {n: float(v) for n, v in zip(self.names, self._bad_losses.tolist())}
        raise NonFiniteLossError(f"{where}: per-task losses {values}{note}")

    def flush(self) -> Window:
        """Close the window (reduced over ranks) and start the next."""
        seconds = max(time.perf_counter() - self._t0 - self._excluded_s, 1e-9)
        means = all_reduce_mean(self._loss_sum / self._count, self.info).tolist()
        grad_norm = float(all_reduce_mean(self._grad_norm_sum / self._count, self.info))
        window = Window(dict(zip(self.names, means)), grad_norm, self._count * self.images_per_step, seconds)
        self.windows += 1
        self.session.add(window.images, seconds)
        if self.windows > 1:
            self.steady.add(window.images, seconds)
        self._loss_sum.zero_()
        self._grad_norm_sum.zero_()
        self._count = 0
        self._excluded_s = 0.0
        self._t0 = time.perf_counter()
        return window


# Columns of the per-step training log (metrics/train_log.csv, the `dvc plots` of dvc.yaml): every
# task has a column, empty when the task is off, so the plots' definitions fit every configuration.
TRAIN_LOG_COLUMNS = ("step", "epoch", "loss", "eps", "label", "representation", "masked", "transition",
                     "lr", "grad_norm", "img_per_s")


class TrainLog:
    """The training curve as CSV: one row per logging window (``train.log_every`` steps, the window's
    mean losses), kept in the resumable state dir (``path``) and copied to the DVC plot output
    (``publish_to``), so a resumed run's curve starts at step 1, not at the resume."""

    def __init__(self, path: str | os.PathLike, publish_to: str | os.PathLike):
        self.path, self.publish_to = Path(path), Path(publish_to)

    def start(self, resumed_step: Optional[int]) -> None:
        """Fresh run: an empty log. Resumed run: keep the rows up to ``resumed_step`` (later ones were
        logged after the checkpoint that is resumed, and are redone)."""
        rows = self.rows() if resumed_step is not None else []
        rows = [r for r in rows if r.get("step") and int(r["step"]) <= int(resumed_step or 0)]
        self._write(self.path, rows)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def append(self, step: int, epoch: int, losses: Mapping[str, float], lr: float, grad_norm: float,
               img_per_s: float) -> None:
        row = {"step": step, "epoch": epoch, **{k: f"{v:.6g}" for k, v in losses.items() if k in TRAIN_LOG_COLUMNS},
               "lr": f"{lr:.6g}", "grad_norm": f"{grad_norm:.6g}", "img_per_s": f"{img_per_s:.1f}"}
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRAIN_LOG_COLUMNS, restval="")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def publish(self) -> None:
        """Copy the log to the plot output (atomically; a header-only file when nothing was logged)."""
        self._write(self.publish_to, self.rows())

    @staticmethod
    def _write(path: Path, rows: list[dict[str, Any]]) -> None:
        with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=TRAIN_LOG_COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
