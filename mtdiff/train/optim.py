"""AdamW, the LR schedule and the EMA of the weights.

- LR: linear warmup over ``train.warmup_steps`` then **constant** (as DiT and ADM train). A
  cosine decay would depend on ``train.steps``, which is deliberately outside the params hash so
  that raising it extends a finished run by resuming; a constant tail keeps that exact.
- AdamW, betas (0.9, 0.999), weight decay only on matrices (not norms, biases, embeddings' 1-d
  params).
- EMA: fp32 shadow of the full ``state_dict``; decay ``min(ema_decay, (1+n)/(10+n))`` after n
  updates (the usual warmup, so a short run's EMA is not dominated by the random init).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


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
