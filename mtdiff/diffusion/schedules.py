"""Noise schedules and MT-Diffusion's aggregation weights, precomputed in float64.

Every table is indexed by the 1-based timestep ``t`` of docs/method.md: entry 0 holds the ``t = 0``
value (``abar_0 = 1``, ``c_0 = 0``, ``w_0 = 0``, ``beta_0 = 0``) so that ``table[t]`` and
``table[t - 1]`` both gather without off-by-one shifts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtdiff.config import DiffusionConfig

_F64 = torch.float64
COSINE_S = 0.008        # Nichol & Dhariwal's offset that keeps beta_1 from vanishing
COSINE_MAX_BETA = 0.999  # their clip, avoids the singularity at t = T


def make_betas(kind: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``beta_1..beta_T`` (shape (T,), float64): ``linear`` (DDPM) or ``cosine`` (Nichol & Dhariwal)."""
    if T < 1:
        raise ValueError(f"timesteps must be >= 1, got {T}")
    if kind == "linear":
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(f"linear betas need 0 < beta_start, beta_end < 1, got {beta_start}, {beta_end}")
        return torch.linspace(beta_start, beta_end, T, dtype=_F64)
    if kind == "cosine":
        steps = torch.arange(T + 1, dtype=_F64) / T
        f = torch.cos((steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {kind!r}")


def make_w(kind: str, T: int, w_max: float, alphas: torch.Tensor | None = None) -> torch.Tensor:
    """Aggregation weights ``w_1..w_T`` of (M1), shape (T,), float64.

    ``linear``: 0 at t=1 rising to ``w_max`` at T; ``constant``: ``w_max``;
    ``cosine``: ``w_max * (1 - cos(pi (t-1)/(T-1))) / 2`` (slow start, slow finish);
    ``sigma``: the weights whose (M3) coefficient is ``c_t = w_max sqrt(1 - abar_t)``, so the task
    signal stays a fixed fraction of the noise at every t (needs ``alphas``, the (T,) table):
    from (M4)'s recursion, ``w_t = c_t / sqrt(alpha_t) - c_{t-1}`` (> 0 since 1/alpha_t > 1).
    """
    if w_max < 0:
        raise ValueError(f"w_max must be >= 0, got {w_max}")
    if kind == "sigma":
        abar = torch.cat([torch.ones(1, dtype=_F64), torch.cumprod(alphas.to(_F64), 0)])
        c = w_max * torch.sqrt(1 - abar)
        return c[1:] / torch.sqrt(alphas.to(_F64)) - c[:-1]
    t = torch.arange(1, T + 1, dtype=_F64)
    frac = (t - 1) / (T - 1) if T > 1 else torch.ones_like(t)
    if kind == "linear":
        return w_max * frac
    if kind == "constant":
        return torch.full_like(t, float(w_max))
    if kind == "cosine":
        return w_max * (1 - torch.cos(math.pi * frac)) / 2
    raise ValueError(f"w_schedule must be 'linear', 'constant', 'cosine' or 'sigma', got {kind!r}")


def eps_loss_weight(kind: str, abar: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-timestep weight of the primary (eps or z0) MSE, shape of ``abar`` (the (T+1,) table).

    ``none``: 1 (Ho et al.'s simple loss). ``min_snr``: Hang et al.'s Min-SNR-gamma, which caps the
    weight of the low-noise steps: ``min(SNR_t, gamma) / SNR_t`` for eps prediction, ``min(SNR_t, gamma)``
    for z0 prediction, ``SNR_t = abar_t / (1 - abar_t)`` (t = 0, unused, gets 1).
    """
    if kind == "none":
        return torch.ones_like(abar)
    if kind != "min_snr":
        raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {kind!r}")
    snr = abar[1:] / (1 - abar[1:])
    capped = snr.clamp(max=gamma)
    weight = capped / snr if prediction == "eps" else capped
    return torch.cat([torch.ones(1, dtype=abar.dtype), weight])


def c_recursion(alphas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``c_0..c_T`` from ``c_t = sqrt(alpha_t) (c_{t-1} + w_t)``, ``c_0 = 0`` (M4's recursion).

    ``alphas`` and ``w`` are the (T,) tables for t = 1..T; returns shape (T+1,).
    """
    c = torch.zeros(len(alphas) + 1, dtype=_F64)
    for i in range(len(alphas)):
        c[i + 1] = math.sqrt(float(alphas[i])) * (c[i] + w[i])
    return c


def c_closed_form(abar: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``c_t = sum_{s<=t} w_s sqrt(abar_t / abar_{s-1})`` of (M3), shape (T+1,) with ``c_0 = 0``.

    ``abar`` is the (T+1,) table with ``abar_0 = 1``; ``w`` the (T,) weights. O(T^2): for checks.
    """
    T = len(w)
    t = torch.arange(1, T + 1).view(-1, 1)
    s = torch.arange(1, T + 1).view(1, -1)
    ratio = torch.sqrt(abar[t] / abar[s - 1])          # (T, T): sqrt(abar_t / abar_{s-1})
    terms = torch.where(s <= t, w.view(1, -1) * ratio, torch.zeros((), dtype=_F64))
    return torch.cat([torch.zeros(1, dtype=_F64), terms.sum(dim=1)])


@dataclass(frozen=True)
class Schedule:
    """All float64 tables, each of shape (T+1,) and indexed by the 1-based timestep t."""

    T: int
    betas: torch.Tensor
    alphas: torch.Tensor
    abar: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor
    sqrt_abar: torch.Tensor
    sqrt_one_minus_abar: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_coef_z0: torch.Tensor
    posterior_coef_zt: torch.Tensor
    posterior_coef_A: torch.Tensor
    eps_loss_weight: torch.Tensor

    def tables(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}


def build_schedule(cfg: DiffusionConfig) -> Schedule:
    """Precompute every coefficient of (M1), (M3) and (M4) for ``cfg``."""
    T = int(cfg.timesteps)
    betas_1 = make_betas(cfg.beta_schedule, T, cfg.beta_start, cfg.beta_end)
    alphas_1 = 1 - betas_1
    w_1 = make_w(cfg.w_schedule, T, cfg.w_max, alphas_1)
    if not bool(((betas_1 > 0) & (betas_1 < 1)).all()):
        raise ValueError("diffusion betas must lie in (0, 1)")

    def ext(first: float, rest: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.tensor([first], dtype=_F64), rest])

    betas = ext(0.0, betas_1)
    alphas = ext(1.0, alphas_1)
    abar = ext(1.0, torch.cumprod(alphas_1, 0))
    w = ext(0.0, w_1)
    c = c_recursion(alphas_1, w_1)

    # (M4): beta~_t = (1 - abar_{t-1})(1 - alpha_t)/(1 - abar_t); 0 at t = 1, where DDPM clips
    # its log to the t = 2 value (the t = 1 step adds no noise anyway).
    prev = torch.arange(T + 1).clamp(min=1) - 1  # index t-1 (t=0 maps to 0, unused)
    one_minus = (1 - abar).clamp(min=1e-300)
    post_var = (1 - abar[prev]) * betas / one_minus
    post_var[0] = 0.0
    log_var = torch.log(torch.cat([post_var[2:3] if T > 1 else betas[1:2], post_var[2:]]))
    log_var = torch.cat([log_var[:1], log_var])  # t = 0 and t = 1 both get the clipped value
    coef_z0 = torch.sqrt(abar[prev]) * betas / one_minus
    coef_zt = torch.sqrt(alphas) * (1 - abar[prev]) / one_minus
    # (M4) literally: mu = coef_zt (z_t - sqrt(alpha_t) w_t A) + (1-alpha_t)/(1-abar_t) (sqrt(abar_{t-1}) z0 + c_{t-1} A)
    coef_A = betas / one_minus * c[prev] - coef_zt * torch.sqrt(alphas) * w
    for tbl in (coef_z0, coef_zt, coef_A):
        tbl[0] = 0.0
    return Schedule(
        T=T, betas=betas, alphas=alphas, abar=abar, w=w, c=c,
        sqrt_abar=torch.sqrt(abar), sqrt_one_minus_abar=torch.sqrt(1 - abar),
        posterior_variance=post_var, posterior_log_variance_clipped=log_var,
        posterior_coef_z0=coef_z0, posterior_coef_zt=coef_zt, posterior_coef_A=coef_A,
        eps_loss_weight=eps_loss_weight(cfg.loss_weighting, abar, cfg.min_snr_gamma, cfg.prediction),
    )
