"""One module per DVC stage. Each has ``run(params) -> dict`` (callable from Python) and
``main(argv)`` for ``python -m mtdiff.stages.<name> [key.sub=value ...]``."""
from __future__ import annotations

import sys
from typing import Any, Callable

from mtdiff.config import ConfigError, Params, load_params


def stage_main(run: Callable[[Params], Any], argv: list[str] | None = None) -> Any:
    """Load params (with ``key=value`` overrides from argv) and call ``run``; a bad param exits 2 with one line."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        params = load_params(overrides=argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(params)
