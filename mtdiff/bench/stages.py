"""``mtdiff bench stages``: throughput (img/s) and peak memory of each ImageNet-256 stage's work with the
real architectures: random weights, synthetic inputs, no network.

Each stage runs in a fresh process (as DVC runs each stage), so its peak memory is its own: the
process's peak RSS on CPU (the imports included; ``baseline`` is that of a process that only imports),
``torch.cuda.max_memory_allocated`` on CUDA. Timings are the best of ``--reps`` calls after one warm-up.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import multiprocessing as mp
import resource
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from mtdiff import precision
from mtdiff.bench.probes import CONFIGS, Setup, best_seconds, bench_params, build
from mtdiff.bench.sample import sample_conditions
from mtdiff.diffusion import Sampler
from mtdiff.encoders import DEFAULT_IMAGE_ENCODERS
from mtdiff.utils import pick_device

RESOLUTION = 256
LATENT_SHAPE = (4, 32, 32)
DINOV2 = DEFAULT_IMAGE_ENCODERS["dinov2"]
DINOV2_INPUT = 224  # REPA's input for 256 px images (representations.image_size)
# (stage, what one unit of img/s is, default batch): the ImageNet-256 pipeline in stage order
STAGES = {
    "prepare": ("JPEG decode + ADM center crop (1 process)", 16),
    "vae_encode": ("SD-VAE encoder, 256 px -> 4x32x32", 2),
    "dinov2": (f"DINOv2 ViT-B/14 features at {DINOV2_INPUT} px", 4),
    "train_step": ("DiT-B/2 train step (fwd+bwd+AdamW+EMA)", 4),
    "sample_call": ("DiT-B/2 sampler network call (image forwards)", 4),
    "vae_decode": ("SD-VAE decoder, 4x32x32 -> 256 px", 1),
    "inception": ("Inception-v3 features (torch-fidelity, 299 px)", 4),
}


def random_inception() -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (the FID network) with random weights. Its
    constructor always loads weights, so loading is stubbed out; the convs are He-initialised (the
    default init makes the 2048-d features ~1e-8 after ~90 layers)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fi

    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in net.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return net.eval()


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)


def _jpegs(n: int) -> list[bytes]:
    """ImageNet-typical JPEGs (500x375, quality 90) of smooth content plus noise."""
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    yy, xx = np.mgrid[:375, :500]
    for _ in range(n):
        base = 128 + 100 * np.sin(xx / rng.uniform(5, 40))[..., None] * np.cos(yy / rng.uniform(5, 40))[..., None]
        img = np.clip(base + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# -- one builder per stage: (the work on one batch, images per call) ---------------------------------
Work = tuple[Callable[[], Any], int]


def _prepare(batch: int, device: torch.device) -> Work:
    from mtdiff.sources import decode_image_bytes

    files = _jpegs(batch)
    return (lambda: [decode_image_bytes(f, "x.JPEG", RESOLUTION, 3) for f in files]), batch


def random_vae(device: torch.device) -> nn.Module:
    """The SD-VAE (sd-vae-ft-ema's architecture, ``encoders.SD_VAE_CONFIG``) with random weights."""
    from diffusers import AutoencoderKL

    from mtdiff.encoders import SD_VAE_CONFIG

    return AutoencoderKL(**SD_VAE_CONFIG).to(device).eval().requires_grad_(False)


def _vae_encode(batch: int, device: torch.device) -> Work:
    from mtdiff.encoders import encode_images_vae

    vae, images = random_vae(device), _images(batch)
    return (lambda: encode_images_vae(vae, images)), batch


def _vae_decode(batch: int, device: torch.device) -> Work:
    from mtdiff.config import LatentsConfig
    from mtdiff.encoders import decode_latents_vae

    vae, z = random_vae(device), torch.randn(batch, *LATENT_SHAPE)
    return (lambda: decode_latents_vae(vae, z, LatentsConfig().scale)), batch


def _dinov2(batch: int, device: torch.device) -> Work:
    import timm

    from mtdiff.encoders import image_preprocess

    model = timm.create_model(DINOV2, pretrained=False, num_classes=0, img_size=DINOV2_INPUT)
    model = model.to(device).eval().requires_grad_(False)
    preprocess, images = image_preprocess(model), _images(batch)
    return torch.no_grad()(lambda: model(preprocess(images))), batch


def _dit_setup(device: torch.device) -> Setup:
    config = "imagenet256-dit-b2"
    return Setup(config, bench_params(config), CONFIGS[config].num_classes, device, "fp32", None,
                 torch.get_num_threads())


def _train_step(batch: int, device: torch.device) -> Work:
    from mtdiff.bench.probes import synthetic_batch
    from mtdiff.train.step import TrainStep

    s = _dit_setup(device)
    model, diffusion = build(s)
    step = TrainStep(model, diffusion, s.params, device, generator=torch.Generator(device=device).manual_seed(0))
    data = synthetic_batch(s, batch, torch.Generator().manual_seed(0))
    return (lambda: step(data)), batch


def _sample_call(batch: int, device: torch.device) -> Work:
    """One sampler step of ``batch`` images (task guidance doubles the network's batch); img/s counts
    the images through the network."""
    s = _dit_setup(device)
    model, diffusion = build(s)
    model.eval().requires_grad_(False)
    given = sample_conditions(s, batch)
    sampler = Sampler.from_params(s.params, diffusion, steps=1)
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda _, args: forwards.append(args[0].shape[0]))

    def one_step() -> Any:
        with torch.no_grad():
            return sampler(model, (batch, *LATENT_SHAPE), given, tasks=s.params.tasks,
                           generator=torch.Generator().manual_seed(0))

    one_step()  # counts the network's images per step (guidance: 2 x batch)
    return one_step, sum(forwards)


