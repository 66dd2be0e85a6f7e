"""Benchmarks: ``mtdiff bench train|sample|stages`` (``make bench`` runs ``train --quick``).

- ``train``: img/s, achieved FLOP/s and MFU of :class:`mtdiff.train.TrainStep` (the train
  stage's own step) on synthetic batches of the real shape, plus peak memory.
- ``sample``: images/s of the sample stage's ``Sampler`` at N steps.
- ``smoke``: the ImageNet-256 profile at real size on this device (``make gpu-smoke``): train steps,
  every later stage's throughput and the projected wall time of the profile's budget.
- ``stages``: img/s and peak memory of each ImageNet-256 stage's work with the real architectures
  (JPEG decode, SD-VAE, DINOv2, DiT-B/2 train step and sampler call, Inception), random weights.

MFU = achieved FLOP/s / dense-matmul FLOP/s, both measured in this run on this device, dtype and
thread count (not a datasheet peak). Achieved FLOP/s counts 3 x the analytic forward FLOPs per
image (``mtdiff.models.flops_per_image``: forward 1x, backward 2x) x img/s; the optimizer, norms
and elementwise work are not counted, so they show up as lost MFU. torch's FlopCounterMode
cross-checks the analytic count. Each benchmark prints a table, or with ``--json`` one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from mtdiff.config import ConfigError
from mtdiff.diffusion.sampler import STEPS
from mtdiff.bench.probes import CONFIGS, DTYPES, MATMUL_N, fmt_si
from mtdiff.precision import cpu_bf16_units
from mtdiff.bench.sample import QUICK_SAMPLE_STEPS, SAMPLE_STEPS, format_sample, run_sample
from mtdiff.bench.smoke import SMOKE_SAMPLE_STEPS, format_smoke, run_smoke
from mtdiff.bench.stages import STAGES, format_stages, run_stages
from mtdiff.bench.train import FULL_STEPS, FULL_WARMUP, QUICK_STEPS, QUICK_WARMUP, format_train, run_train

# -- command line ----------------------------------------------------------------------------------
BENCHMARKS = {"train": (run_train, format_train), "sample": (run_sample, format_sample),
              "smoke": (run_smoke, format_smoke), "stages": (run_stages, format_stages)}


def _common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="a few seconds: small step/image counts")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                    help="autocast dtype (auto: the stage's, from train.precision)")
    ap.add_argument("--compare", action="store_true",
                    help="run fp32, bf16 and (train) bf16 + torch.compile one after another and print them side by side")
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
    sample.add_argument("--sampler", default=None, choices=STEPS, help="default sample.sampler")
    sample.add_argument("--checkpoint", default=None, help="load EMA weights from this checkpoint")
    smoke = sub.add_parser("smoke", help="the ImageNet-256 profile at real size: throughput and projected cost")
    smoke.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    smoke.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    smoke.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="autocast dtype (auto: train.precision on CUDA, fp32 on CPU)")
    smoke.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    smoke.add_argument("--params", default=None, help="params file (default params.yaml)")
    smoke.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="torch.compile the model (the profile's train.compile; default on)")
    smoke.add_argument("--steps", type=int, default=None, help="timed train steps (default 200 on CUDA, 2 on CPU)")
    smoke.add_argument("--batch-size", type=int, default=None, help="default: the profile's train / sample batch")
    smoke.add_argument("--sample-steps", type=int, default=SMOKE_SAMPLE_STEPS, help="sampler steps timed")
    smoke.add_argument("overrides", nargs="*", help="params overrides key.sub=value")
    stages = sub.add_parser("stages", help="img/s and peak memory of each ImageNet-256 stage (real architectures)")
    stages.add_argument("stages", nargs="*", metavar="STAGE", help=f"default all: {', '.join(STAGES)}")
    stages.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    stages.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    stages.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    stages.add_argument("--reps", type=int, default=2, help="timed calls per stage after one warm-up (best is kept)")
    stages.add_argument("--batch-size", type=int, default=None, help="images per call for every stage "
                        "(default: each stage's own)")
    return ap


def run(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` and run one benchmark; returns its result dict (no printing)."""
    return _run(build_parser().parse_args(argv))


# what --compare runs, in order: (label, dtype, torch.compile)
COMPARE = {"train": (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+compile", "bf16", True)),
           "sample": (("fp32", "fp32", False), ("bf16", "bf16", False))}


def _run(args: argparse.Namespace) -> dict[str, Any]:
    threads = torch.get_num_threads()  # benchmarks also run in-process (tests): leave torch as found
    try:
        if getattr(args, "compare", False):
            return _compare(args)
        return BENCHMARKS[args.which][0](args)
    finally:
        torch.set_num_threads(threads)


def _compare(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark at each of :data:`COMPARE`'s settings in one process, one after another."""
    rows = []
    for label, dtype, compiled in COMPARE[args.which]:
        variant = argparse.Namespace(**{**vars(args), "dtype": dtype, "compare": False, "profile": False})
        if args.which == "train":
            variant.compile = compiled
        result = BENCHMARKS[args.which][0](variant)
        result.pop("profile_table", None)
        rows.append({"variant": label, **result})
    return {"bench": f"{args.which}-compare", "rows": rows}


def format_compare(r: dict[str, Any]) -> str:
    rows, base = r["rows"], r["rows"][0]["img_per_s"]
    head = rows[0]
    lines = [f"bench {r['bench']}  config={head['config']}  device={head['device']} ({head['device_name']})  "
             f"threads={head['threads']}  bf16 units: {cpu_bf16_units() or 'none'}",
             f"  {'variant':<14}{'img/s':>10}{'vs fp32':>9}{'MFU':>7}  {'matmul peak (own dtype)':>24}{'peak MiB':>10}"]
    for row in rows:
        lines.append(f"  {row['variant']:<14}{row['img_per_s']:>10.1f}{row['img_per_s'] / base:>8.2f}x"
                     f"{row['mfu']:>7.3f}  {fmt_si(row['matmul_flops'], 'FLOP/s'):>24}{row['peak_mem_mb']:>10.0f}")
    return "\n".join(lines)


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
        fmt = format_compare if result.get("rows") else BENCHMARKS[args.which][1]
        print(fmt(result) + (f"\n\n{table}" if table else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
