"""Benchmarks: ``mtdiff bench train|sample`` (``make bench`` runs ``train --quick``).

- ``train``: img/s, achieved FLOP/s and MFU of :class:`mtdiff.training.TrainStep` (the train
  stage's own step) on synthetic batches of the real shape, plus peak memory.
- ``sample``: images/s of ``MTDiffusion.sample`` at N steps.

MFU = achieved FLOP/s / dense-matmul FLOP/s, both measured in this run on this device, dtype and
thread count (not a datasheet peak). Achieved FLOP/s counts 3 x the analytic forward FLOPs per
image (``mtdiff.models.flops_per_image``: forward 1x, backward 2x) x img/s; the optimizer, norms
and elementwise work are not counted, so they show up as lost MFU. torch's FlopCounterMode
cross-checks the analytic count. Each benchmark prints a table, or with ``--json`` one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mtdiff.checkpoint import load_for_inference
from mtdiff.config import ConfigError, Params, load_params, parse_overrides
from mtdiff.data import random_patch_mask
from mtdiff.diffusion import MTDiffusion
from mtdiff.diffusion.process import SAMPLERS
from mtdiff.host_memory import retain_freed_memory
from mtdiff.models import build_model, count_params, flops_per_image, input_shape_from_params
from mtdiff.stages.sample import guidance_kwargs
from mtdiff.training import TrainStep, autocast, autocast_dtype, configure_backends
from mtdiff.utils import derive_seed, pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (about twice the forward)
QUICK_STEPS, QUICK_WARMUP = 5, 2
FULL_STEPS, FULL_WARMUP = 20, 3
# --quick on CPU caps the batch so one step stays around a second or two (DiT-B/2 at batch 256
# would take minutes per step on a laptop); the default profile's batch stays as is.
QUICK_CPU_STEP_FLOPS = 150e9
QUICK_SAMPLE_NUM, QUICK_SAMPLE_STEPS = 32, 10
SAMPLE_STEPS = 50  # bench sample's default: the usual figure (DiT, ADM report 50-step DDIM/DDPM sampling)
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # big enough to reach the device's GEMM peak
MATMUL_REPS = 5
FLOP_COUNT_BATCH = 2


@dataclass(frozen=True)
class BenchConfig:
    """A named benchmark setting: params overrides, and the label classes of its synthetic batches
    (the dataset's count, which a benchmark on synthetic data cannot read from the data)."""

    overrides: dict[str, Any]
    num_classes: int


CONFIGS = {
    "default": BenchConfig({}, num_classes=10),  # params.yaml as is: Fashion-MNIST
    # DiT's ImageNet-256 class-conditional setting: SD-VAE latents 4x32x32, DiT-B/2, label task only
    "imagenet256-dit-b2": BenchConfig(
        {"profile": "imagenet256", "data.source": "imagenet", "data.resolution": 256, "data.channels": 3,
         "diffusion.mode": "latent", "model.backbone": "dit", "model.size": "B", "model.patch_size": 2, "tasks.label.enabled": True,
         "tasks.representation.enabled": False, "tasks.masked.enabled": False,
         "tasks.transition.enabled": False, "sample.condition": "label"}, num_classes=1000),
}


# -- setup ----------------------------------------------------------------------------------------
@dataclass
class Setup:
    """What both benchmarks start from: params, device, autocast dtype, threads."""

    config: str
    params: Params
    num_classes: int
    device: torch.device
    dtype: str
    amp_dtype: torch.dtype | None
    threads: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in input_shape_from_params(self.params))  # type: ignore[return-value]

    @property
    def repr_dim(self) -> int | None:
        return self.params.representations.dim if self.params.tasks.representation.enabled else None


def bench_params(config: str = "default", params_path: str | None = None,
                 overrides: list[str] | None = None) -> Params:
    """The params a benchmark runs with: params.yaml, the config's overrides, then the command line's."""
    if config not in CONFIGS:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)} (got {config!r})")
    return load_params(params_path, overrides={**CONFIGS[config].overrides, **parse_overrides(overrides)})


