"""Prefect flows that orchestrate the DVC pipeline (``flows.pipeline``), sweeps of DVC experiments
(``flows.sweep``) and their schedules (``flows.serve``, ``prefect.yaml``).

Importing this package first sets in-repo, telemetry-off defaults for what is not set already, so
Prefect's state (``PREFECT_HOME``) lands in ``<repo>/.prefect`` and nothing is sent anywhere. This
must happen before ``prefect`` is imported, which is why every flow module imports it first.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

ENV_DEFAULTS = {
    "PREFECT_HOME": str(REPO_ROOT / ".prefect"),
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "PYTHONUNBUFFERED": "1",
    # the temporary API server Prefect starts when none is configured needs more than the default 20 s
    # on a busy 2-core machine (its first start also migrates its database)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def set_env_defaults() -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


set_env_defaults()
