"""Shared pieces of the benchmarks: threads, devices, timing, the matmul peak, memory, the train step.

Every number a benchmark prints is measured in the same process, on the same device, with the same
dtype and thread count as the workload it is compared against (MFU's denominator included).
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from mtdiff.config import Params, load_params

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = ("default", "imagenet256-dit-b2")


# -- machine --------------------------------------------------------------------------------------
def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings count once): the right torch thread count.

    Two threads on one core share its FMA units, so using logical CPUs only adds contention to GEMMs.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:  # no sysfs topology (containers, non-Linux): count logical CPUs
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: physical cores) and return the count in use."""
    n = threads or physical_cores()
    if n < 1:
        raise ValueError(f"--threads must be >= 1 (got {n})")
    torch.set_num_threads(n)
    return torch.get_num_threads()


OMP_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def machine_state() -> dict[str, Any]:
    """What else the machine is doing (1-minute load average) and the OpenMP settings in force.

    On a shared box the load average says how far to trust a timing: with more runnable threads
    than cores, OpenMP's spin-waiting threads make every parallel region wait for a descheduled
    sibling, and multi-threaded training slows down far more than the load alone would suggest.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"load_avg_1m": load, "cpu_count": os.cpu_count(),
            "omp_env": {k: os.environ[k] for k in OMP_ENV if k in os.environ}}


def busy_warning(before: dict[str, Any], threads: int) -> str | None:
    """A one-line caveat when other work competed for the cores during the run, else None."""
    load = before.get("load_avg_1m")
    if load is None or load < 0.5:
        return None
    msg = (f"note: load average was {load:.1f} on {before.get('cpu_count')} CPUs at the start (other "
           f"work on the machine): timings are noisy")
    if threads > 1:
        msg += ("; multi-threaded torch suffers most (OpenMP spin-waits), OMP_WAIT_POLICY=PASSIVE or "
                "--threads 1 hold up better on a busy machine")
    return msg + "."


def keeps_threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Restore torch's thread count after ``fn`` (benchmarks also run in-process, e.g. from tests)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def resolve_device(choice: str) -> torch.device:
    """``auto`` -> CUDA when visible else CPU; ``cuda`` without a GPU is an error (never a silent fallback)."""
    from mtdiff.utils import pick_device

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    return pick_device(choice)


def configure_backends(device: torch.device, tf32: bool) -> None:
    """The train stage's backend settings (TF32 on CUDA when train.tf32); set before the matmul peak
    is measured too, so MFU's numerator and denominator run under the same flags."""
    from mtdiff.training import configure_backends as _configure

    _configure(device, tf32)


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings cover the work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` (None: plain fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- params ---------------------------------------------------------------------------------------
def bench_params(config: str = "default", params_path: str | None = None,
                 overrides: list[str] | None = None) -> Params:
    """The params a benchmark runs with.

    ``default``: params.yaml (the default profile) as is. ``imagenet256-dit-b2``: the imagenet256
    profile (SD-VAE latents 4x32x32, DiT-B/2, 1000 classes) with only the label task, as in DiT's
    ImageNet-256 class-conditional setting.
    """
    if config not in CONFIGS:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)} (got {config!r})")
    over: dict[str, Any] = {}
    if config == "imagenet256-dit-b2":
        over = {"profile": "imagenet256", "data.source": "imagenet", "data.resolution": 256, "data.channels": 3,
                "diffusion.mode": "latent", "model.size": "B", "model.patch_size": 2,
                "tasks.label.enabled": True, "tasks.representation.enabled": False,
                "tasks.masked.enabled": False, "tasks.transition.enabled": False, "sample.condition": "label"}
    from mtdiff.config import parse_overrides

    over.update(parse_overrides(overrides))
    return load_params(params_path, overrides=over)


def derive(params: Params, overrides: dict[str, Any]) -> Params:
    """A validated copy of ``params`` with dotted-key ``overrides`` applied."""
    from mtdiff.config import _set_dotted, params_from_dict

    raw = params.model_dump()
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    return params_from_dict(raw, "bench")


def num_classes(params: Params) -> int:
    """Fashion-MNIST has 10 classes, ImageNet 1000 (the label head's width)."""
    return 1000 if params.data.source == "imagenet" else 10


def repr_dim(params: Params) -> int | None:
    """Width of the representation vectors, when that task is on (the fmnist_cnn dim, else a ViT-B's 768)."""
    if not params.tasks.representation.enabled:
        return None
    return params.representations.dim if params.representations.encoder == "fmnist_cnn" else 768


def data_shape(params: Params) -> tuple[int, int, int]:
    """(C, H, W) of z_0: the image in pixel mode, the SD-VAE latent (4 channels, /8) in latent mode."""
    from mtdiff.models import input_shape_from_params

    return tuple(int(v) for v in input_shape_from_params(params))  # type: ignore[return-value]


def build(params: Params, device: torch.device):
    """(model, diffusion) for params, on device: the project's own build_model and MTDiffusion."""
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.models import build_model

    model = build_model(params, repr_dim(params), num_classes(params)).to(device)
    return model, MTDiffusion(params.diffusion)


def synthetic_batch(params: Params, batch_size: int, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch shaped like ``collate_batch``'s: ``z0`` in [-1, 1] plus the stored task data of M2.

    (The masked task's input is drawn from ``z0`` by ``make_targets``, as in the train stage.)
    """
    c, h, w = data_shape(params)
    g = generator
    batch = {"z0": torch.rand(batch_size, c, h, w, generator=g).mul_(2).sub_(1)}
    tasks = params.tasks.enabled
    if "label" in tasks:
        batch["label"] = torch.randint(0, num_classes(params), (batch_size,), generator=g)
    if "representation" in tasks:
        batch["representation"] = torch.randn(batch_size, repr_dim(params) or 1, generator=g)
    if "transition" in tasks:
        batch["transition"] = torch.rand(batch_size, c, h, w, generator=g).mul_(2).sub_(1)
    return {k: v.to(device) for k, v in batch.items()}


# -- the training step --------------------------------------------------------------------------------
def amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for ``--dtype``: None for fp32; bf16/fp16 on CUDA, and on CPU when asked for.

    (The train stage itself always runs fp32 on CPU; ``--dtype bf16`` on CPU measures CPU autocast.)
    """
    return None if dtype == "fp32" else DTYPES[dtype]


def resolve_dtype(choice: str, device: torch.device, params: Params) -> str:
    """``auto`` -> what the train stage would use: train.precision on CUDA, fp32 on CPU."""
    if choice != "auto":
        if choice not in DTYPES:
            raise ValueError(f"--dtype must be auto, fp32, bf16 or fp16 (got {choice!r})")
        return choice
    if device.type != "cuda":
        return "fp32"
    if params.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return params.train.precision


class BenchSetup(NamedTuple):
    machine: dict[str, Any]
    params: Params
    threads: int
    device: torch.device
    dtype: str


def setup_bench(config: str, params_path: str | None, overrides: list[str] | None,
                threads: int | None, device: str, dtype: str) -> BenchSetup:
    """What every benchmark does first: note the machine's load, load params, set threads,
    device, backends (TF32) and the dtype the train stage would use."""
    machine = machine_state()
    params = bench_params(config, params_path, overrides)
    n_threads = configure_threads(threads)
    dev = resolve_device(device)
    configure_backends(dev, params.train.tf32)
    return BenchSetup(machine, params, n_threads, dev, resolve_dtype(dtype, dev, params))


class TrainStep:
    """One step of the train stage's loop on a collated batch, built from the stage's own helpers.

    ``make_targets`` -> ``MTDiffusion.training_losses`` (the real M5 loss, under autocast) ->
    backward (GradScaler for fp16) -> grad-norm clip -> AdamW (``build_optimizer``: fused on CUDA,
    foreach on CPU) -> EMA update. Only the LR schedule and logging are left out (both negligible).
    """

    def __init__(self, model: torch.nn.Module, diffusion: Any, params: Params, device: torch.device,
                 dtype: str, compile_model: bool = False, ema: bool = True, seed: int = 0):
        from mtdiff.training import EMA, build_optimizer, make_grad_scaler

        self.model, self.diffusion, self.params, self.device = model, diffusion, params, device
        self.amp = amp_dtype(device, dtype)
        self.optimizer = build_optimizer(model, params.train.lr, params.train.weight_decay, device)
        self.scaler = make_grad_scaler(device, self.amp if device.type == "cuda" else None)
        self.ema = EMA(model, params.train.ema_decay) if ema else None
        self.forward_model = torch.compile(model) if compile_model else model
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        model.train()

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from mtdiff.stages.train import make_targets

        p = self.params
        z0, targets = make_targets(batch, p, self.generator)
        with autocast(self.device, self.amp):
            losses = self.diffusion.training_losses(self.forward_model, z0, targets, tasks_cfg=p.tasks,
                                                    generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if p.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        return losses["loss"].detach()


def time_loop(step: Callable[[], Any], steps: int, warmup: int, device: torch.device,
              probe: "MatmulProbe | None" = None) -> tuple[float, list[float], list[float]]:
    """Run ``warmup`` untimed then ``steps`` timed calls.

    Returns (total seconds of the timed steps, per-step seconds, matmul FLOP/s probed right after
    each step when ``probe`` is given). Each step is synced (CUDA) so its time covers its kernels;
    the probes run between steps, outside the step times.
    """
    for _ in range(warmup):
        step()
    sync(device)
    per: list[float] = []
    probes: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        per.append(time.perf_counter() - t0)
        if probe is not None:
            probes.append(probe.rate(reps=1))
    return sum(per), per, probes


# -- the MFU denominator ---------------------------------------------------------------------------
class MatmulProbe:
    """Dense matmul FLOP/s on this device, dtype and thread count: timed (n x n) @ (n x n).

    Same device, dtype, threads and TF32 setting as the workload, so MFU is achieved / attainable on
    this machine (not a datasheet number); CPU fp32 runs plain fp32 GEMMs. ``rate`` can be called
    between training steps, so on a shared machine each step can be paired with a peak measured
    under the same load.
    """

    def __init__(self, device: torch.device, dtype: str, n: int | None = None):
        self.device = device
        self.n = n or (8192 if device.type == "cuda" else 2048)
        self.dtype = DTYPES[dtype]
        g = torch.Generator(device="cpu").manual_seed(0)
        self.a = torch.randn(self.n, self.n, generator=g).to(device=device, dtype=self.dtype)
        self.b = torch.randn(self.n, self.n, generator=g).to(device=device, dtype=self.dtype)
        # On a GPU one matmul is ~1 ms: time a burst so launch/sync overhead does not count.
        self.inner = 10 if device.type == "cuda" else 1
        for _ in range(2):
            torch.matmul(self.a, self.b)
        sync(device)
        self.samples: list[float] = []

    @property
    def operand_mb(self) -> float:
        return 2 * self.a.numel() * self.a.element_size() / 2**20

    def rate(self, reps: int = 3) -> float:
        """Best FLOP/s of ``reps`` timings (each of ``inner`` back-to-back matmuls)."""
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
        """The best rate seen so far: the honest denominator (other load can only lower a timing)."""
        return max(self.samples)

    def info(self) -> dict[str, Any]:
        return {"matmul_flops": self.peak, "matmul_n": self.n,
                "matmul_dtype": str(self.dtype).replace("torch.", ""), "matmul_samples": len(self.samples)}


def matmul_peak(device: torch.device, dtype: str, n: int | None = None, reps: int = 5) -> dict[str, Any]:
    """Dense matmul FLOP/s measured now: best of ``reps`` timed (n x n) @ (n x n) in ``dtype``."""
    probe = MatmulProbe(device, dtype, n)
    probe.rate(reps)
    out = probe.info()
    del probe
    return out


# -- memory -----------------------------------------------------------------------------------------
def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak RSS of this process so far (getrusage; KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Collect the workload's peak memory into the yielded dict on exit.

    CUDA: torch.cuda.max_memory_allocated (tensors only). CPU: the process's peak RSS (getrusage),
    a high-water mark over the process's life, plus how far it rose above the RSS at entry.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = current_rss_mb()
    try:
        yield out
    finally:
        if device.type == "cuda":
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["peak_mem_kind"] = "cuda_max_memory_allocated"
        else:
            peak = peak_rss_mb()
            out["peak_mem_mb"] = peak
            out["peak_mem_delta_mb"] = max(0.0, peak - rss0)
            out["peak_mem_kind"] = "process_peak_rss"


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_counted(model: torch.nn.Module, params: Params, device: torch.device, batch: int = 2) -> float | None:
    """Cross-check of flops_per_image: torch's FlopCounterMode on one forward (per image), or None.

    It counts matmul/conv/attention FLOPs only; a big gap to flops_per_image points at a formula bug.
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    c, h, w = data_shape(params)
    x = torch.randn(batch, c, h, w, device=device)
    t = torch.full((batch,), max(1, params.diffusion.timesteps // 2), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x, t)
        return fc.get_total_flops() / batch
    except Exception:  # noqa: BLE001 - a counter gap (unregistered op) must not fail the benchmark
        return None
    finally:
        model.train(was_training)


def fmt_si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"
