"""One module per DVC stage. Each has ``run(params) -> dict`` (callable from Python) and
``main(argv)`` for ``python -m mtdiff.stages.<name> [key.sub=value ...]``."""
from __future__ import annotations

import errno
import sys
from typing import Any, Callable

from mtdiff.config import REPO_ROOT, ConfigError, Params, load_params, params_help
from mtdiff.train.preemption import PREEMPTED_EXIT_CODE, Preempted

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def stage_main(run: Callable[[Params], Any], argv: list[str] | None = None) -> Any:
    """Load params (with ``key=value`` overrides from argv) and call ``run``.

    A bad param, and any :class:`ConfigError` the stage raises (``CheckpointError`` for a corrupt
    checkpoint, ``OutputError`` for an output folder it may not replace), exits 2 with one line:
    retrying cannot help, so the flow does not retry exit 2. So do unreadable input data
    (:class:`~mtdiff.sources.DataSourceError`, a ConfigError) and a full disk or file-size limit (ENOSPC, EFBIG,
    EDQUOT: outputs are written atomically, so the previous ones stay). A training stopped by a signal
    (:class:`~mtdiff.train.preemption.Preempted`) exits :data:`~mtdiff.train.preemption.PREEMPTED_EXIT_CODE` with one line.
    """
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(stage_help(run))
        raise SystemExit(0)
    try:
        params = load_params(overrides=argv)
        return run(params)
    except ConfigError as err:  # also DataSourceError (bad input data), CheckpointError, OutputError
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {err.strerror or err} (the previous outputs are kept)", file=sys.stderr)
        raise SystemExit(2) from None
    except Preempted as stop:  # SIGTERM / SIGINT / SIGUSR1 during training: state saved, rerun resumes
        print(f"preempted: {stop}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None


def stage_param_keys(stage: str) -> list[str]:
    """The params a stage reads, as dvc.yaml lists them for it (its ``params:``; all sections when
    the stage or dvc.yaml is not there)."""
    import yaml

    try:
        spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]
        return [p for p in spec.get("params", []) if isinstance(p, str)]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return list(Params.model_fields)


def stage_help(run: Callable[[Params], Any]) -> str:
    """``python -m mtdiff.stages.<stage> --help`` for the stage of ``run``: usage, the stage's summary
    and the params it reads, each with the value it would run with now and one line on what it means."""
    spec = run.__globals__.get("__spec__")  # under `python -m` the module is __main__; its spec has the name
    stage = (spec.name if spec else run.__module__).rsplit(".", 1)[-1]
    summary = (run.__globals__.get("__doc__") or "").strip().split("\n\n", 1)[0]
    try:
        values = load_params().flat()
        origin = "params.yaml + its profile"
    except ConfigError:  # still show the help when params.yaml is broken
        values, origin = Params().flat(), "built-in defaults (params.yaml does not load)"
    return (f"usage: python -m mtdiff.stages.{stage} [key.sub=value ...]\n\n{summary}\n\n"
            f"params it reads (dvc.yaml), with the values from {origin}; key=value overrides one:\n"
            f"{params_help(stage_param_keys(stage), values)}\n\n"
            f"`mtdiff config --explain KEY` says more about one key.")
