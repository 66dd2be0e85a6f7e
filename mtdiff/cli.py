"""The ``mtdiff`` console script.

    mtdiff stage <name> [key=value ...]   run one pipeline stage (same as python -m mtdiff.stages.<name>)
    mtdiff config [key=value ...]         print the validated, merged params
    mtdiff bench {train,sample} ...       benchmarks (see mtdiff.bench)
"""
from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from mtdiff.config import ConfigError, load_params

STAGES = ("prepare", "latents", "representations", "train", "sample", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from mtdiff import bench  # lazy: torch and the model code load only for benchmarks

        return bench.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="mtdiff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage", help="run one pipeline stage")
    st.add_argument("name", choices=STAGES)
    st.add_argument("overrides", nargs="*", help="key.sub=value")
    cfg = sub.add_parser("config", help="print the validated params")
    cfg.add_argument("overrides", nargs="*")
    sub.add_parser("bench", help="benchmarks: mtdiff bench {train,sample} --help")
    args = parser.parse_args(argv)
    try:
        if args.command == "config":
            print(yaml.safe_dump(load_params(overrides=args.overrides).model_dump(), sort_keys=False))
            return 0
        module = importlib.import_module(f"mtdiff.stages.{args.name}")
        module.main(args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
