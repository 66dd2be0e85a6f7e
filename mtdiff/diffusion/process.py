"""MT-Diffusion's forward process (M1, M3), posterior (M4), loss (M5) and samplers.

Key identity used throughout (and tested): with ``y_t = z_t - c_t A`` the (M1) chain becomes
``y_t = sqrt(alpha_t) y_{t-1} + sqrt(1 - alpha_t) noise`` with ``y_0 = z_0``, i.e. plain DDPM in
y. Hence (M4) is DDPM's posterior in y shifted by ``c_{t-1} A``, and the strided sampler is
DDIM in y-space:

    z_s = sqrt(abar_s) z0_hat + c_s A_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma noise,
    sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s),

which with ``eta = 1`` and ``s = t - 1`` is exactly the (M4) ancestral step.

Task inputs (``targets`` in training, ``given`` in sampling) are the ``x_i`` of (M2), keyed by
task name: ``label`` int64 (B,) (or probabilities (B, K)), ``representation`` (B, D),
``masked`` the masked image ``z0 * mask`` (B, C, H, W), ``transition`` the paired image that
conditions the generation (B, C, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtdiff.config import TASKS as TASK_ORDER
from mtdiff.config import DiffusionConfig, MaskedTask, TasksConfig
from mtdiff.data import keep_rows
from mtdiff.diffusion.schedules import Schedule, build_schedule

_IMAGE_TASKS = ("masked", "transition")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
# how a label the sampler is not given enters A_hat; "drawn": one class drawn from the head's softmax
# at z_T and then held as given for the whole chain (y first, then x | y: ancestral sampling of the joint)
PREDICTED_LABEL = ("soft", "hard", "absent", "drawn")


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


@dataclass
class _SampleContext:
    """What every reverse step of one ``sample`` call needs (built and validated once)."""

    enabled: list[str]
    given: dict[str, Tensor]
    class_labels: Optional[Tensor]
    sampler: str
    eta: float
    mask_ratio: float
    device: torch.device
    dtype: torch.dtype
    work: torch.dtype
    cfg_scale: float
    task_guidance: float
    forward_batch: Optional[int]
    predicted_label: str = "soft"  # how a label not given enters A_hat (PREDICTED_LABEL)
    predicted_mask: Optional[Tensor] = None  # a masked input not given: the head's image times this mask
    # DPM-Solver++(2M)'s memory: the previous step's z0_hat and log-SNR gap h
    prev_z0: Optional[Tensor] = None
    prev_h: Optional[float] = None
    final_t: int = 1  # the sequence's last timestep: DPM-Solver++ steps into it at first order


def _forward_in_chunks(model: Any, args: tuple[Tensor, ...], max_batch: Optional[int]) -> dict[str, Tensor]:
    """``model(*args)`` in calls of at most ``max_batch`` images (None: one call), outputs concatenated."""
    n = args[0].shape[0]
    if max_batch is None or n <= max_batch:
        return dict(model(*args))
    parts = [model(*(a[i:i + max_batch] for a in args)) for i in range(0, n, max_batch)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def _randn(shape: Iterable[int], generator: Optional[torch.Generator], device: torch.device,
           dtype: torch.dtype) -> Tensor:
    """Gaussian noise drawn on the generator's device (so CPU generators drive CUDA runs too)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def _timesteps(z: Tensor, t_int: int) -> Tensor:
    """The batch's timestep tensor (one ``t`` for every sample of ``z``)."""
    return torch.full((z.shape[0],), t_int, dtype=torch.long, device=z.device)


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

    def _coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
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
            noise = _randn(z_prev.shape, generator, z_prev.device, z_prev.dtype)
        sa = self._coef("alphas", t, z_prev).sqrt()
        return sa * (z_prev + self._coef("w", t, z_prev) * A) + self._coef("betas", t, z_prev).sqrt() * noise

    def q_mean_variance(self, z0: Tensor, A: Optional[Tensor], t: Tensor | int) -> tuple[Tensor, Tensor]:
        """(M3) moments: mean ``sqrt(abar_t) z0 + c_t A`` and variance ``(1 - abar_t)`` (broadcastable)."""
        t = self._check_t(t, z0.shape[0], z0.device)
        mean = self._coef("sqrt_abar", t, z0) * z0 + self._coef("c", t, z0) * self._A(A, z0)
        return mean, 1 - self._coef("abar", t, z0)

    def q_sample(self, z0: Tensor, A: Optional[Tensor], t: Tensor | int, noise: Optional[Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """(M3) closed form: ``z_t = sqrt(abar_t) z0 + c_t A + sqrt(1 - abar_t) noise``."""
        t = self._check_t(t, z0.shape[0], z0.device)
        if noise is None:
            noise = _randn(z0.shape, generator, z0.device, z0.dtype)
        return self._q_sample(z0, A, t, noise)

    def _q_sample(self, z0: Tensor, A: Optional[Tensor], t: Tensor, noise: Tensor) -> Tensor:
        """(M3) for an already validated ``t`` (no host sync, so training steps stay asynchronous)."""
        return (self._coef("sqrt_abar", t, z0) * z0 + self._coef("c", t, z0) * self._A(A, z0)
                + self._coef("sqrt_one_minus_abar", t, z0) * noise)

    def posterior(self, z_t: Tensor, z0: Tensor, A: Optional[Tensor], t: Tensor | int
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """(M4) ``q(z_{t-1} | z_t, z0, X)``: (mean, variance, log-variance clipped as in DDPM).

        mean = sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t) (z_t - sqrt(alpha_t) w_t A)
               + (1-alpha_t)/(1-abar_t) (sqrt(abar_{t-1}) z0 + c_{t-1} A).
        """
        t = self._check_t(t, z_t.shape[0], z_t.device)
        A = self._A(A, z_t)
        mean = (self._coef("posterior_coef_zt", t, z_t) * z_t + self._coef("posterior_coef_z0", t, z_t) * z0
                + self._coef("posterior_coef_A", t, z_t) * A)
        return (mean, self._coef("posterior_variance", t, z_t),
                self._coef("posterior_log_variance_clipped", t, z_t))

    # ------------------------------------------------------------------ parameterisations
    def predict_z0(self, z_t: Tensor, model_out: Tensor | Mapping[str, Tensor], A: Optional[Tensor],
                   t: Tensor | int) -> Tensor:
        """``z0_hat`` from the noise head: eps mode ``(z_t - c_t A - sqrt(1-abar_t) eps)/sqrt(abar_t)``."""
        out = model_out["eps"] if isinstance(model_out, Mapping) else model_out
        if self.prediction == "z0":
            return out
        t = self._check_t(t, z_t.shape[0], z_t.device)
        y_t = z_t - self._coef("c", t, z_t) * self._A(A, z_t)
        return (y_t - self._coef("sqrt_one_minus_abar", t, z_t) * out) / self._coef("sqrt_abar", t, z_t)

    def predict_eps(self, z_t: Tensor, z0: Tensor, A: Optional[Tensor], t: Tensor | int) -> Tensor:
        """The noise consistent with ``z0`` under (M3): ``(z_t - c_t A - sqrt(abar_t) z0)/sqrt(1-abar_t)``."""
        t = self._check_t(t, z_t.shape[0], z_t.device)
        y_t = z_t - self._coef("c", t, z_t) * self._A(A, z_t)
        return (y_t - self._coef("sqrt_abar", t, z_t) * z0) / self._coef("sqrt_one_minus_abar", t, z_t)

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
            noise = _randn(z0.shape, generator, device, z0.dtype)
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
        return {"loss": total, **{k: v.detach() for k, v in terms.items()}}

    def _primary_loss(self, pred: Tensor, target: Tensor, t: Tensor) -> Tensor:
        """The eps (or z0) MSE of (M5), each sample weighted by ``eps_loss_weight[t]`` (Min-SNR-gamma);
        unweighted it is ``F.mse_loss`` itself, so runs without weighting stay bit-exact."""
        if self.cfg.loss_weighting == "none":
            return F.mse_loss(pred.float(), target.float())
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
        return (self._coef("eps_loss_weight", t, per_sample) * per_sample).mean()

    # ------------------------------------------------------------------ sampling
    def timestep_sequence(self, steps: Optional[int] = None) -> list[int]:
        """Descending, evenly spaced timesteps ``T, ..., 1`` (both ends included), ``steps`` of them."""
        steps = self.T if steps is None else int(steps)
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampling steps must lie in [1, {self.T}], got {steps}")
        if steps == 1:
            return [self.T]
        # spacing (T-1)/(steps-1) >= 1, so rounding keeps the values distinct
        seq = [int((1 + i * (self.T - 1) / (steps - 1)) + 0.5) for i in range(steps)]
        return seq[::-1]

    @staticmethod
    def _enabled(model: Any, tasks_cfg: Optional[TasksConfig]) -> list[str]:
        if tasks_cfg is not None:
            return list(tasks_cfg.enabled)
        names = list(getattr(model, "task_names", []))
        return [n for n in TASK_ORDER if n in names]

    def _aggregate(self, model: Any, inputs: Mapping[str, Tensor], like: Tensor) -> Tensor:
        if not inputs:
            return torch.zeros_like(like)
        return model.aggregate(dict(inputs)).to(like.dtype)

    @staticmethod
    def _prediction_input(name: str, pred: Tensor, ctx: "_SampleContext") -> Tensor:
        """The task input ``x_i`` given the head's prediction (what ``E_i`` gets when not given)."""
        if name == "label":
            probs = torch.softmax(pred.float(), dim=-1)  # soft labels: expected embedding under the softmax
            if ctx.predicted_label == "hard":  # one class's code, as training shows the label
                return F.one_hot(probs.argmax(-1), probs.shape[-1]).float()
            return torch.zeros_like(probs) if ctx.predicted_label == "absent" else probs  # code 0: dropout
        if name == "masked":
            # The head predicts the full image; the task input during training was z0 * mask with
            # a fraction (1 - mask_ratio) kept, so its expectation over masks is (1 - r) z0_hat
            # (E_i is linear: identity / 1x1 conv), the analogue of soft labels; with a mask drawn
            # for the chain, the input has training's form z0_hat * mask instead.
            if ctx.predicted_mask is not None:
                return pred.float() * ctx.predicted_mask
            return (1.0 - ctx.mask_ratio) * pred.float()
        return pred.float()

    def _denoise(self, model: Any, z: Tensor, t_int: int, ctx: "_SampleContext") -> tuple[dict[str, Tensor], Tensor]:
        """One network call at ``t``: the heads' outputs and ``A_hat`` (given inputs, else predictions)."""
        out = self._network(model, z, _timesteps(z, t_int), t_int, ctx)
        missing = [n for n in ("eps", *ctx.enabled) if n not in ctx.given and n not in out]
        if missing:
            raise KeyError(f"sample: model output lacks head(s) {missing} (has {sorted(out)})")
        predicted = {n: self._prediction_input(n, out[n], ctx) for n in ctx.enabled if n in out}
        inputs = {n: ctx.given.get(n, predicted.get(n)) for n in ctx.enabled}
        return out, self._aggregate(model, inputs, z)

    def _network(self, model: Any, z: Tensor, t: Tensor, t_int: int, ctx: "_SampleContext") -> dict[str, Tensor]:
        """The heads at ``z_t``; with guidance the conditioned and the unconditioned pass run in one
        batch and ``eps = eps_uncond + s (eps_cond - eps_uncond)``, the other heads from the first.

        Classifier-free guidance (class-conditional baseline): the null label is the unconditioned
        pass. Task guidance (MT-Diffusion, its analogue): the given label absent, i.e. its code
        ``c_t E(y)`` taken out of ``z_t`` as in training's label dropout (M2); both passes describe
        the same y-space chain. A scale of 1 is plain conditioning (one pass).
        """
        zin = z.to(ctx.dtype)
        if ctx.class_labels is not None and ctx.cfg_scale != 1.0:
            null = torch.full_like(ctx.class_labels, model.num_classes)
            args, scale = (torch.cat([zin, zin]), torch.cat([t, t]), torch.cat([ctx.class_labels, null])), ctx.cfg_scale
        elif "label" in ctx.given and ctx.task_guidance != 1.0:
            code = float(self.schedule.c[t_int]) * self._aggregate(model, {"label": ctx.given["label"]}, z)
            args, scale = (torch.cat([zin, (z - code).to(ctx.dtype)]), torch.cat([t, t])), ctx.task_guidance
        else:
            return _forward_in_chunks(model, (zin, t) if ctx.class_labels is None else (zin, t, ctx.class_labels),
                                      ctx.forward_batch)
        both = _forward_in_chunks(model, args, ctx.forward_batch)
        B = z.shape[0]
        out = {k: v[:B] for k, v in both.items()}
        out["eps"] = both["eps"][B:] + scale * (both["eps"][:B] - both["eps"][B:])
        return out

    def p_step(self, z: Tensor, z0_hat: Tensor, A_hat: Tensor, t_int: int, s_int: int, ctx: "_SampleContext",
               noise: Tensor) -> Tensor:
        """One reverse step ``z_t -> z_s`` given the heads' ``z0_hat`` and ``A_hat``.

        ``s = t - 1`` with the ddpm sampler is the (M4) ancestral step; ``dpmpp2m`` the y-space
        DPM-Solver++(2M) step; otherwise y-space DDIM (with eta = 1 and s = t - 1 the (M4) step).
        """
        if ctx.sampler == "dpmpp2m":
            return self._dpmpp2m_step(z, z0_hat, A_hat, t_int, s_int, ctx)
        if ctx.sampler == "ddpm" and s_int == t_int - 1:
            t = _timesteps(z, t_int)
            mean = (self._coef("posterior_coef_zt", t, z) * z + self._coef("posterior_coef_z0", t, z) * z0_hat
                    + self._coef("posterior_coef_A", t, z) * A_hat)  # (M4)
            if t_int == 1:
                return mean
            return mean + (0.5 * self._coef("posterior_log_variance_clipped", t, z)).exp() * noise
        return self._ddim_step(z, z0_hat, A_hat, t_int, s_int, ctx.eta, noise)

    @torch.no_grad()
    def sample(self, model: Any, shape: Iterable[int], given: Optional[Mapping[str, Tensor]] = None,
               steps: Optional[int] = None, sampler: str = "ddpm", eta: float = 1.0,
               generator: Optional[torch.Generator] = None, progress: bool = False,
               tasks_cfg: Optional[TasksConfig] = None, clip_denoised: Optional[bool] = None,
               z_T: Optional[Tensor] = None, start: str = "predict", device: Optional[torch.device | str] = None,
               dtype: torch.dtype = torch.float32, cfg_scale: float = 1.0,
               task_guidance: float = 1.0, forward_batch: Optional[int] = None,
               predicted_label: str = "soft", predicted_mask: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Generate ``z0`` (and every enabled task's prediction) with the MT-Diffusion reverse process.

        ``given``: the conditioning task inputs (``{}`` unconditional, ``{"label": y}``,
        ``{"masked": z0 * mask}``, ``{"transition": src}``); a given modality enters ``A_hat``
        as is, every other enabled one through its head's prediction at the current step
        (labels as softmax probabilities, "soft labels"; ``predicted_label`` "hard": the argmax's
        one-hot, "absent": code 0, training's dropped label, "drawn": a class drawn once from the
        head's softmax at the start (an extra network call and one generator draw before the
        ``start`` pass), then held as a given label; the masked image as ``(1 - mask_ratio)``
        times the head's image, or times ``predicted_mask`` (B,1,H,W) when passed). For a class-conditional baseline model
        ``given["label"]`` is its class label instead (with ``cfg_scale``).

        ``z_T`` defaults to ``c_T A_hat + noise`` (the prior of (M3) is ~ N(c_T A, I)). ``start``
        picks ``A_hat`` there: ``"zero"`` uses the given modalities only; ``"predict"`` (default)
        adds the heads' predictions at ``z = noise + c_T A_given`` (one extra forward pass), so that
        ``z_T - c_T A_hat`` is centred as the y-space DDPM prior requires.

        ``sampler="ddpm"``: (M4) ancestral steps (when ``steps < T``, the respaced DDPM, which is
        y-space DDIM with eta = 1); ``"ddim"``: the y-space DDIM update with ``eta``; ``"dpmpp2m"``:
        y-space DPM-Solver++(2M), deterministic (``eta`` unused).
        ``clip_denoised`` (default: on in pixel mode) clips ``z0_hat`` to [-1, 1]. Noise order:
        ``z_T``'s noise first (drawn even when ``z_T`` is passed), then one draw per step for both
        samplers, so ddim(eta=1, steps=T) reproduces ddpm with the same generator. The chain
        state is kept in float64 (the model sees ``dtype``). ``forward_batch``: the most images per
        network call (guidance's doubled batch is split; None: one call per step).

        Returns ``z0`` (``dtype``) plus ``label`` (the given label, or argmax of the last step's
        logits) and ``label_probs``, and the last step's ``representation`` / ``masked`` /
        ``transition`` head outputs for the enabled tasks.
        """
        shape = tuple(int(s) for s in shape)
        ctx = self._sample_context(model, shape, given, sampler, eta, start, tasks_cfg, device, dtype,
                                   cfg_scale, task_guidance, forward_batch, predicted_label, predicted_mask)
        clip = (self.cfg.mode == "pixel") if clip_denoised is None else bool(clip_denoised)
        seq = self.timestep_sequence(steps)
        if sampler == "ddpm" and len(seq) < self.T:
            ctx.eta = 1.0  # respaced ancestral DDPM == y-space DDIM with eta = 1
        ctx.final_t = seq[-1]
        z = self._initial_state(model, shape, z_T, start, ctx, generator)
        out: dict[str, Tensor] = {}
        it = seq
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(seq, desc=f"{sampler} sampling", leave=False)
        for i, t_int in enumerate(it):
            s_int = seq[i + 1] if i + 1 < len(seq) else 0
            out, A_hat = self._denoise(model, z, t_int, ctx)
            z0_hat = self._z0_from_head(z, out["eps"].to(ctx.work), A_hat, t_int)
            if clip:
                z0_hat = z0_hat.clamp(-1, 1)
            noise = _randn(shape, generator, ctx.device, dtype).to(ctx.work)
            z = self.p_step(z, z0_hat, A_hat, t_int, s_int, ctx, noise)
        return self._sample_result(z.to(dtype), out, ctx)

    def _sample_context(self, model, shape, given, sampler, eta, start, tasks_cfg, device, dtype,
                        cfg_scale, task_guidance, forward_batch=None, predicted_label="soft",
                        predicted_mask=None) -> "_SampleContext":
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if predicted_label not in PREDICTED_LABEL:
            raise ValueError(f"predicted_label must be one of {', '.join(PREDICTED_LABEL)}, got {predicted_label!r}")
        if start not in ("predict", "zero"):
            raise ValueError(f"start must be 'predict' or 'zero', got {start!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if device is None:
            p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = p.device if p is not None else torch.device("cpu")
        device = torch.device(device)
        given = {k: v.to(device) for k, v in (given or {}).items()}
        class_labels = None
        if getattr(model, "class_conditional", False) and "label" in given and "label" not in model.task_names:
            class_labels = given.pop("label").long()
        enabled = self._enabled(model, tasks_cfg)
        unknown = [k for k in given if k not in enabled]
        if unknown:
            raise ValueError(f"given modalities {unknown} are not enabled tasks (enabled: {enabled})")
        checked = [*given.items(), *([("label", class_labels)] if class_labels is not None else []),
                   *([("predicted_mask", predicted_mask)] if predicted_mask is not None else [])]
        for k, v in checked:
            if v.shape[0] != shape[0]:
                raise ValueError(f"given[{k!r}] has batch size {v.shape[0]}, expected {shape[0]}")
        mask_ratio = (tasks_cfg.masked if tasks_cfg is not None else MaskedTask()).mask_ratio
        # float64 chain state: keeps ddpm and ddim(eta=1) equal to rounding and long chains exact
        work = torch.float32 if device.type == "mps" else torch.float64
        if predicted_mask is not None:
            predicted_mask = predicted_mask.to(device, torch.float32)
        return _SampleContext(enabled, given, class_labels, sampler, float(eta), mask_ratio, device, dtype, work,
                              float(cfg_scale), float(task_guidance), forward_batch, predicted_label, predicted_mask)

    def _initial_state(self, model, shape, z_T, start, ctx: "_SampleContext", generator) -> Tensor:
        noise_T = _randn(shape, generator, ctx.device, ctx.dtype).to(ctx.work)
        draw = ctx.predicted_label == "drawn" and "label" in ctx.enabled and "label" not in ctx.given
        if z_T is not None:
            if tuple(z_T.shape) != shape:
                raise ValueError(f"z_T has shape {tuple(z_T.shape)}, expected {shape}")
            z = z_T.to(ctx.device, ctx.work)
        else:
            z = self._prior_draw(model, noise_T, ctx)
        if draw:  # the draw reads z_T (the caller's or the prior's); the label then enters A as given
            ctx.given["label"] = self._draw_label(model, z, ctx, generator)
            if z_T is None:
                z = self._prior_draw(model, noise_T, ctx)
        if z_T is None and start == "predict" and any(n not in ctx.given for n in ctx.enabled):
            _, A0 = self._denoise(model, z, self.T, ctx)
            z = noise_T + float(self.schedule.c[self.T]) * A0
        return z

    def _prior_draw(self, model, noise_T: Tensor, ctx: "_SampleContext") -> Tensor:
        """``z_T = noise + c_T A`` from the given modalities only (the prior of (M3))."""
        given = {k: ctx.given[k] for k in ctx.enabled if k in ctx.given}
        return noise_T + float(self.schedule.c[self.T]) * self._aggregate(model, given, noise_T)

    def _draw_label(self, model, z_T: Tensor, ctx: "_SampleContext", generator) -> Tensor:
        """One class per sample drawn from the label head's softmax at ``z_T`` (the model's p(y) there),
        on the generator's device as the noise is; the chain then treats it as a given label."""
        out = self._network(model, z_T, _timesteps(z_T, self.T), self.T, ctx)
        probs = torch.softmax(out["label"].float(), dim=-1)
        gen_device = generator.device if generator is not None else probs.device
        drawn = torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1)
        return drawn.to(ctx.device)

    def _z0_from_head(self, z_t: Tensor, head: Tensor, A: Tensor, t_int: int) -> Tensor:
        """``z0_hat`` from the noise head at a python-int ``t`` (no tensor gather, no host sync)."""
        if self.prediction == "z0":
            return head
        ab, c = float(self.schedule.abar[t_int]), float(self.schedule.c[t_int])
        return (z_t - c * A - (1 - ab) ** 0.5 * head) / ab ** 0.5

    @staticmethod
    def _sample_result(z0: Tensor, out: Mapping[str, Tensor], ctx: "_SampleContext") -> dict[str, Tensor]:
        result: dict[str, Tensor] = {"z0": z0}
        if ctx.class_labels is not None:
            result["label"] = ctx.class_labels
        if "label" in ctx.enabled:
            if "label" in out:
                result["label_probs"] = torch.softmax(out["label"].float(), dim=-1)
            lbl = ctx.given.get("label")
            if lbl is None:
                result["label"] = result["label_probs"].argmax(-1)
            else:
                result["label"] = lbl.argmax(-1) if lbl.is_floating_point() else lbl.long()
        for n in ("representation", *_IMAGE_TASKS):
            if n in ctx.enabled and n in out:
                result[n] = out[n]
        return result

    def _ddim_step(self, z_t: Tensor, z0_hat: Tensor, A: Tensor, t: int, s: int, eta: float,
                   noise: Tensor) -> Tensor:
        """DDIM in y-space from t to s < t (s = 0 returns ``z0_hat``), in float64 coefficients."""
        sch = self.schedule
        ab_t, ab_s = float(sch.abar[t]), float(sch.abar[s])
        c_t, c_s = float(sch.c[t]), float(sch.c[s])
        eps_hat = (z_t - c_t * A - ab_t ** 0.5 * z0_hat) / (1 - ab_t) ** 0.5
        sigma = eta * ((1 - ab_s) / (1 - ab_t)) ** 0.5 * max(0.0, 1 - ab_t / ab_s) ** 0.5
        dir_coef = max(0.0, 1 - ab_s - sigma ** 2) ** 0.5
        return ab_s ** 0.5 * z0_hat + c_s * A + dir_coef * eps_hat + sigma * noise

    def _dpmpp2m_step(self, z_t: Tensor, z0_hat: Tensor, A: Tensor, t: int, s: int,
                      ctx: "_SampleContext") -> Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in y-space, ``y = z - c A``, from t to s < t.

        With ``lambda = log(sqrt(abar) / sqrt(1 - abar))`` and ``h = lambda_s - lambda_t``:
        ``y_s = (sigma_s / sigma_t) y_t - alpha_s expm1(-h) D``, ``D = (1 + 1/2r) z0_hat - (1/2r) z0_prev``
        with ``r = h_prev / h`` (the first step uses ``D = z0_hat``: DDIM with eta = 0). The last step
        (s = 0) returns ``z0_hat``, as DDIM does, and the step into the sequence's last timestep is
        first order too (diffusers' ``lower_order_final``): on the t-uniform grid its log-SNR gap is
        several times the previous one, and the extrapolation over it measured worse than DDIM on an
        exact Gaussian denoiser (tests). The aggregated term enters exactly as in DDIM:
        ``c_t A`` is taken out of ``z_t`` and ``c_s A`` put back.
        """
        if s == 0:
            ctx.prev_z0 = ctx.prev_h = None
            return z0_hat
        sch = self.schedule
        ab_t, ab_s = float(sch.abar[t]), float(sch.abar[s])
        h = 0.5 * (math.log(ab_s / (1 - ab_s)) - math.log(ab_t / (1 - ab_t)))
        D = z0_hat
        if ctx.prev_z0 is not None and s != ctx.final_t:
            half_inv_r = 0.5 * h / ctx.prev_h
            D = (1 + half_inv_r) * z0_hat - half_inv_r * ctx.prev_z0
        ctx.prev_z0, ctx.prev_h = z0_hat, h
        y_s = ((1 - ab_s) / (1 - ab_t)) ** 0.5 * (z_t - float(sch.c[t]) * A) - ab_s ** 0.5 * math.expm1(-h) * D
        return y_s + float(sch.c[s]) * A

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
        A = self._aggregate(model, inputs, z0)
        probs = None
        for t_int in t_list:
            t = self._check_t(t_int, B, z0.device)
            p = torch.softmax(model.head("label", self.q_sample(z0, A, t, generator=generator), t).float(), dim=-1)
            probs = p if probs is None else probs + p
        return torch.log(probs / len(t_list) + 1e-12)
