"""``mtdiff bench sample``: images/s of the sample stage's ``Sampler`` at N steps.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mtdiff.checkpoint import load_for_inference
from mtdiff.data import random_patch_mask
from mtdiff.diffusion import Sampler
from mtdiff.models import count_params, flops_per_image
from mtdiff.precision import autocast, device_name
from mtdiff.utils import derive_seed
from mtdiff.bench.probes import MatmulProbe, Setup, build, fmt_si, peak_memory, setup, sync

QUICK_SAMPLE_NUM, QUICK_SAMPLE_STEPS = 32, 10
SAMPLE_STEPS = 50  # bench sample's default: the usual figure (DiT, ADM report 50-step DDIM/DDPM sampling)


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
    """Time one the sample stage's ``Sampler`` of ``--num`` images at ``--steps`` steps after a short warm-up."""
    s = setup(args)
    sc = s.params.sample
    steps = args.steps or (QUICK_SAMPLE_STEPS if args.quick else SAMPLE_STEPS)
    num = args.num or (QUICK_SAMPLE_NUM if args.quick else sc.batch_size)
    step = args.sampler or sc.sampler
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
            run = Sampler.from_params(s.params, diffusion, step=step, steps=n_steps)  # as the sample stage runs it
            with autocast(s.device, s.amp_dtype):
                return run(model, (num, *s.shape), given, tasks=s.params.tasks, generator=generator)

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
        "dtype": s.dtype, "threads": s.threads, "num": num, "steps": steps, "sampler": step,
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
