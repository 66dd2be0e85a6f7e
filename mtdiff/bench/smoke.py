"""``mtdiff bench smoke`` (``make gpu-smoke``): what a GPU user runs first. A few hundred training
steps of the ImageNet-256 profile at its real size (DiT-B/2 on 4x32x32 SD-VAE latents, the profile's
batch, precision and compile), then the throughput of every later stage on the same device, and the
projected wall time of the profile's whole budget on 1, 8 and 64 GPUs.

Measured here: the train step (img/s, MFU against the bf16 matmul timed in the same run, peak
memory), the sampler's network calls (img/s per call at the profile's batch, guidance included),
the SD-VAE decoder (diffusers ``AutoencoderKL`` in sd-vae-ft-ema's architecture) and the FID network
(torch-fidelity's Inception-v3, resizing to 299 px). Weights are random: throughput does not depend
on their values, and no download is needed.

Projected: the profile's ``train.steps`` at the measured img/s; ``sample.num_samples`` x
``sample.steps`` network calls; one VAE decode and one Inception forward per sample. Across GPUs the
training is scaled by an assumed data-parallel efficiency (:data:`SCALING_EFFICIENCY`, stated in the
output: measure yours); sampling and evaluation shard without communication (torchrun ranks).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from mtdiff.bench.probes import best_seconds, fmt_si, peak_memory, setup
from mtdiff.bench.sample import run_sample
from mtdiff.bench.stages import RESOLUTION, random_inception, random_vae
from mtdiff.bench.train import run_train

SMOKE_CONFIG = "imagenet256"
SMOKE_STEPS = {"cuda": 200, "cpu": 2}  # timed train steps: a few hundred on a GPU, a token on CPU
SMOKE_SAMPLE_STEPS = 10  # sampler steps timed; the profile's count is projected (each step costs the same)
GPU_COUNTS = (1, 8, 64)
# Assumed data-parallel efficiency of training (img/s per GPU relative to one GPU): DiT-B/2's 130M
# parameters all-reduce in a few ms over NVLink (8 GPUs, one node) and tens of ms over a cluster network.
SCALING_EFFICIENCY = {1: 1.0, 8: 0.9, 64: 0.75}
TIMED_REPS = {"cuda": 3}


def _timed_rate(fn: Callable[[], Any], items: int, device: torch.device) -> float:
    """Items per second of ``fn`` (a few timed calls on a GPU, one on CPU: seconds each)."""
    return items / best_seconds(fn, device, TIMED_REPS.get(device.type, 1))


def vae_decode_rate(device: torch.device, amp: torch.dtype | None, batch: int, latent_hw: int) -> dict[str, Any]:
    """img/s of the SD-VAE decoder (real architecture, random weights) on ``batch`` latents."""
    vae = random_vae(device)
    z = torch.randn(batch, 4, latent_hw, latent_hw, device=device)
    with peak_memory(device) as mem, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        rate = _timed_rate(lambda: vae.decode(z).sample, batch, device)
    return {"vae_decode_img_per_s": rate, "vae_decode_batch": batch, "vae_peak_mem_mb": mem["peak_mem_mb"]}


def inception_rate(device: torch.device, batch: int) -> dict[str, Any]:
    """img/s of the FID network (torch-fidelity's Inception-v3, random weights) on 256 px uint8 samples."""
    net = random_inception().to(device)
    x = torch.randint(0, 256, (batch, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, device=device)
    with torch.no_grad():
        rate = _timed_rate(lambda: net(x), batch, device)
    return {"inception_img_per_s": rate, "inception_batch": batch}


def _namespace(args: argparse.Namespace, **kw: Any) -> argparse.Namespace:
    base = dict(quick=False, device=args.device, dtype=args.dtype, config=SMOKE_CONFIG, threads=args.threads,
                params=args.params, overrides=args.overrides)
    return argparse.Namespace(**{**base, **kw})


def projection(params, train: dict[str, Any], sample: dict[str, Any], rates: dict[str, Any]) -> dict[str, Any]:
    """Hours for the profile's whole budget on 1 GPU, and on each of :data:`GPU_COUNTS`."""
    tc, sc, ec = params.train, params.sample, params.evaluate
    calls_per_image = sample["network_images"] / (sample["num"] * sample["steps"])  # guidance doubles it
    call_rate = sample["num"] * sample["steps"] * calls_per_image / sample["seconds"]  # network img/s
    hours = {
        "train": tc.steps * tc.batch_size / train["img_per_s"] / 3600,
        "sample": sc.num_samples * sc.steps * calls_per_image / call_rate / 3600,
        "decode": sc.num_samples / rates["vae_decode_img_per_s"] / 3600,
        "fid_features": ec.num_samples / rates["inception_img_per_s"] / 3600,
    }
    per_gpus = {}
    for n in GPU_COUNTS:
        train_h = hours["train"] / (n * SCALING_EFFICIENCY[n])
        rest_h = (hours["sample"] + hours["decode"] + hours["fid_features"]) / n
        per_gpus[n] = {"train_h": train_h, "sample_eval_h": rest_h, "total_h": train_h + rest_h}
    train_flops = 3 * train["flops_per_img"] * tc.steps * tc.batch_size
    return {"hours_1gpu": hours, "per_gpus": per_gpus, "train_flops_total": train_flops,
            "calls_per_image": calls_per_image, "network_img_per_s": call_rate,
            "budget": {"train.steps": tc.steps, "train.batch_size": tc.batch_size,
                       "sample.num_samples": sc.num_samples, "sample.steps": sc.steps,
                       "evaluate.num_samples": ec.num_samples}}


def run_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Train steps, then each later stage's throughput, then the projection; returns the result dict."""
    s = setup(_namespace(args))
    steps = args.steps or SMOKE_STEPS.get(s.device.type, SMOKE_STEPS["cpu"])
    train = run_train(_namespace(args, compile=args.compile, batch_size=args.batch_size, steps=steps,
                                 warmup=None, no_ema=False, matmul_n=None, profile=False))
    num = args.batch_size or s.params.sample.batch_size
    sample = run_sample(_namespace(args, steps=args.sample_steps, num=num, sampler=None, checkpoint=None))
    latent_hw = s.shape[1]
    rates = {**vae_decode_rate(s.device, s.amp_dtype, min(num, 64), latent_hw),
             **inception_rate(s.device, min(num, 250))}
    return {"bench": "smoke", "config": SMOKE_CONFIG, "device": s.device.type, "device_name": train["device_name"],
            "dtype": train["dtype"], "train": train, "sample": sample, **rates,
            "projection": projection(s.params, train, sample, rates),
            "scaling_efficiency_assumed": SCALING_EFFICIENCY, "torch": torch.__version__}


def format_smoke(r: dict[str, Any]) -> str:
    t, s, p = r["train"], r["sample"], r["projection"]
    h, b = p["hours_1gpu"], p["budget"]
    lines = [
        f"bench smoke  profile={r['config']}  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  "
        f"torch {r['torch']}",
        f"  model        {t['params']:,} params, input {tuple(t['input_shape'])}, tasks {t['tasks']}, "
        f"{fmt_si(t['flops_per_img'], 'FLOP')}/img forward",
        f"  train        {t['img_per_s']:.4g} img/s at batch {t['batch_size']} (compile={t['compile']}; "
        f"{t['steps']} timed steps after {t['warmup']} warm-up, {t['warmup_s']:.0f} s), loss {t['loss']:.4f}",
        f"  MFU          {t['mfu']:.3f} against the {t['matmul_dtype']} matmul peak measured here "
        f"({fmt_si(t['matmul_flops'], 'FLOP/s')}); achieved {fmt_si(t['achieved_flops'], 'FLOP/s')}",
        f"  peak memory  {t['peak_mem_mb']:.0f} MiB ({t['peak_mem_kind']})",
        f"  sampler      {p['network_img_per_s']:.4g} network img/s at batch {s['num']} "
        f"({p['calls_per_image']:.0f} calls per image-step: guidance), {s['sampler']}",
        f"  VAE decode   {r['vae_decode_img_per_s']:.4g} img/s at 256 px (batch {r['vae_decode_batch']}); "
        f"FID network {r['inception_img_per_s']:.4g} img/s (torch-fidelity Inception, fp32)",
        f"projected for the profile's budget: {b['train.steps']:,} steps x batch {b['train.batch_size']} "
        f"({fmt_si(p['train_flops_total'], 'FLOP')}), {b['sample.num_samples']:,} samples x {b['sample.steps']} "
        f"steps, FID on {b['evaluate.num_samples']:,}",
        f"  1 GPU        train {h['train']:.1f} h, sample {h['sample']:.2f} h, decode {h['decode']:.2f} h, "
        f"FID features {h['fid_features']:.2f} h",
    ]
    for n, row in p["per_gpus"].items():
        lines.append(f"  {n:>2} GPU{'s' if n > 1 else ' '}      total {row['total_h']:.1f} h  (train {row['train_h']:.1f} h "
                     f"at an assumed {r['scaling_efficiency_assumed'][n]:.0%} scaling efficiency; "
                     f"sample + evaluate {row['sample_eval_h']:.2f} h)")
    return "\n".join(lines)
