"""Benchmarks: ``mtdiff bench {train,data,sample}`` (``make bench`` runs ``train --quick``).

- ``train``: img/s, achieved FLOP/s and MFU (vs a dense matmul timed in the same run) of the real
  M5 training step, plus peak memory.
- ``data``: decode rates of the prepare stage, the training-shard reader vs in-memory tensors, and
  training fed by each; training from stored latents vs encoding with a VAE on the fly.
- ``sample``: images/s of ``MTDiffusion.sample`` at N steps.

Each prints a table, or with ``--json`` one JSON line (for scripts and CI).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mtdiff.config import ConfigError

COMMANDS = ("train", "data", "sample")


def build_parser() -> argparse.ArgumentParser:
    from mtdiff.bench import data as data_bench
    from mtdiff.bench import sample as sample_bench
    from mtdiff.bench import train as train_bench

    ap = argparse.ArgumentParser(prog="mtdiff bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    train_bench.add_arguments(sub.add_parser("train", help="training throughput and MFU"))
    data_bench.add_arguments(sub.add_parser("data", help="data pipeline throughput"))
    sample_bench.add_arguments(sub.add_parser("sample", help="sampling throughput"))
    return ap


def run(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` and run one benchmark; returns its result dict (no printing)."""
    args = build_parser().parse_args(argv)
    module = __import__(f"mtdiff.bench.{args.which}", fromlist=["main"])
    return module.main(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    module = __import__(f"mtdiff.bench.{args.which}", fromlist=["main", "format_result"])
    try:
        result = module.main(args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: mtdiff bench {args.which}: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in result.items() if k != "profile_table"}, default=str))
        if result.get("profile_table"):
            print(result["profile_table"], file=sys.stderr)
    else:
        print(module.format_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
