"""``mtdiff bench train``: training throughput, achieved FLOP/s and MFU of the real M5 training step.

MFU = achieved FLOP/s / dense-matmul FLOP/s, both measured in this run on this device, dtype and
thread count. Achieved FLOP/s counts 3 x the forward FLOPs per image (``flops_per_image``: forward
1x, backward 2x, the usual convention) x images/s; the optimizer, norms and elementwise work are
not counted, so they show up as lost MFU.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from typing import Any

import torch

from mtdiff.bench import common as C

QUICK_STEPS, QUICK_WARMUP = 5, 2
FULL_STEPS, FULL_WARMUP = 20, 3
# --quick on CPU caps the batch so one step stays around a second or two (DiT-B/2 at batch 256
# would take minutes per step on a laptop); the default profile's batch stays as is.
QUICK_CPU_STEP_FLOPS = 150e9


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_WARMUP} warm-up + {QUICK_STEPS} timed steps")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="auto: what the train stage uses (train.precision on CUDA, fp32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    ap.add_argument("--config", default="default", choices=C.CONFIGS)
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--steps", type=int, default=None, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    ap.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    ap.add_argument("--matmul-n", type=int, default=None, help="size of the square matmul peak (CPU 2048, CUDA 8192)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops for 2 steps")
    ap.add_argument("--params", default=None, help="params file (default params.yaml)")
    ap.add_argument("overrides", nargs="*", help="params overrides key.sub=value")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@C.keeps_threads
def run_train_bench(*, config: str = "default", device: str = "auto", dtype: str = "auto",
                    compile_model: bool = False, batch_size: int | None = None, steps: int | None = None,
                    warmup: int | None = None, threads: int | None = None, quick: bool = False,
                    ema: bool = True, matmul_n: int | None = None, params_path: str | None = None,
                    overrides: list[str] | None = None, profile: bool = False) -> dict[str, Any]:
    """Time the train stage's step on synthetic batches of the real shape; returns the result dict."""
    machine, params, n_threads, dev, dt = C.setup_bench(config, params_path, overrides, threads, device, dtype)
    steps = steps if steps is not None else (QUICK_STEPS if quick else FULL_STEPS)
    warmup = warmup if warmup is not None else (QUICK_WARMUP if quick else FULL_WARMUP)
    if compile_model:
        warmup = max(warmup, 2)  # the first calls compile (forward, then backward graphs)
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")

    from mtdiff.models import flops_per_image

    torch.manual_seed(params.seed)
    # The matmul probe's operands are allocated before the memory window opens (no part of training's
    # footprint on CPU; on CUDA they are subtracted below). It is timed before training, after every
    # timed step (each step paired with a peak under the same machine load) and after training.
    probe = C.MatmulProbe(dev, dt, matmul_n)
    probe.rate(reps=3 if quick else 5)
    with C.peak_memory(dev) as mem:
        model, diffusion = C.build(params, dev)
        fwd_flops = float(flops_per_image(model))
        capped = False
        if batch_size is None:
            batch_size = params.train.batch_size
            if quick and dev.type == "cpu":
                cap = max(2, 2 ** int(math.floor(math.log2(max(1.0, QUICK_CPU_STEP_FLOPS / (3 * fwd_flops))))))
                capped = cap < batch_size
                batch_size = min(batch_size, cap)
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 (got {batch_size})")
        counted = C.forward_flops_counted(model, params, dev)
        step = C.TrainStep(model, diffusion, params, dev, dt, compile_model=compile_model, ema=ema,
                           seed=params.seed)
        gen = torch.Generator().manual_seed(params.seed)
        batch = C.synthetic_batch(params, batch_size, dev, gen)
        losses: list[torch.Tensor] = []
        t_warm = time.perf_counter()
        for _ in range(warmup):
            losses.append(step(batch))
        C.sync(dev)
        warm_s = time.perf_counter() - t_warm
        total, per, probes = C.time_loop(lambda: losses.append(step(batch)), steps, 0, dev, probe=probe)
    if dev.type == "cuda":
        mem["peak_mem_mb"] -= probe.operand_mb
    probe.rate(reps=3 if quick else 5)
    matmul_flops = probe.peak  # best of every timing: other load can only lower a measurement
    img_per_s = batch_size * steps / total
    step_flops = 3.0 * fwd_flops * batch_size
    achieved = step_flops / total * steps
    paired = [step_flops / t / r for t, r in zip(per, probes)]
    final_loss = float(losses[-1])
    if not torch.isfinite(torch.tensor(final_loss)):
        raise RuntimeError(f"bench train: the loss went non-finite ({final_loss}); the numbers would be meaningless")
    result: dict[str, Any] = {
        "bench": "train", "config": config, "device": dev.type, "device_name": device_name(dev),
        "dtype": dt, "threads": n_threads, "batch_size": batch_size, "batch_capped_for_quick": capped,
        "steps": steps, "warmup": warmup, "compile": compile_model, "ema": ema,
        "tasks": params.tasks.enabled, "input_shape": list(C.data_shape(params)),
        "params": C.count_params(model),
        "flops_per_img": fwd_flops, "train_flops_per_img": 3.0 * fwd_flops,
        "flops_per_img_counted": counted,
        "flops_note": "achieved = 3 x forward FLOPs/img (mtdiff.models.flops_per_image) x img/s",
        "img_per_s": img_per_s, "step_time_s": total / steps, "step_time_best_s": min(per),
        "img_per_s_best_step": batch_size / min(per), "warmup_s": warm_s,
        "achieved_flops": achieved, **probe.info(), "mfu": achieved / matmul_flops,
        "mfu_best_step": step_flops / min(per) / matmul_flops,
        "mfu_paired_median": statistics.median(paired),
        "optimizer": "AdamW " + ("fused" if dev.type == "cuda" else "foreach"),
        "loss": final_loss, "torch": torch.__version__, **mem,
        "load_avg_1m_before": machine["load_avg_1m"], "load_avg_1m_after": C.machine_state()["load_avg_1m"],
        "omp_env": machine["omp_env"], "warning": C.busy_warning(machine, n_threads),
    }
    if profile:
        result["profile_table"] = profile_steps(step, batch, dev)
    return result


