"""``mtdiff bench train``: img/s, achieved FLOP/s and MFU of the train stage's own step.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch

from mtdiff.config import Params
from mtdiff.host_memory import retain_freed_memory
from mtdiff.models import TRAIN_FLOPS_PER_FORWARD, count_params, flops_per_image
from mtdiff.precision import device_name
from mtdiff.train.step import TrainStep
from mtdiff.utils import derive_seed
from mtdiff.bench.probes import (MatmulProbe, build, counted_forward_flops, fmt_si, minor_page_faults,
                                 peak_memory, profile_steps, setup, sync, synthetic_batch)

QUICK_STEPS, QUICK_WARMUP = 5, 2
FULL_STEPS, FULL_WARMUP = 20, 3
# --quick on CPU caps the batch so one step stays around a second or two (DiT-B/2 at batch 256
# would take minutes per step on a laptop); the default profile's batch stays as is.
QUICK_CPU_STEP_FLOPS = 150e9


# -- bench train -----------------------------------------------------------------------------------
def quick_batch_size(params: Params, fwd_flops: float) -> int:
    """The largest power of two up to train.batch_size whose step costs about QUICK_CPU_STEP_FLOPS."""
    fits = QUICK_CPU_STEP_FLOPS / (TRAIN_FLOPS_PER_FORWARD * fwd_flops)
    return min(params.train.batch_size, max(2, 2 ** int(math.floor(math.log2(max(1.0, fits))))))


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Time :class:`TrainStep` after warm-up; returns the result dict."""
    s = setup(args)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else FULL_STEPS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else FULL_WARMUP)
    if args.compile:
        warmup = max(warmup, 2)  # the first calls compile (forward, then backward graphs)
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    torch.manual_seed(s.params.seed)
    # The probe's operands exist before the memory window opens (on CUDA they are subtracted below).
    probe = MatmulProbe(s.device, s.amp_dtype or torch.float32, args.matmul_n)
    with peak_memory(s.device) as mem:
        model, diffusion = build(s)
        fwd_flops = float(flops_per_image(model))
        batch_size = args.batch_size
        if batch_size is None:
            quick_cpu = args.quick and s.device.type == "cpu"
            batch_size = quick_batch_size(s.params, fwd_flops) if quick_cpu else s.params.train.batch_size
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 (got {batch_size})")
        counted = counted_forward_flops(model, s)
        generator = torch.Generator(device=s.device).manual_seed(derive_seed(s.params.seed, "noise"))
        step = TrainStep(model, diffusion, s.params, s.device, generator=generator, amp_dtype=s.amp_dtype,
                         compile_model=args.compile, use_ema=not args.no_ema)
        batch = synthetic_batch(s, batch_size, torch.Generator().manual_seed(derive_seed(s.params.seed, "batch")))
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(batch)
        sync(s.device)
        warmup_s = time.perf_counter() - t0
        times, paired_peaks, faults = [], [], 0
        for _ in range(steps):
            faults0, t0 = minor_page_faults(), time.perf_counter()
            out = step(batch)
            sync(s.device)
            times.append(time.perf_counter() - t0)
            faults += minor_page_faults() - faults0
            paired_peaks.append(probe.rate(reps=1))  # the matmul peak under the same load as this step
    if s.device.type == "cuda":
        mem["peak_mem_mb"] -= probe.operand_mb
    probe.rate()
    loss = float(out.losses["loss"].detach())
    if not math.isfinite(loss):
        raise RuntimeError(f"bench train: the loss went non-finite ({loss}); the numbers would be meaningless")
    total = sum(times)
    step_flops = TRAIN_FLOPS_PER_FORWARD * fwd_flops * batch_size
    achieved = step_flops * steps / total
    return {
        "bench": "train", "config": s.config, "device": s.device.type, "device_name": device_name(s.device),
        "dtype": s.dtype, "threads": s.threads, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "compile": args.compile, "ema": not args.no_ema, "tasks": s.params.tasks.enabled,
        "input_shape": list(s.shape), "params": count_params(model), "flops_per_img": fwd_flops,
        "flops_per_img_counted": counted, "img_per_s": batch_size * steps / total, "step_time_s": total / steps,
        "step_time_best_s": min(times), "warmup_s": warmup_s, "achieved_flops": achieved, **probe.info(),
        "mfu": achieved / probe.peak, "mfu_best_step": step_flops / min(times) / probe.peak,
        "mfu_paired_median": statistics.median(step_flops / t / p for t, p in zip(times, paired_peaks)),
        "loss": loss, "torch": torch.__version__, **mem, "page_faults_per_step": faults / steps,
        "malloc_retains_freed": retain_freed_memory() if s.device.type == "cpu" else None,
        "profile_table": profile_steps(step, batch, s.device) if args.profile else None,
    }


def format_train(r: dict[str, Any]) -> str:
    counted = r["flops_per_img_counted"]
    return "\n".join([
        f"bench train  config={r['config']}  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  "
        f"threads={r['threads']}  compile={r['compile']}  ema={r['ema']}",
        f"  model        {r['params']:,} params, input {tuple(r['input_shape'])}, tasks {r['tasks']}",
        f"  batch        {r['batch_size']}, {r['warmup']} warm-up + {r['steps']} timed steps "
        f"({r['warmup_s']:.1f} s warm-up)",
        f"  throughput   {r['img_per_s']:.1f} img/s  ({r['step_time_s'] * 1e3:.0f} ms/step, best step "
        f"{r['step_time_best_s'] * 1e3:.0f} ms)",
        f"  FLOPs/img    {fmt_si(r['flops_per_img'], 'FLOP')} forward (flops_per_image)"
        + (f"; FlopCounterMode counts {fmt_si(counted, 'FLOP')}" if counted else ""),
        f"  achieved     {fmt_si(r['achieved_flops'], 'FLOP/s')}  (= 3 x forward FLOPs/img x img/s)",
        f"  matmul peak  {fmt_si(r['matmul_flops'], 'FLOP/s')}  ({r['matmul_n']}^2 {r['matmul_dtype']} "
        f"torch.matmul, same threads; best of {r['matmul_samples']} timings before, between and after the steps)",
        f"  MFU          {r['mfu']:.3f}  = achieved / matmul peak   (best step {r['mfu_best_step']:.3f}; "
        f"median of steps each over the matmul timed right after it {r['mfu_paired_median']:.3f})",
        f"  peak memory  {r['peak_mem_mb']:.0f} MiB ({r['peak_mem_kind']})",
        f"  page faults  {r['page_faults_per_step']:,.0f} per step (minor; host memory the step touched afresh)"
        + ("" if r["malloc_retains_freed"] is None else
           f"; malloc keeps freed memory: {r['malloc_retains_freed']} (mtdiff.host_memory)"),
        f"  loss         {r['loss']:.4f} after {r['warmup'] + r['steps']} steps",
    ])
