"""Serve the scheduled deployments from this process (no work pool needed).

    python -m flows.serve            # nightly pipeline at 02:00, weekly task sweep Sunday 03:00

Needs a Prefect server (``prefect server start --host 127.0.0.1`` and
``PREFECT_API_URL=http://127.0.0.1:4200/api``), else Prefect uses a temporary one that lives only as
long as this process. The same schedules for a work pool live in prefect.yaml (``prefect deploy --all``).
"""
from __future__ import annotations

import flows.pipeline as fp  # first: sets the Prefect env defaults before prefect is imported

import argparse
import os
from typing import Any

from prefect import serve

from flows.sweep import sweep

NIGHTLY_CRON = "0 2 * * *"
WEEKLY_CRON = "0 3 * * 0"
TIMEZONE = os.environ.get("MTDIFF_SCHEDULE_TZ", "UTC")
SWEEP_CONFIG = "configs/sweeps/tasks.yaml"
CONCURRENCY_LIMIT = 1  # one run per deployment at a time, as `concurrency_limit: 1` in prefect.yaml


def deployments(timezone: str = TIMEZONE) -> list[Any]:
    """The nightly pipeline and the weekly tasks sweep as runner deployments."""
    from prefect.schedules import Cron

    return [
        fp.pipeline.to_deployment(
            name="nightly", schedule=Cron(NIGHTLY_CRON, timezone=timezone),
            description="Nightly `dvc repro` of the mtdiff pipeline (unchanged stages are skipped by DVC).",
            tags=["mtdiff", "pipeline"], concurrency_limit=CONCURRENCY_LIMIT),
        sweep.to_deployment(
            name="weekly-tasks-sweep", schedule=Cron(WEEKLY_CRON, timezone=timezone),
            parameters={"config": SWEEP_CONFIG},
            description="Weekly sweep: single-task vs multi-task MT-Diffusion at the same budget.",
            tags=["mtdiff", "sweep"], concurrency_limit=CONCURRENCY_LIMIT),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timezone", default=TIMEZONE, help="timezone of the cron schedules (default UTC)")
    args = parser.parse_args(argv)
    serve(*deployments(args.timezone))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
