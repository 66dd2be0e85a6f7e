"""The ``mtdiff`` console script: one entry point for the pipeline, its stages and its tools.

    mtdiff run [--stages a,b] [--force] [key=value ...]   the whole pipeline: the Prefect flow running
                                          each DVC stage under one MLflow run (= python -m flows.pipeline)
    mtdiff sweep [CONFIG] [--points a,b] [--dry-run]       a sweep, one `dvc exp run` per point, and its
                                          comparison report (= python -m flows.sweep)
    mtdiff serve [--timezone TZ]          serve the nightly pipeline and weekly sweep schedules from this
                                          process (= python -m flows.serve)
    mtdiff replay FILE... [--uri URI]     send MLflow records kept while the tracking server was down
                                          (.mtdiff/mlflow_pending/<stage>.jsonl; = python -m mtdiff.pipeline.mlflow_replay)
    mtdiff stage <name> [key=value ...]   run one pipeline stage (= python -m mtdiff.stages.<name>)
    mtdiff config [key=value ...]         print the validated, merged params
    mtdiff config --explain KEY           what a param means, its type, default and the value that runs
    mtdiff bench {train,sample,stages,smoke} ... benchmarks (see mtdiff.bench)

`mtdiff <command> --help` shows the options of each.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from mtdiff import __version__
from mtdiff.config import ConfigError, Params, load_params, param_docs

DESCRIPTION = "MT-Diffusion as a DVC + Prefect + MLflow pipeline: the pipeline, its stages and its tools."
STAGES = ("prepare", "latents", "representations", "train", "sample", "evaluate")

# Commands handed on whole to an existing entry point: name -> (module, leading argv, help). The
# modules are imported only when their command runs (Prefect loads only for run/sweep/serve).
DELEGATED = {
    "run": ("flows.pipeline", [], "run the pipeline: a Prefect flow running each DVC stage (dvc repro) "
                                  "under one MLflow run (python -m flows.pipeline)"),
    "sweep": ("flows.sweep", [], "run a sweep (default configs/sweeps/tasks.yaml): one dvc exp run per "
                                 "point, then the comparison report (python -m flows.sweep)"),
    "serve": ("flows.serve", [], "serve the nightly pipeline and weekly sweep schedules from this process "
                                 "(python -m flows.serve)"),
    "replay": ("mtdiff.pipeline.mlflow_replay", [], "send MLflow records kept while the tracking server was down "
                                              "(.mtdiff/mlflow_pending/*.jsonl) to the tracking store"),
    "bench": ("mtdiff.bench", [], "benchmarks: mtdiff bench {train,sample,stages} --help"),
}


def delegate(command: str, argv: list[str]) -> int:
    """Run ``command`` with ``argv`` through its module's ``main`` (its own parser and --help)."""
    module_name, lead, _ = DELEGATED[command]
    module = importlib.import_module(module_name)
    return module.main([*lead, *argv]) or 0


def explain(key: str, overrides: list[str]) -> str:
    """``mtdiff config --explain KEY``: per param at or under KEY, its description, type, built-in
    default and the value that runs now (params.yaml + profile + ``overrides``)."""
    docs, defaults = param_docs(), Params().flat()
    keys = [k for k in docs if k == key or k.startswith(key + ".")]
    if not keys:
        raise ConfigError(f"no param {key!r}; sections: {', '.join(Params.model_fields)}")
    runs = load_params(overrides=overrides).flat()
    return "\n".join(f"{k}: {docs[k][1] or '(no description)'}\n  type {docs[k][0]}, default "
                     f"{defaults[k]!r}, runs with {runs[k]!r}" for k in keys)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return delegate(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="mtdiff", description=DESCRIPTION,
                                     epilog="`mtdiff <command> --help` shows the options of each.")
    parser.add_argument("--version", action="version", version=f"mtdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    st = sub.add_parser("stage", help="run one pipeline stage: mtdiff stage <name> [key=value ...]")
    st.add_argument("name", choices=STAGES)
    st.add_argument("overrides", nargs="*", help="key.sub=value")
    cfg = sub.add_parser("config", help="print the validated, merged params: mtdiff config [key=value ...]")
    cfg.add_argument("overrides", nargs="*")
    cfg.add_argument("--explain", metavar="KEY", help="what KEY (e.g. train.steps or train) means")
    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    args = parser.parse_args(argv)
    try:
        if args.command == "config" and args.explain:
            print(explain(args.explain, args.overrides))
            return 0
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