def profile_steps(step, batch: dict[str, torch.Tensor], device: torch.device, n: int = 2, top: int = 25) -> str:
    """torch.profiler's top ops by self time over ``n`` steps (where the non-matmul time goes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step(batch)
        C.sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def format_result(r: dict[str, Any]) -> str:
    counted = r.get("flops_per_img_counted")
    lines = [
        f"bench train  config={r['config']}  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  "
        f"threads={r['threads']}  compile={r['compile']}",
        f"  model        {r['params']:,} params, input {tuple(r['input_shape'])}, tasks {r['tasks']}",
        f"  batch        {r['batch_size']}{' (capped for --quick on CPU)' if r['batch_capped_for_quick'] else ''}"
        f", {r['warmup']} warm-up + {r['steps']} timed steps ({r['warmup_s']:.1f} s warm-up)",
        f"  throughput   {r['img_per_s']:.1f} img/s  ({r['step_time_s'] * 1e3:.0f} ms/step, best step "
        f"{r['step_time_best_s'] * 1e3:.0f} ms)",
        f"  FLOPs/img    {C.fmt_si(r['flops_per_img'], 'FLOP')} forward (flops_per_image)"
        + (f"; FlopCounterMode counts {C.fmt_si(counted, 'FLOP')}" if counted else ""),
        f"  achieved     {C.fmt_si(r['achieved_flops'], 'FLOP/s')}  (= 3 x forward FLOPs/img x img/s)",
        f"  matmul peak  {C.fmt_si(r['matmul_flops'], 'FLOP/s')}  ({r['matmul_n']}^2 {r['matmul_dtype']} "
        f"torch.matmul, same threads; best of {r['matmul_samples']} timings before, between and after the steps)",
        f"  MFU          {r['mfu']:.3f}  = achieved / matmul peak   (best step {r['mfu_best_step']:.3f}; "
        f"median of steps each over the matmul timed right after it {r['mfu_paired_median']:.3f})",
        f"  peak memory  {r['peak_mem_mb']:.0f} MiB ({r['peak_mem_kind']}"
        + (f", +{r['peak_mem_delta_mb']:.0f} MiB during the bench" if "peak_mem_delta_mb" in r else "") + ")",
        f"  loss         {r['loss']:.4f} after {r['warmup'] + r['steps']} steps",
    ]
    if r.get("warning"):
        lines.append(f"  {r['warning']}")
    if r.get("profile_table"):
        lines += ["", r["profile_table"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_train_bench(config=args.config, device=args.device, dtype=args.dtype, compile_model=args.compile,
                           batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, threads=args.threads,
                           quick=args.quick, ema=not args.no_ema, matmul_n=args.matmul_n,
                           params_path=args.params, overrides=args.overrides, profile=args.profile)
