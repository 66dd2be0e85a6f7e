"""MT-Diffusion's forward process (M1, M3), posterior (M4), loss (M5) and the label-head classifier.

Key identity used throughout (and tested): with ``y_t = z_t - c_t A`` the (M1) chain becomes
``y_t = sqrt(alpha_t) y_{t-1} + sqrt(1 - alpha_t) noise`` with ``y_0 = z_0``, i.e. plain DDPM in
y. Hence (M4) is DDPM's posterior in y shifted by ``c_{t-1} A``, and the strided sampler is
DDIM in y-space:

    z_s = sqrt(abar_s) z0_hat + c_s A_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma noise,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s),

which with ``eta = 1`` and ``s = t - 1`` is exactly the (M4) ancestral step (the samplers live in
``mtdiff.diffusion.sampler``).

Task inputs (``targets`` in training, ``given`` in sampling) are the ``x_i`` of (M2), keyed by
task name: ``label`` int64 (B,) (or probabilities (B, K)), ``representation`` (B, D),
``masked`` the masked image ``z0 * mask`` (B, C, H, W), ``transition`` the paired image that
conditions the generation (B, C, H, W).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtdiff.config import TASKS as TASK_ORDER
from mtdiff.config import DiffusionConfig, TasksConfig
from mtdiff.data import keep_rows
from mtdiff.diffusion.schedules import Schedule, build_schedule

def _cross_entropy(pred: Tensor, label: Tensor, reduction: str) -> Tensor:
    """Cross-entropy against class indices or soft targets (probabilities), ``mean`` or per sample."""
    if label.is_floating_point():
        per_sample = -(label.float() * F.log_softmax(pred, dim=-1)).sum(-1)
        return per_sample.mean() if reduction == "mean" else per_sample
    return F.cross_entropy(pred, label.long(), reduction=reduction)


def _label_loss(pred: Tensor, label: Tensor, z0: Tensor, cfg: TasksConfig, t: Tensor) -> Tensor:
    """Cross-entropy; with ``tasks.label.max_t`` only the samples at t <= max_t count (the head is
    read as a classifier at small t), as a masked mean so no step waits on the host."""
    if cfg.label.max_t is None:  # the plain mean: bit for bit the loss before max_t existed
        return _cross_entropy(pred, label, "mean")
    keep = (t <= cfg.label.max_t).float()
    return (_cross_entropy(pred, label, "none") * keep).sum() / keep.sum().clamp(min=1.0)


def _representation_loss(pred: Tensor, rep: Tensor, z0: Tensor, cfg: TasksConfig, t: Tensor) -> Tensor:
    if cfg.representation.loss == "cosine":
        return (1 - F.cosine_similarity(pred, rep.float(), dim=-1)).mean()
    return F.mse_loss(pred, rep.float())


# (M5) l_i per task: (head output, task input x_i, z0, tasks config, t) -> scalar. The masked head
# restores what the mask hid, so its target is the full image z0, not the masked input.
TASK_LOSSES: dict[str, Callable[[Tensor, Optional[Tensor], Tensor, TasksConfig, Tensor], Tensor]] = {
    "label": _label_loss,
    "representation": _representation_loss,
    "masked": lambda pred, masked, z0, cfg, t: F.mse_loss(pred, z0.float()),
    "transition": lambda pred, paired, z0, cfg, t: F.mse_loss(pred, paired.float()),
}


def _drop_labels(labels: Tensor, num_classes: int, p: float, generator: Optional[torch.Generator]) -> Tensor:
    """Labels as probabilities, all-zero (code 0: the label absent from A, M2) with probability p."""
    probs = labels.float() if labels.is_floating_point() else F.one_hot(labels.long(), num_classes).float()
    return probs * keep_rows(labels.shape[0], p, generator, labels.device)[:, None]


def aggregate(model: Any, inputs: Mapping[str, Tensor], like: Tensor) -> Tensor:
    """``A = sum_i E_i(x_i)`` (M2) of the task inputs ``inputs`` in ``like``'s dtype (zeros when none)."""
    if not inputs:
        return torch.zeros_like(like)
    return model.aggregate(dict(inputs)).to(like.dtype)


