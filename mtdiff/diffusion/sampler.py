"""The MT-Diffusion reverse process (M4) as a sampler of its own.

A :class:`Sampler` is built once (``Sampler.from_params``: the sample stage, ``mtdiff bench`` and
the registered MLflow model build it so, and sample alike) from three kinds of small parts:

- a **step** ``z_t -> z_s`` given the heads' ``z0_hat`` and ``A_hat``: :class:`DDPMStep` (the (M4)
  ancestral step), :class:`DDIMStep` (y-space DDIM) or :class:`DPMSolver2MStep` (y-space
  DPM-Solver++(2M));
- an **input policy** per task the sampler is not given: how the head's prediction enters
  ``A_hat`` (:class:`SoftLabel`, :class:`HardLabel`, :class:`DrawnLabel`, :class:`Absent`,
  :class:`ExpectedMasked`, :class:`PatchMasked`; the rest enter as predicted);
- **guidance**: :class:`ClassifierFreeGuidance` (class-conditional baseline) and
  :class:`TaskGuidance` (its MT analogue), each a second, unconditioned network pass.

The loop (:meth:`Sampler.__call__`) knows none of their names. Key identity (see
``mtdiff.diffusion.process``): with ``y_t = z_t - c_t A`` the (M1) chain is plain DDPM in y, so
every step takes ``c_t A_hat`` out of ``z_t`` and puts ``c_s A_hat`` back.

Noise order: ``z_T``'s noise first (drawn even when ``z_T`` is passed), then one draw per step for
every step kind, so ddim(eta=1, steps=T) reproduces ddpm with the same generator. The chain state
is kept in float64 (the model sees ``dtype``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtdiff.config import TASKS, MaskedTask, Params, TasksConfig
from mtdiff.data import random_patch_mask
from mtdiff.diffusion.process import MTDiffusion, aggregate, randn

STEPS = ("ddpm", "ddim", "dpmpp2m")
STARTS = ("predict", "zero")


# ---------------------------------------------------------------- input policies
@dataclass(frozen=True)
class InputPolicy:
    """How a task input the sampler is not given enters ``A_hat``: ``input(head output)`` at every
    step (the base class: the prediction as is). ``bind`` makes the per-call policy (a mask drawn for
    the chain, say)."""

    draws_at_start: ClassVar[bool] = False

    def bind(self, count: int, shape: tuple[int, ...], tasks: Optional[TasksConfig], device: torch.device,
             generator: Optional[torch.Generator]) -> "InputPolicy":
        return self

    def input(self, pred: Tensor) -> Tensor:
        return pred.float()


@dataclass(frozen=True)
class SoftLabel(InputPolicy):
    """The head's softmax: the expected label code under the head (the method's soft labels)."""

    def input(self, pred: Tensor) -> Tensor:
        return torch.softmax(pred.float(), dim=-1)


@dataclass(frozen=True)
class HardLabel(InputPolicy):
    """The argmax's one-hot: one class's code, as training shows the label."""

    def input(self, pred: Tensor) -> Tensor:
        probs = torch.softmax(pred.float(), dim=-1)
        return F.one_hot(probs.argmax(-1), probs.shape[-1]).float()


@dataclass(frozen=True)
class Absent(InputPolicy):
    """Code 0: the task left out of ``A`` (training's dropout state of that input)."""

    def input(self, pred: Tensor) -> Tensor:
        return torch.zeros_like(pred.float())


@dataclass(frozen=True)
class DrawnLabel(SoftLabel):
    """One class per sample drawn from the head's softmax at ``z_T``, then held as a given label for
    the whole chain (y first, then x | y: ancestral sampling of the joint)."""

    draws_at_start: ClassVar[bool] = True

    @staticmethod
    def draw(logits: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        gen_device = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(logits.device)


def _mask_ratio(tasks: Optional[TasksConfig]) -> float:
    """The masked task's ``mask_ratio`` of the call's tasks (the default without them)."""
    return (tasks.masked if tasks is not None else MaskedTask()).mask_ratio


@dataclass(frozen=True)
class ExpectedMasked(InputPolicy):
    """``(1 - mask_ratio)`` times the head's image: the masked input's mean over training's masks
    (E_i is linear, so this is the analogue of soft labels)."""

    mask_ratio: float = MaskedTask().mask_ratio

    def bind(self, count, shape, tasks, device, generator) -> InputPolicy:
        return ExpectedMasked(_mask_ratio(tasks))

    def input(self, pred: Tensor) -> Tensor:
        return (1.0 - self.mask_ratio) * pred.float()


@dataclass(frozen=True)
class PatchMasked(InputPolicy):
    """The head's image times a patch mask drawn once per sample for its chain (training's form
    ``z0 * mask``), from the call's mask generator."""

    patch: int
    mask: Optional[Tensor] = None

    def bind(self, count, shape, tasks, device, generator) -> InputPolicy:
        mask = random_patch_mask(count, shape, _mask_ratio(tasks), self.patch, generator=generator, device=device)
        return replace(self, mask=mask.to(device, torch.float32))

    def input(self, pred: Tensor) -> Tensor:
        return pred.float() * self.mask


LABEL_POLICIES = {"soft": SoftLabel, "hard": HardLabel, "absent": Absent, "drawn": DrawnLabel}
# the method's policies for a task not given (the others enter as predicted)
DEFAULT_INPUTS: dict[str, InputPolicy] = {"label": SoftLabel(), "masked": ExpectedMasked()}


def masked_policy(mode: str, patch: int) -> InputPolicy:
    """``sample.predicted_masked``'s policy: expected, masked (a patch mask per sample) or absent."""
    return {"expected": ExpectedMasked(), "masked": PatchMasked(patch), "absent": Absent()}[mode]


# ---------------------------------------------------------------- guidance
@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Classifier-free guidance of a class-conditional baseline: the null label is the unconditioned
    pass, ``eps = eps_null + s (eps_cond - eps_null)``. A scale of 1 is plain conditioning."""

    scale: float = 1.0

    def unconditioned(self, chain: "_Chain", z: Tensor, t: Tensor, t_int: int) -> Optional[tuple[Tensor, ...]]:
        if chain.class_labels is None or self.scale == 1.0:
            return None
        null = torch.full_like(chain.class_labels, chain.model.num_classes)
        return z.to(chain.dtype), t, null


@dataclass(frozen=True)
class TaskGuidance:
    """MT task guidance, CFG's analogue: the unconditioned pass has the given label absent, i.e. its
    code ``c_t E(y)`` taken out of ``z_t`` as in training's label dropout (M2); both passes describe
    the same y-space chain. A scale of 1 is plain conditioning."""

    scale: float = 1.0

    def unconditioned(self, chain: "_Chain", z: Tensor, t: Tensor, t_int: int) -> Optional[tuple[Tensor, ...]]:
        if "label" not in chain.given or self.scale == 1.0:
            return None
        code = chain.c(t_int) * aggregate(chain.model, {"label": chain.given["label"]}, z)
        return (z - code).to(chain.dtype), t


# ---------------------------------------------------------------- steps
@dataclass
class DDPMStep:
    """The (M4) ancestral step from t to t - 1 (DDPM's posterior in y shifted by ``c_{t-1} A``)."""

    diffusion: MTDiffusion

    def __call__(self, z: Tensor, z0_hat: Tensor, A: Tensor, t: int, s: int, noise: Tensor) -> Tensor:
        if s != t - 1:  # a respaced step: y-space DDIM with eta = 1 (the ancestral step over a stride)
            return DDIMStep(self.diffusion, 1.0)(z, z0_hat, A, t, s, noise)
        d, tt = self.diffusion, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        mean = (d.coef("posterior_coef_zt", tt, z) * z + d.coef("posterior_coef_z0", tt, z) * z0_hat
                + d.coef("posterior_coef_A", tt, z) * A)  # (M4)
        return mean if t == 1 else mean + (0.5 * d.coef("posterior_log_variance_clipped", tt, z)).exp() * noise


@dataclass
class DDIMStep:
    """DDIM in y-space from t to s < t (s = 0 returns ``z0_hat``), float64 coefficients:
    ``z_s = sqrt(abar_s) z0 + c_s A + sqrt(1 - abar_s - sigma^2) eps + sigma noise``,
    ``sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s)``; with eta = 1 and
    s = t - 1 it is the (M4) step."""

    diffusion: MTDiffusion
    eta: float

    def __call__(self, z_t: Tensor, z0_hat: Tensor, A: Tensor, t: int, s: int, noise: Tensor) -> Tensor:
        sch = self.diffusion.schedule
        ab_t, ab_s = float(sch.abar[t]), float(sch.abar[s])
        c_t, c_s = float(sch.c[t]), float(sch.c[s])
        eps_hat = (z_t - c_t * A - ab_t ** 0.5 * z0_hat) / (1 - ab_t) ** 0.5
        sigma = self.eta * ((1 - ab_s) / (1 - ab_t)) ** 0.5 * max(0.0, 1 - ab_t / ab_s) ** 0.5
        dir_coef = max(0.0, 1 - ab_s - sigma ** 2) ** 0.5
        return ab_s ** 0.5 * z0_hat + c_s * A + dir_coef * eps_hat + sigma * noise


@dataclass
class DPMSolver2MStep:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in y-space, ``y = z - c A``, from t to s < t; one
    per chain (it remembers the previous step).

    With ``lambda = log(sqrt(abar) / sqrt(1 - abar))`` and ``h = lambda_s - lambda_t``:
    ``y_s = (sigma_s / sigma_t) y_t - alpha_s expm1(-h) D``, ``D = (1 + 1/2r) z0_hat - (1/2r) z0_prev``
    with ``r = h_prev / h`` (the first step uses ``D = z0_hat``: DDIM with eta = 0). The last step
    (s = 0) returns ``z0_hat``, and the step into the sequence's last timestep ``final_t`` is first
    order too (diffusers' ``lower_order_final``): on the t-uniform grid its log-SNR gap is several
    times the previous one, and the extrapolation over it measured worse than DDIM on an exact
    Gaussian denoiser (tests).
    """

    diffusion: MTDiffusion
    final_t: int
    prev_z0: Optional[Tensor] = None
    prev_h: Optional[float] = None

    def __call__(self, z_t: Tensor, z0_hat: Tensor, A: Tensor, t: int, s: int, noise: Tensor) -> Tensor:
        if s == 0:
            self.prev_z0 = self.prev_h = None
            return z0_hat
        sch = self.diffusion.schedule
        ab_t, ab_s = float(sch.abar[t]), float(sch.abar[s])
        h = 0.5 * (math.log(ab_s / (1 - ab_s)) - math.log(ab_t / (1 - ab_t)))
        D = z0_hat
        if self.prev_z0 is not None and s != self.final_t:
            half_inv_r = 0.5 * h / self.prev_h
            D = (1 + half_inv_r) * z0_hat - half_inv_r * self.prev_z0
        self.prev_z0, self.prev_h = z0_hat, h
        y_s = ((1 - ab_s) / (1 - ab_t)) ** 0.5 * (z_t - float(sch.c[t]) * A) - ab_s ** 0.5 * math.expm1(-h) * D
        return y_s + float(sch.c[s]) * A


def timestep_sequence(T: int, steps: Optional[int] = None) -> list[int]:
    """Descending, evenly spaced timesteps ``T, ..., 1`` (both ends included), ``steps`` of them."""
    steps = T if steps is None else int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must lie in [1, {T}], got {steps}")
    if steps == 1:
        return [T]
    # spacing (T-1)/(steps-1) >= 1, so rounding keeps the values distinct
    return [int((1 + i * (T - 1) / (steps - 1)) + 0.5) for i in range(steps)][::-1]


def _forward_in_chunks(model: Any, args: tuple[Tensor, ...], max_batch: Optional[int]) -> dict[str, Tensor]:
    """``model(*args)`` in calls of at most ``max_batch`` images (None: one call), outputs concatenated."""
    n = args[0].shape[0]
    if max_batch is None or n <= max_batch:
        return dict(model(*args))
    parts = [model(*(a[i:i + max_batch] for a in args)) for i in range(0, n, max_batch)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


@dataclass
class _Chain:
    """One call's state: the network with its guidance, the given inputs and the bound policies."""

    model: Any
    diffusion: MTDiffusion
    enabled: list[str]
    given: dict[str, Tensor]
    class_labels: Optional[Tensor]
    policies: dict[str, InputPolicy]
    guidance: tuple[Any, ...]
    forward_batch: Optional[int]
    device: torch.device
    dtype: torch.dtype
    # float64 chain state: keeps ddpm and ddim(eta=1) equal to rounding and long chains exact
    work: torch.dtype = field(init=False)

    def __post_init__(self):
        self.work = torch.float32 if self.device.type == "mps" else torch.float64

    def c(self, t_int: int) -> float:
        return float(self.diffusion.schedule.c[t_int])

    def network(self, z: Tensor, t_int: int) -> dict[str, Tensor]:
        """The heads at ``z_t``; with guidance the conditioned and the unconditioned pass run in one
        batch and ``eps = eps_uncond + s (eps_cond - eps_uncond)``, the other heads from the first."""
        t = torch.full((z.shape[0],), t_int, dtype=torch.long, device=z.device)
        cond = (z.to(self.dtype), t) if self.class_labels is None else (z.to(self.dtype), t, self.class_labels)
        for guide in self.guidance:
            uncond = guide.unconditioned(self, z, t, t_int)
            if uncond is not None:
                both = _forward_in_chunks(self.model, tuple(torch.cat(p) for p in zip(cond, uncond)),
                                          self.forward_batch)
                B = z.shape[0]
                out = {k: v[:B] for k, v in both.items()}
                out["eps"] = both["eps"][B:] + guide.scale * (both["eps"][:B] - both["eps"][B:])
                return out
        return _forward_in_chunks(self.model, cond, self.forward_batch)

    def denoise(self, z: Tensor, t_int: int) -> tuple[dict[str, Tensor], Tensor]:
        """One network call at ``t``: the heads' outputs and ``A_hat`` (given inputs, else the policies)."""
        out = self.network(z, t_int)
        missing = [n for n in ("eps", *self.enabled) if n not in self.given and n not in out]
        if missing:
            raise KeyError(f"sample: model output lacks head(s) {missing} (has {sorted(out)})")
        inputs = {n: self.given[n] if n in self.given else self.policies[n].input(out[n]) for n in self.enabled}
        return out, aggregate(self.model, inputs, z)

    def prior(self, noise_T: Tensor) -> Tensor:
        """``z_T = noise + c_T A`` from the given inputs only (the prior of (M3))."""
        given = {k: self.given[k] for k in self.enabled if k in self.given}
        return noise_T + self.c(self.diffusion.T) * aggregate(self.model, given, noise_T)

    def result(self, z0: Tensor, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``z0`` plus ``label`` (the given label, or the argmax of the last step's logits),
        ``label_probs`` and the last step's head outputs of the other enabled tasks."""
        result: dict[str, Tensor] = {"z0": z0}
        if self.class_labels is not None:
            result["label"] = self.class_labels
        if "label" in self.enabled:
            if "label" in out:
                result["label_probs"] = torch.softmax(out["label"].float(), dim=-1)
            lbl = self.given.get("label")
            if lbl is None:
                result["label"] = result["label_probs"].argmax(-1)
            else:
                result["label"] = lbl.argmax(-1) if lbl.is_floating_point() else lbl.long()
        for n in ("representation", "masked", "transition"):
            if n in self.enabled and n in out:
                result[n] = out[n]
        return result


@dataclass(frozen=True)
class Sampler:
    """Generate ``z0`` (and every enabled task's prediction) with the MT-Diffusion reverse process.

    ``step``: ``ddpm`` ((M4) ancestral steps; with ``steps < T`` the respaced DDPM, i.e. y-space
    DDIM with eta = 1), ``ddim`` (with ``eta``) or ``dpmpp2m`` (deterministic). ``inputs``: the
    policy per task not given (default :data:`DEFAULT_INPUTS`). ``start``: ``predict`` adds the
    heads' predictions at ``z = noise + c_T A_given`` to ``z_T`` (one extra pass, so ``z_T - c_T
    A_hat`` is centred as the y-space prior requires); ``zero`` uses the given inputs only.
    ``clip`` (default: on in pixel mode) clips ``z0_hat`` to [-1, 1]. ``forward_batch``: the most
    images per network call (guidance's doubled batch is split; None: one call per step).
    """

    diffusion: MTDiffusion
    step: str = "ddpm"
    steps: Optional[int] = None
    eta: float = 1.0
    inputs: Mapping[str, InputPolicy] = field(default_factory=dict)
    guidance: tuple[Any, ...] = ()
    start: str = "predict"
    clip: Optional[bool] = None
    forward_batch: Optional[int] = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"sampler must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @classmethod
    def from_params(cls, params: Params, diffusion: Optional[MTDiffusion] = None, **override: Any) -> "Sampler":
        """The sampler ``sample.*`` describes: the sample stage, the bench and the MLflow model use it."""
        sc = params.sample
        inputs = {"label": LABEL_POLICIES[sc.predicted_label](),
                  "masked": masked_policy(sc.predicted_masked, params.model.patch_size)}
        kwargs = dict(step=sc.sampler, steps=sc.steps, eta=sc.eta, inputs=inputs, forward_batch=sc.forward_batch,
                      guidance=(ClassifierFreeGuidance(sc.cfg_scale), TaskGuidance(sc.task_guidance)))
        return cls(diffusion or MTDiffusion(params.diffusion), **{**kwargs, **override})

    @torch.no_grad()
    def __call__(self, model: Any, shape: Iterable[int], given: Optional[Mapping[str, Tensor]] = None, *,
                 tasks: Optional[TasksConfig] = None, generator: Optional[torch.Generator] = None,
                 mask_generator: Optional[torch.Generator] = None, z_T: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Samples of ``shape`` given the task inputs ``given`` (``{}`` unconditional, ``{"label": y}``,
        ``{"masked": z0 * mask}``, ``{"transition": src}``; for a class-conditional baseline
        ``given["label"]`` is its class label). ``tasks``: those aggregated (default: the model's
        heads). ``generator`` draws the noise, ``mask_generator`` what the input policies draw.
        ``z_T`` defaults to ``c_T A_hat + noise`` (the prior of (M3) is ~ N(c_T A, I)).

        Returns ``z0`` (``dtype``), ``label`` and ``label_probs`` when the label is a task or a class
        label was given, and the last step's head outputs of the other enabled tasks."""
        shape = tuple(int(s) for s in shape)
        chain = self._chain(model, shape, given, tasks, mask_generator)
        seq = timestep_sequence(self.diffusion.T, self.steps)
        step = self._step(seq[-1])
        clip = (self.diffusion.cfg.mode == "pixel") if self.clip is None else bool(self.clip)
        z = self._initial_state(chain, shape, z_T, generator)
        out: dict[str, Tensor] = {}
        for i, t in enumerate(seq):
            s = seq[i + 1] if i + 1 < len(seq) else 0
            out, A_hat = chain.denoise(z, t)
            z0_hat = self._z0_from_head(z, out["eps"].to(chain.work), A_hat, t)
            if clip:
                z0_hat = z0_hat.clamp(-1, 1)
            noise = randn(shape, generator, chain.device, self.dtype).to(chain.work)
            z = step(z, z0_hat, A_hat, t, s, noise)
        return chain.result(z.to(self.dtype), out)

    def _chain(self, model: Any, shape: tuple[int, ...], given: Optional[Mapping[str, Tensor]],
               tasks: Optional[TasksConfig], mask_generator: Optional[torch.Generator]) -> _Chain:
        """Validate the call and bind the input policies of the enabled tasks not given."""
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        given = {k: v.to(device) for k, v in (given or {}).items()}
        class_labels = None
        if getattr(model, "class_conditional", False) and "label" in given and "label" not in model.task_names:
            class_labels = given.pop("label").long()
        names = list(getattr(model, "task_names", []))
        enabled = list(tasks.enabled) if tasks is not None else [n for n in TASKS if n in names]
        unknown = [k for k in given if k not in enabled]
        if unknown:
            raise ValueError(f"given modalities {unknown} are not enabled tasks (enabled: {enabled})")
        for k, v in [*given.items(), *([("label", class_labels)] if class_labels is not None else [])]:
            if v.shape[0] != shape[0]:
                raise ValueError(f"given[{k!r}] has batch size {v.shape[0]}, expected {shape[0]}")
        policies = {n: self.inputs.get(n, DEFAULT_INPUTS.get(n, InputPolicy())).bind(
            shape[0], shape[1:], tasks, device, mask_generator) for n in enabled if n not in given}
        return _Chain(model, self.diffusion, enabled, given, class_labels, policies, self.guidance,
                      self.forward_batch, device, self.dtype)

    def _step(self, final_t: int):
        if self.step == "dpmpp2m":
            return DPMSolver2MStep(self.diffusion, final_t)
        if self.step == "ddpm":
            return DDPMStep(self.diffusion)
        return DDIMStep(self.diffusion, self.eta)

    def _initial_state(self, chain: _Chain, shape: tuple[int, ...], z_T: Optional[Tensor],
                       generator: Optional[torch.Generator]) -> Tensor:
        noise_T = randn(shape, generator, chain.device, self.dtype).to(chain.work)
        if z_T is not None:
            if tuple(z_T.shape) != shape:
                raise ValueError(f"z_T has shape {tuple(z_T.shape)}, expected {shape}")
            z = z_T.to(chain.device, chain.work)
        else:
            z = chain.prior(noise_T)
        drawn = [n for n, policy in chain.policies.items() if policy.draws_at_start]
        for n in drawn:  # the draw reads z_T (the caller's or the prior's); the input is then given
            chain.given[n] = chain.policies[n].draw(chain.network(z, self.diffusion.T)[n], generator)
        if drawn and z_T is None:
            z = chain.prior(noise_T)
        if z_T is None and self.start == "predict" and any(n not in chain.given for n in chain.enabled):
            _, A0 = chain.denoise(z, self.diffusion.T)
            z = noise_T + chain.c(self.diffusion.T) * A0
        return z

    def _z0_from_head(self, z_t: Tensor, head: Tensor, A: Tensor, t: int) -> Tensor:
        """``z0_hat`` from the noise head at a python-int ``t`` (no tensor gather, no host sync)."""
        if self.diffusion.prediction == "z0":
            return head
        ab, c = float(self.diffusion.schedule.abar[t]), float(self.diffusion.schedule.c[t])
        return (z_t - c * A - (1 - ab) ** 0.5 * head) / ab ** 0.5