def _inception(batch: int, device: torch.device) -> Work:
    net = random_inception().to(device)
    x = torch.from_numpy(_images(batch)).permute(0, 3, 1, 2).contiguous().to(device)
    return (lambda: net(x)), batch


BUILDERS: dict[str, Callable[[int, torch.device], Work]] = {
    "prepare": _prepare, "vae_encode": _vae_encode, "dinov2": _dinov2, "train_step": _train_step,
    "sample_call": _sample_call, "vae_decode": _vae_decode, "inception": _inception}


# -- running ---------------------------------------------------------------------------------------
def _peak_mb(device: torch.device) -> float:
    """CUDA: max allocated. CPU: this process's peak RSS, VmHWM (its own memory map's), not ru_maxrss,
    which Linux carries over exec from the parent that forked it (a pytest session's 1 GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(stage: str, batch: int, reps: int, threads: int, device_kind: str) -> dict[str, Any]:
    """In a fresh process: build the stage's work, one warm-up call, then the best of ``reps`` calls."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = pick_device(device_kind)
    if stage == "baseline":
        return {"stage": stage, "peak_mem_mb": _peak_mb(device)}
    work, images = BUILDERS[stage](batch, device)
    best = best_seconds(work, device, reps)
    return {"stage": stage, "what": STAGES[stage][0], "batch": batch, "images": images, "seconds": best,
            "img_per_s": images / best, "peak_mem_mb": _peak_mb(device)}


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and whether it has the bf16 matmul extensions."""
    info = precision.cpu_info()
    return {"cpu_model": info["model"], "avx512_bf16": "avx512_bf16" in info["flags"],
            "amx_bf16": "amx_bf16" in info["flags"]}


def run_stages(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage of ``args.stages`` (default all) in its own spawned process, in pipeline order."""
    threads = args.threads or torch.get_num_threads()
    device = pick_device(args.device)
    if args.reps < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError(f"--reps and --batch-size must be >= 1 (got {args.reps}, {args.batch_size})")
    chosen = set(args.stages or STAGES)
    if chosen - set(STAGES):
        raise ValueError(f"unknown stage(s) {sorted(chosen - set(STAGES))}; known: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in chosen]  # pipeline order
    rows = []
    # spawn, not fork: a fresh interpreter per stage (its own peak memory, no inherited OpenMP state)
    ctx = mp.get_context("spawn")
    for stage in ["baseline", *stages]:
        batch = args.batch_size or (STAGES[stage][1] if stage in STAGES else 0)
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rows.append(pool.submit(_measure, stage, batch, args.reps, threads, args.device).result())
    return {"bench": "stages", "device": device.type, "device_name": precision.device_name(device), **cpu_info(),
            "threads": threads, "reps": args.reps, "torch": torch.__version__, "baseline_mb": rows[0]["peak_mem_mb"],
            "rows": rows[1:]}


def format_stages(r: dict[str, Any]) -> str:
    kind = "peak RSS" if r["device"] == "cpu" else "max allocated"
    lines = [f"bench stages  device={r['device']} ({r['device_name']})  threads={r['threads']}  fp32  "
             f"best of {r['reps']} after a warm-up; {kind} of a process that only imports: "
             f"{r['baseline_mb']:.0f} MiB",
             f"  cpu: {r['cpu_model']}, avx512_bf16 {r['avx512_bf16']}, amx_bf16 {r['amx_bf16']} "
             f"(this bench runs fp32)",
             f"  {'stage':<12} {'work':<48} {'img/call':>8} {'s/call':>8} {'img/s':>8} {'peak MiB':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['stage']:<12} {row['what']:<48} {row['images']:>8} {row['seconds']:>8.3f} "
                     f"{row['img_per_s']:>8.2f} {row['peak_mem_mb']:>9.0f}")
    return "\n".join(lines)
