"""Numerics: which autocast dtype a device runs (``train.precision``), TF32, the fp16 loss scaler.

Training and sampling read the same choice (:func:`autocast_dtype`), so a run samples in the
precision it trained in. Timesteps, schedules, coefficients, the loss and the EMA stay fp32.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from mtdiff.utils import get_logger

log = get_logger(__name__)


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


def device_name(device: torch.device) -> str:
    """What a speed figure ran on: the GPU's name, else the CPU's model and its bf16 unit (the
    machines here vary between AVX2-only, avx512_bf16 and AMX; their img/s are not comparable)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info()['model']} ({cpu_bf16_units() or 'no bf16 units'})"


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
