"""One module per DVC stage. Each has ``run(params) -> dict`` (callable from Python) and
``main(argv)`` for ``python -m mtdiff.stages.<name> [key.sub=value ...]``."""
from __future__ import annotations

import errno
import sys
from typing import Any, Callable

from mtdiff.config import ConfigError, Params, load_params
from mtdiff.preemption import PREEMPTED_EXIT_CODE, Preempted

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def stage_main(run: Callable[[Params], Any], argv: list[str] | None = None) -> Any:
    """Load params (with ``key=value`` overrides from argv) and call ``run``.

    A bad param, and any :class:`ConfigError` the stage raises (``CheckpointError`` for a corrupt
    checkpoint, ``OutputError`` for an output folder it may not replace), exits 2 with one line:
    retrying cannot help, so the flow does not retry exit 2. So do unreadable input data
    (:class:`~mtdiff.sources.DataSourceError`, a ConfigError) and a full disk or file-size limit (ENOSPC, EFBIG,
    EDQUOT: outputs are written atomically, so the previous ones stay). A training stopped by a signal
    (:class:`~mtdiff.preemption.Preempted`) exits :data:`~mtdiff.preemption.PREEMPTED_EXIT_CODE` with one line.
    """
    argv = sys.argv[1:] if argv is None else argv
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