def setup(args: argparse.Namespace) -> Setup:
    """Params, threads (``--threads``; default: torch's current count), device and backend flags
    (TF32 as the train stage sets them, also for the matmul peak) and the autocast dtype: ``auto`` is
    the train stage's (train.precision on CUDA, fp32 on CPU); bf16/fp16 on CPU measure CPU autocast."""
    params = bench_params(args.config, args.params, args.overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    device = pick_device(args.device)
    configure_backends(device, params.train.tf32)
    amp = autocast_dtype(device, params.train.precision) if args.dtype == "auto" else DTYPES[args.dtype]
    dtype = next((name for name, dt in DTYPES.items() if dt == amp), "fp32")
    return Setup(args.config, params, CONFIGS[args.config].num_classes, device, dtype,
                 None if dtype == "fp32" else amp, torch.get_num_threads())


def build(s: Setup) -> tuple[torch.nn.Module, MTDiffusion]:
    """The project's own model and diffusion for the setup's params, on its device."""
    model = build_model(s.params, repr_dim=s.repr_dim, num_classes=s.num_classes, input_shape=s.shape)
    return model.to(s.device), MTDiffusion(s.params.diffusion)


def synthetic_batch(s: Setup, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch shaped like ``collate_batch``'s: ``z0`` in [-1, 1] plus the stored task data of M2
    (the masked task's input is drawn from ``z0`` by ``make_targets``, as in the train stage)."""
    def image() -> torch.Tensor:
        return torch.rand(batch_size, *s.shape, generator=generator).mul_(2).sub_(1)

    batch = {"z0": image()}
    tasks = s.params.tasks.enabled
    if "label" in tasks:
        batch["label"] = torch.randint(0, s.num_classes, (batch_size,), generator=generator)
    if "representation" in tasks:
        batch["representation"] = torch.randn(batch_size, s.repr_dim, generator=generator)
    if "transition" in tasks:
        batch["transition"] = image()
    return {k: v.to(s.device) for k, v in batch.items()}


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


# -- measurements ----------------------------------------------------------------------------------
class MatmulProbe:
    """Dense matmul FLOP/s on this device, dtype, threads and TF32 setting: timed (n x n) @ (n x n).

    ``rate`` can be called between training steps, so a step and a peak are timed under the same
    machine load; ``peak`` is the best rate seen (other load can only lower a timing).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int | None = None):
        self.device, self.dtype = device, dtype
        self.n = n or MATMUL_N.get(device.type, MATMUL_N["cpu"])
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.n, self.n, generator=g).to(device=device, dtype=dtype)
        self.b = torch.randn(self.n, self.n, generator=g).to(device=device, dtype=dtype)
        # On a GPU one matmul is ~1 ms: time a burst so launch/sync overhead does not count.
        self.inner = 10 if device.type == "cuda" else 1
        self.samples: list[float] = []
        self.rate(reps=1)  # warm-up: oneDNN / cuBLAS plans

    @property
    def operand_mb(self) -> float:
        return 2 * self.a.numel() * self.a.element_size() / 2**20

    def rate(self, reps: int = MATMUL_REPS) -> float:
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(self.inner):
                torch.matmul(self.a, self.b)
            sync(self.device)
            best = min(best, (time.perf_counter() - t0) / self.inner)
        flops = 2.0 * self.n ** 3 / best
        self.samples.append(flops)
        return flops

    @property
    def peak(self) -> float:
        return max(self.samples)

    def info(self) -> dict[str, Any]:
        return {"matmul_flops": self.peak, "matmul_n": self.n,
                "matmul_dtype": str(self.dtype).replace("torch.", ""), "matmul_samples": len(self.samples)}


def minor_page_faults() -> int:
    """The process's minor page faults so far (each a 4 KiB page of host memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """The workload's peak memory, filled in on exit: CUDA ``max_memory_allocated`` (tensors only),
    CPU the process's peak RSS (a high-water mark over the process's life)."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            out.update(peak_mem_mb=torch.cuda.max_memory_allocated(device) / 2**20,
                       peak_mem_kind="cuda_max_memory_allocated")
        else:  # ru_maxrss is in KiB on Linux
            out.update(peak_mem_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       peak_mem_kind="process_peak_rss")


def counted_forward_flops(model: torch.nn.Module, s: Setup) -> float | None:
    """torch's FlopCounterMode on one forward, per image (matmul/conv/attention only), or None when
    it cannot count the model: a cross-check of ``flops_per_image``, whose gap points at a formula bug."""
    x = torch.randn(FLOP_COUNT_BATCH, *s.shape, device=s.device)
    t = torch.full((FLOP_COUNT_BATCH,), max(1, s.params.diffusion.timesteps // 2), dtype=torch.long,
                   device=s.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t)
        return counter.get_total_flops() / FLOP_COUNT_BATCH
    except Exception:  # noqa: BLE001 - an op the counter does not know must not fail the benchmark
        return None
    finally:
        model.train(was_training)


def profile_steps(step: TrainStep, batch: dict[str, torch.Tensor], device: torch.device, n: int = 2,
                  top: int = 25) -> str:
    """torch.profiler's top ops by self time over ``n`` steps (where the non-matmul time goes)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(batch)
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


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


# -- bench sample ----------------------------------------------------------------------------------
def sample_conditions(s: Setup, num: int) -> dict[str, torch.Tensor]:
    """What the sample stage conditions on (``sample.condition``), with random images for the test split."""
    cond, shape = s.params.sample.condition, s.shape
    if cond == "label":
        return {"label": (torch.arange(num) % s.num_classes).to(s.device)}
    if cond == "uncond":
        return {}
    image = torch.rand(num, *shape).mul_(2).sub_(1)
    if cond == "masked":
        tasks = s.params.tasks
        image = image * random_patch_mask(num, shape, tasks.masked.mask_ratio, s.params.model.patch_size)
    return {cond: image.to(s.device)}


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Time one ``MTDiffusion.sample`` of ``--num`` images at ``--steps`` steps after a short warm-up."""
    s = setup(args)
    sc = s.params.sample
    steps = args.steps or (QUICK_SAMPLE_STEPS if args.quick else SAMPLE_STEPS)
    num = args.num or (QUICK_SAMPLE_NUM if args.quick else sc.batch_size)
    sampler = args.sampler or sc.sampler
    if num < 1 or steps < 1:
        raise ValueError(f"--num and --steps must be >= 1 (got {num}, {steps})")
    torch.manual_seed(s.params.seed)
    with peak_memory(s.device) as mem:
        if args.checkpoint:
            model, diffusion, _ = load_for_inference(s.params, args.checkpoint, device=s.device)
        else:
            model, diffusion = build(s)
        model.eval().requires_grad_(False)
        given = sample_conditions(s, num)

        def sample(n_steps: int) -> dict[str, torch.Tensor]:
            generator = torch.Generator().manual_seed(derive_seed(s.params.seed, "sample"))
            with autocast(s.device, s.amp_dtype):  # guidance as the sample stage runs it
                return diffusion.sample(model, (num, *s.shape), given=given, steps=n_steps, sampler=sampler,
                                        eta=sc.eta, generator=generator, tasks_cfg=s.params.tasks, device=s.device,
                                        **guidance_kwargs(s.params))

        sample(min(2, steps))  # warm-up: allocator, oneDNN / cuBLAS plans
        sync(s.device)
        forwards: list[int] = []  # images through the network: guidance runs a doubled batch
        counter = model.register_forward_pre_hook(lambda _, args: forwards.append(args[0].shape[0]))
        t0 = time.perf_counter()
        out = sample(steps)
        sync(s.device)
        seconds = time.perf_counter() - t0
        counter.remove()
    if not torch.isfinite(out["z0"]).all():
        raise RuntimeError("bench sample: the samples are not finite")
    probe = MatmulProbe(s.device, s.amp_dtype or torch.float32)
    probe.rate()
    img_per_s = num / seconds
    achieved = float(flops_per_image(model)) * sum(forwards) / seconds
    return {
        "bench": "sample", "config": s.config, "device": s.device.type, "device_name": device_name(s.device),
        "dtype": s.dtype, "threads": s.threads, "num": num, "steps": steps, "sampler": sampler,
        "condition": sc.condition, "weights": args.checkpoint or "random init", "params": count_params(model),
        "task_guidance": sc.task_guidance, "cfg_scale": sc.cfg_scale, "network_images": sum(forwards),
        "seconds": seconds, "img_per_s": img_per_s, "ms_per_step": seconds / steps * 1e3,
        "achieved_flops": achieved, "matmul_flops": probe.peak, "mfu": achieved / probe.peak, **mem,
    }


def format_sample(r: dict[str, Any]) -> str:
    return "\n".join([
        f"bench sample  config={r['config']}  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  "
        f"threads={r['threads']}",
        f"  model       {r['params']:,} params ({r['weights']}), condition {r['condition']}, sampler {r['sampler']}",
        f"  batch       {r['num']} images x {r['steps']} steps in {r['seconds']:.2f} s "
        f"({r['ms_per_step']:.0f} ms/step)",
        f"  throughput  {r['img_per_s']:.2f} img/s at {r['steps']} steps",
        f"  network     {r['network_images']} image forwards ({r['network_images'] / (r['num'] * r['steps']):.2f} per "
        f"image-step: task guidance {r['task_guidance']:g}, CFG {r['cfg_scale']:g})",
        f"  MFU         {r['mfu']:.3f}  ({fmt_si(r['achieved_flops'], 'FLOP/s')} = forward FLOPs/img x image forwards / s;"
        f" matmul peak {fmt_si(r['matmul_flops'], 'FLOP/s')})",
        f"  peak memory {r['peak_mem_mb']:.0f} MiB ({r['peak_mem_kind']})",
    ])


def fmt_si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


# -- command line ----------------------------------------------------------------------------------
BENCHMARKS = {"train": (run_train, format_train), "sample": (run_sample, format_sample)}


def _common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="a few seconds: small step/image counts")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="autocast dtype (auto: the train stage's, train.precision on CUDA, fp32 on CPU)")
    ap.add_argument("--config", default="default", choices=tuple(CONFIGS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    ap.add_argument("--params", default=None, help="params file (default params.yaml)")
    ap.add_argument("overrides", nargs="*", help="params overrides key.sub=value")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtdiff bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    train = sub.add_parser("train", help="training throughput and MFU")
    _common_arguments(train)
    train.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    train.add_argument("--batch-size", type=int, default=None,
                       help="default: train.batch_size (capped by --quick on CPU)")
    train.add_argument("--steps", type=int, default=None, help=f"timed steps ({FULL_STEPS}; --quick {QUICK_STEPS})")
    train.add_argument("--warmup", type=int, default=None,
                       help=f"untimed steps first ({FULL_WARMUP}; --quick {QUICK_WARMUP})")
    train.add_argument("--no-ema", action="store_true", help="leave the EMA update out of the step")
    train.add_argument("--matmul-n", type=int, default=None, help=f"size of the square matmul peak {MATMUL_N}")
    train.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops for 2 steps")
    sample = sub.add_parser("sample", help="sampling throughput")
    _common_arguments(sample)
    sample.add_argument("--steps", type=int, default=None, help=f"sampling steps ({SAMPLE_STEPS}; --quick {QUICK_SAMPLE_STEPS})")
    sample.add_argument("--num", type=int, default=None, help="images in the batch (default sample.batch_size)")
    sample.add_argument("--sampler", default=None, choices=SAMPLERS, help="default sample.sampler")
    sample.add_argument("--checkpoint", default=None, help="load EMA weights from this checkpoint")
    return ap


def run(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` and run one benchmark; returns its result dict (no printing)."""
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()  # benchmarks also run in-process (tests): leave torch as found
    try:
        return BENCHMARKS[args.which][0](args)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        result = _run(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: mtdiff bench {args.which}: {err}", file=sys.stderr)
        return 2
    table = result.pop("profile_table", None)
    if args.json:
        print(json.dumps(result, default=str))
        if table:
            print(table, file=sys.stderr)
    else:
        print(BENCHMARKS[args.which][1](result) + (f"\n\n{table}" if table else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
