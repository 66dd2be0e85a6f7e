"""The one definition of an M5 training step: targets -> loss -> backward -> clip -> AdamW -> LR ->
EMA. The train loop and ``mtdiff bench train`` both call :class:`TrainStep`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mtdiff.config import Params, TasksConfig
from mtdiff.data import keep_rows, random_patch_mask
from mtdiff.precision import autocast, make_grad_scaler
from mtdiff.train.optim import EMA, build_optimizer, build_scheduler
from mtdiff.train.schedule import finetune_starts_at, tasks_at


def stack_losses(losses: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Per-task losses as one fp32 vector in ``names`` order (for one all-reduce and one sync)."""
    return torch.stack([losses[n].detach().float().reshape(()) for n in names])


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
        if self.ema is not None and done == finetune_starts_at(self.params):
            self.ema.restart(self.model)  # the fine-tuned model's average holds only fine-tuned weights
        tasks = tasks_at(self.params, done)
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
