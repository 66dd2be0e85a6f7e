"""``mtdiff bench sample``: images/s of ``MTDiffusion.sample`` with the default model at N steps.

The model is the one ``build_model`` makes from params (random weights unless ``--checkpoint``):
sampling cost does not depend on the weights. Conditioning follows ``sample.condition``.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mtdiff.bench import common as C
from mtdiff.bench.train import device_name

QUICK_NUM, QUICK_STEPS = 32, 10


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_NUM} images, {QUICK_STEPS} steps")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default sample.steps)")
    ap.add_argument("--num", type=int, default=None, help="images in the batch (default sample.batch_size)")
    ap.add_argument("--sampler", default=None, choices=("ddpm", "ddim"), help="default sample.sampler")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast dtype of the network (auto: train.precision on CUDA, fp32 on CPU)")
    ap.add_argument("--config", default="default", choices=C.CONFIGS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--checkpoint", default=None, help="load EMA weights from this checkpoint")
    ap.add_argument("--params", default=None)
    ap.add_argument("overrides", nargs="*", help="params overrides key.sub=value")


def _given(params, num: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What the sample stage conditions on (only label-type conditions need no test data)."""
    cond = params.sample.condition
    if cond == "label":
        return {"label": (torch.arange(num) % C.num_classes(params)).to(device)}
    if cond in ("masked", "transition"):
        c, h, w = C.data_shape(params)
        x = torch.rand(num, c, h, w).mul_(2).sub_(1)
        if cond == "masked":
            from mtdiff.data import random_patch_mask

            x = x * random_patch_mask(num, (c, h, w), params.tasks.masked.mask_ratio, params.model.patch_size)
        return {cond: x.to(device)}
    return {}


class _Autocast(torch.nn.Module):
    """Runs the wrapped model under autocast (``sample`` calls ``model(z, t)`` and ``model.aggregate``)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
        super().__init__()
        self.model, self.device, self.dtype = model, device, dtype

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        with C.autocast(self.device, self.dtype):
            return self.model(z, t)

    def aggregate(self, *a, **k):
        return self.model.aggregate(*a, **k)

    @property
    def task_names(self):
        return self.model.task_names


@C.keeps_threads
def run_sample_bench(*, config: str = "default", steps: int | None = None, num: int | None = None,
                     sampler: str | None = None, device: str = "auto", dtype: str = "auto",
                     threads: int | None = None, quick: bool = False, checkpoint: str | None = None,
                     params_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    machine, params, n_threads, dev, dt = C.setup_bench(config, params_path, overrides, threads, device, dtype)
    steps = steps or (QUICK_STEPS if quick else params.sample.steps)
    num = num or (QUICK_NUM if quick else params.sample.batch_size)
    sampler = sampler or params.sample.sampler
    if num < 1 or steps < 1:
        raise ValueError(f"--num and --steps must be >= 1 (got {num}, {steps})")

    from mtdiff.models import flops_per_image

    torch.manual_seed(params.seed)
    with C.peak_memory(dev) as mem:
        if checkpoint:
            from mtdiff.checkpoint import load_for_inference

            model, diffusion, _ = load_for_inference(params, checkpoint, device=dev)
        else:
            model, diffusion = C.build(params, dev)
        model.eval().requires_grad_(False)
        fwd_flops = float(flops_per_image(model))
        net = _Autocast(model, dev, C.amp_dtype(dev, dt))
        shape = (num, *C.data_shape(params))
        given = _given(params, num, dev)

        def once(n_steps: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator(device="cpu").manual_seed(params.seed)
            return diffusion.sample(net, shape, given=given, steps=n_steps, sampler=sampler,
                                    eta=params.sample.eta, generator=gen, tasks_cfg=params.tasks, device=dev)

        once(min(2, steps))  # warm-up: allocator, oneDNN / cuBLAS plans
        C.sync(dev)
        t0 = time.perf_counter()
        out = once(steps)
        C.sync(dev)
        elapsed = time.perf_counter() - t0
    if not torch.isfinite(out["z0"]).all():
        raise RuntimeError("bench sample: the samples are not finite")
    peak = C.matmul_peak(dev, dt, reps=3)
    img_per_s = num / elapsed
    achieved = fwd_flops * steps * img_per_s  # one forward per step (no CFG)
    return {
        "bench": "sample", "config": config, "device": dev.type, "device_name": device_name(dev), "dtype": dt,
        "threads": n_threads, "num": num, "steps": steps, "sampler": sampler,
        "condition": params.sample.condition, "weights": checkpoint or "random init",
        "params": C.count_params(model), "seconds": elapsed, "img_per_s": img_per_s,
        "ms_per_step": elapsed / steps * 1e3, "flops_per_img": fwd_flops,
        "achieved_flops": achieved, "matmul_flops": peak["matmul_flops"], "mfu": achieved / peak["matmul_flops"],
        **mem, "load_avg_1m_before": machine["load_avg_1m"], "omp_env": machine["omp_env"],
        "warning": C.busy_warning(machine, n_threads),
    }


def format_result(r: dict[str, Any]) -> str:
    return "\n".join([
        f"bench sample  config={r['config']}  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  "
        f"threads={r['threads']}",
        f"  model       {r['params']:,} params ({r['weights']}), condition {r['condition']}, sampler {r['sampler']}",
        f"  batch       {r['num']} images x {r['steps']} steps in {r['seconds']:.2f} s "
        f"({r['ms_per_step']:.0f} ms/step)",
        f"  throughput  {r['img_per_s']:.2f} img/s at {r['steps']} steps "
        f"({r['img_per_s'] * r['steps']:.0f} network evaluations x img / s)",
        f"  MFU         {r['mfu']:.3f}  ({C.fmt_si(r['achieved_flops'], 'FLOP/s')} = forward FLOPs/img x steps x img/s;"
        f" matmul peak {C.fmt_si(r['matmul_flops'], 'FLOP/s')})",
        f"  peak memory {r['peak_mem_mb']:.0f} MiB ({r['peak_mem_kind']})",
    ] + ([f"  {r['warning']}"] if r.get("warning") else []))


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_sample_bench(config=args.config, steps=args.steps, num=args.num, sampler=args.sampler,
                            device=args.device, dtype=args.dtype, threads=args.threads, quick=args.quick,
                            checkpoint=args.checkpoint, params_path=args.params, overrides=args.overrides)
