"""The benchmarks' shared parts: named settings, the setup (params, model, synthetic batches)
and the measuring probes (matmul peak, page faults, peak memory, FLOP counts, profiler).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mtdiff.config import Params, load_params, parse_overrides
from mtdiff.diffusion import MTDiffusion
from mtdiff.models import build_model, input_shape_from_params
from mtdiff.precision import autocast_dtype, configure_backends
from mtdiff.train.step import TrainStep
from mtdiff.utils import pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    # the ImageNet-256 profile as it is (configs/imagenet256.yaml): what `bench smoke` measures
    "imagenet256": BenchConfig({"profile": "imagenet256"}, num_classes=1000),
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


def best_seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after one untimed warm-up call."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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



def fmt_si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"
