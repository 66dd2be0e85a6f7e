"""Prefect flows that orchestrate the DVC pipeline (``flows.pipeline``), sweeps of DVC experiments
(``flows.sweep``) and their schedules (``flows.serve``, ``prefect.yaml``).

Prefect's settings live in ``prefect.toml`` (Prefect reads it from the working directory). Importing
this package sets, where not set already, only what that file cannot hold (see ``ENV_DEFAULTS``), and
prefect.toml's settings when a flow starts outside the repo root. Every flow module imports it first,
before ``prefect``.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_TOML = REPO_ROOT / "prefect.toml"

ENV_DEFAULTS = {
    # absolute: Prefect's state stays in this checkout wherever a flow starts (a relative home in
    # prefect.toml would follow the working directory)
    "PREFECT_HOME": str(REPO_ROOT / ".prefect"),
    # not Prefect settings: read from the environment by Prefect's telemetry check, DVC, git and the
    # stage subprocesses
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "PYTHONUNBUFFERED": "1",
}


def prefect_toml_env(path: Path = PREFECT_TOML) -> dict[str, str]:
    """prefect.toml's settings as Prefect's environment variables (``[server.ephemeral]
    startup_timeout_seconds`` -> ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``)."""
    def walk(table: dict[str, Any], prefix: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in table.items():
            name = f"{prefix}_{key}".upper()
            if isinstance(value, dict):
                out.update(walk(value, name))
            else:
                out[name] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    return walk(tomllib.loads(path.read_text()), "PREFECT")


def set_env_defaults() -> None:
    defaults = dict(ENV_DEFAULTS)
    if Path.cwd().resolve() != REPO_ROOT:  # Prefect reads ./prefect.toml only
        defaults.update(prefect_toml_env())
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


set_env_defaults()