def randn(shape: Iterable[int], generator: Optional[torch.Generator], device: torch.device,
           dtype: torch.dtype) -> Tensor:
    """Gaussian noise drawn on the generator's device (so CPU generators drive CUDA runs too)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class MTDiffusion:
    """The MT-Diffusion process for one :class:`DiffusionConfig`; t is 1-based int64 in [1, T]."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.schedule: Schedule = build_schedule(cfg)
        self.T: int = self.schedule.T
        self.prediction: str = cfg.prediction
        self._tables: dict[tuple[str, str], Tensor] = {}

    # ------------------------------------------------------------------ coefficient gathering
    def _table(self, name: str, device: torch.device) -> Tensor:
        """A float64 table cached per device (float32 where the device lacks float64, e.g. MPS)."""
        key = (name, str(device))
        tbl = self._tables.get(key)
        if tbl is None:
            src = getattr(self.schedule, name)
            tbl = src.to(device, torch.float32 if device.type == "mps" else torch.float64)
            self._tables[key] = tbl
        return tbl

    def coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` in float64, cast to ``like``'s dtype, shaped (B, 1, ..., 1) to broadcast."""
        vals = self._table(name, like.device)[t.to(like.device)]
        return vals.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: Tensor | int, batch: int, device: torch.device) -> Tensor:
        """Normalise ``t`` to an int64 (B,) tensor and check it lies in [1, T]."""
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be an int or an int64 tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor (1-based timesteps), got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 1 or hi > self.T:
            raise ValueError(f"t must lie in [1, {self.T}] (1-based timesteps), got values in [{lo}, {hi}]")
        return t.long().to(device)

    @staticmethod
    def _A(A: Optional[Tensor], like: Tensor) -> Tensor:
        if A is None:
            return torch.zeros_like(like)
        if A.shape != like.shape:
            raise ValueError(f"aggregated task input A has shape {tuple(A.shape)}, expected {tuple(like.shape)}")
        return A.to(like.dtype)

    # ------------------------------------------------------------------ forward process
    def q_step(self, z_prev: Tensor, A: Optional[Tensor], t: Tensor | int, noise: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """One (M1) step: ``z_t = sqrt(alpha_t) (z_{t-1} + w_t A) + sqrt(1 - alpha_t) noise``."""
        t = self._check_t(t, z_prev.shape[0], z_prev.device)
        A = self._A(A, z_prev)
        if noise is None:
            noise = randn(z_prev.shape, generator, z_prev.device, z_prev.dtype)
        sa = self.coef("alphas", t, z_prev).sqrt()
        return sa * (z_prev + self.coef("w", t, z_prev) * A) + self.coef("betas", t, z_prev).sqrt() * noise

    def q_mean_variance(self, z0: Tensor, A: Optional[Tensor], t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(M3) moments: mean ``sqrt(abar_t) z0 + c_t A`` and variance ``(1 - abar_t)`` (broadcastable)."""
        t = self._check_t(t, z0.shape[0], z0.device)
        mean = self.coef("sqrt_abar", t, z0) * z0 + self.coef("c", t, z0) * self._A(A, z0)
        return mean, 1 - self.coef("abar", t, z0)

    def q_sample(self, z0: Tensor, A: Optional[Tensor], t: Tensor | int, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """(M3) closed form: ``z_t = sqrt(abar_t) z0 + c_t A + sqrt(1 - abar_t) noise``."""
        t = self._check_t(t, z0.shape[0], z0.device)
        if noise is None:
            noise = randn(z0.shape, generator, z0.device, z0.dtype)
        return self._q_sample(z0, A, t, noise)

    def _q_sample(self, z0: Tensor, A: Optional[Tensor], t: Tensor, noise: Tensor) -> Tensor:
        """(M3) for an already validated ``t`` (no host sync, so training steps stay asynchronous)."""
        return (self.coef("sqrt_abar", t, z0) * z0 + self.coef("c", t, z0) * self._A(A, z0)
                + self.coef("sqrt_one_minus_abar", t, z0) * noise)

    def posterior(self, z_t: Tensor, z0: Tensor, A: Optional[Tensor], t: Tensor | int
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """(M4) ``q(z_{t-1} | z_t, z0, X)``: (mean, variance, log-variance clipped as in DDPM).

        mean = sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) (z_t - sqrt(alpha_t) w_t A)
               + (1-alpha_t)/(1-abar_t) (sqrt(abar_{t-1}) z0 + c_{t-1} A).
        """
        t = self._check_t(t, z_t.shape[0], z_t.device)
        A = self._A(A, z_t)
        mean = (self.coef("posterior_coef_zt", t, z_t) * z_t + self.coef("posterior_coef_z0", t, z_t) * z0
                + self.coef("posterior_coef_A", t, z_t) * A)
        return (mean, self.coef("posterior_variance", t, z_t),
                self.coef("posterior_log_variance_clipped", t, z_t))

    # ------------------------------------------------------------------ parameterisations
    def predict_z0(self, z_t: Tensor, model_out: Tensor | Mapping[str, Tensor], A: Optional[Tensor],
                   t: Tensor | int) -> Tensor:
        """``z0_hat`` from the noise head: eps mode ``(z_t - c_t A - sqrt(1-abar_t) eps)/sqrt(abar_t)``."""
        out = model_out["eps"] if isinstance(model_out, Mapping) else model_out
        if self.prediction == "z0":
            return out
        t = self._check_t(t, z_t.shape[0], z_t.device)
        y_t = z_t - self.coef("c", t, z_t) * self._A(A, z_t)
        return (y_t - self.coef("sqrt_one_minus_abar", t, z_t) * out) / self.coef("sqrt_abar", t, z_t)

    def predict_eps(self, z_t: Tensor, z0: Tensor, A: Optional[Tensor], t: Tensor | int) -> Tensor:
        """The noise consistent with ``z0`` under (M3): ``(z_t - c_t A - sqrt(abar_t) z0)/sqrt(1-abar_t)``."""
        t = self._check_t(t, z_t.shape[0], z_t.device)
        y_t = z_t - self.coef("c", t, z_t) * self._A(A, z_t)
        return (y_t - self.coef("sqrt_abar", t, z_t) * z0) / self.coef("sqrt_one_minus_abar", t, z_t)

    # ------------------------------------------------------------------ training (M5)
    def training_losses(self, model: Any, z0: Tensor, targets: Mapping[str, Tensor], tasks_cfg: TasksConfig,
                        t: Tensor | int | None = None, generator: Optional[torch.Generator] = None,
                        noise: Optional[Tensor] = None) -> dict[str, Tensor]:
        """(M5) ``||eps - eps_theta(z_t, t)||^2 + sum_i lambda_i l_i(D_i(h_t), x_i)`` on one batch.

        ``targets`` holds the task inputs ``x_i`` of every enabled task (others are ignored):
        ``A = model.aggregate(x)``, ``z_t = q_sample(z0, A, t)``, ``out = model(z_t, t)``.
        Per-task losses come from :data:`TASK_LOSSES`. A class-conditional baseline model
        (``model.class_conditional``) also gets ``targets["class_label"]``, replaced by the null
        label with probability ``model.class_dropout`` (classifier-free guidance's training).
        Returns ``loss`` (scalar with grad) plus each unweighted term, detached.
        """
        B, device = z0.shape[0], z0.device
        enabled = list(tasks_cfg.enabled)
        missing = [n for n in enabled if n not in targets]
        if missing:
            raise KeyError(f"training_losses: targets lack the enabled task input(s) {missing}; "
                           f"got keys {sorted(targets)}")
        gen_device = generator.device if generator is not None else device
        if t is None:  # uniform over 1..T; generated here, so no range check (and no host sync)
            t = torch.randint(1, self.T + 1, (B,), generator=generator, device=gen_device).to(device)
        else:
            t = self._check_t(t, B, device)
        if noise is None:
            noise = randn(z0.shape, generator, device, z0.dtype)
        elif noise.shape != z0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(z0.shape)}")
        inputs = {n: targets[n] for n in enabled}
        if "label" in inputs and tasks_cfg.label.dropout > 0:
            inputs["label"] = _drop_labels(inputs["label"], model.num_classes, tasks_cfg.label.dropout, generator)
        A = model.aggregate(inputs).to(z0.dtype) if inputs else torch.zeros_like(z0)
        z_t = self._q_sample(z0, A, t, noise)
        if getattr(model, "class_conditional", False):
            y = targets["class_label"].long()
            drop = torch.rand(B, generator=generator, device=gen_device).to(device) < model.class_dropout
            out = model(z_t, t, torch.where(drop, torch.full_like(y, model.num_classes), y))
        else:
            out = model(z_t, t)
        for n in ["eps", *enabled]:
            if n not in out:
                raise KeyError(f"training_losses: model output lacks head {n!r} (has {sorted(out)})")
        # losses in float32 so bf16/fp16 autocast outputs do not lose the small MSE values
        primary_target = noise if self.prediction == "eps" else z0
        terms = {"eps": self._primary_loss(out["eps"], primary_target, t)}
        for n in enabled:
            terms[n] = TASK_LOSSES[n](out[n].float(), targets.get(n), z0, tasks_cfg, t)
        with torch.no_grad():  # a task left out (a fine-tune): its head's loss, reported only
            for n in TASK_ORDER:
                if n not in terms and n in targets and n in out:
                    terms[n] = TASK_LOSSES[n](out[n].float(), targets[n], z0, tasks_cfg, t)
        # a zero weight leaves the head out of the graph (a fine-tune: no gradient, no Adam drift)
        total = terms["eps"] + sum(w * terms[n] for n in enabled if (w := float(getattr(tasks_cfg, n).weight)))
        if getattr(model, "classifier", None) is not None and "label" in targets:
            # the clean-image classifier: its own pass over z0 (t = 0, no task code), as evaluated;
            # trained with the label task, reported only where a fine-tune leaves the label out
            trained = "label" in enabled
            with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
                terms["classifier"] = _cross_entropy(model.classifier_logits(z0).float(), targets["label"], "mean")
            if trained:
                total = total + float(tasks_cfg.label.classifier_weight) * terms["classifier"]
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def _primary_loss(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """The eps (or z0) MSE of (M5), each sample weighted by ``eps_loss_weight[t]`` (Min-SNR-gamma);
        unweighted it is ``F.mse_loss`` itself, so runs without weighting stay bit-exact."""
        if self.cfg.loss_weighting == "none":
            return F.mse_loss(pred.float(), target.float())
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
        return (self.coef("eps_loss_weight", t, per_sample) * per_sample).mean()

    # ------------------------------------------------------------------ classifier
    @torch.no_grad()
    def classify(self, model: Any, z0: Tensor, t_list: Iterable[int], given: Optional[Mapping[str, Tensor]] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Label-head classifier: log of the mean softmax over ``t in t_list`` of ``model(q_sample(z0, A, t), t)``.

        ``A`` aggregates the ``given`` modalities except the label (0 when none), so the label is
        inferred from the image alone. Returns (B, K) log-probabilities (usable as logits).
        """
        t_list = [int(t) for t in t_list]
        if not t_list:
            raise ValueError("classify: t_list is empty")
        B = z0.shape[0]
        inputs = {k: v.to(z0.device) for k, v in (given or {}).items() if k != "label"}
        A = aggregate(model, inputs, z0)
        probs = None
        for t_int in t_list:
            t = self._check_t(t_int, B, z0.device)
            p = torch.softmax(model.head("label", self.q_sample(z0, A, t, generator=generator), t).float(), dim=-1)
            probs = p if probs is None else probs + p
        return torch.log(probs / len(t_list) + 1e-12)
