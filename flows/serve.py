"""Serve the scheduled deployments from this process (no work pool needed).

    python -m flows.serve            # nightly pipeline at 02:00, weekly task sweep Sunday 03:00

Needs a Prefect server (``prefect server start --host 127.0.0.1`` and
``PREFECT_API_URL=http://127.0.0.1:4200/api``), else Prefect uses a temporary one that lives only as
long as this process. The deployments (schedules, parameters, tags, concurrency limits) are read from
prefect.yaml, which also registers them for a work pool (``prefect deploy --all``): one definition.
"""
from __future__ import annotations

import flows.pipeline as fp  # first: sets the Prefect env defaults before prefect is imported

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import serve

import flows
from flows.sweep import sweep

PREFECT_YAML = flows.REPO_ROOT / "prefect.yaml"  # the one definition of the deployments
FLOWS = {"flows/pipeline.py:pipeline": fp.pipeline, "flows/sweep.py:sweep": sweep}


def deployment_specs(path: Path = PREFECT_YAML) -> dict[str, dict[str, Any]]:
    """prefect.yaml's deployments by name: what serving and a work pool (`prefect deploy`) both use."""
    return {d["name"]: d for d in yaml.safe_load(path.read_text())["deployments"]}


def _concurrency(spec: dict[str, Any]) -> Any:
    """prefect.yaml's ``concurrency_limit``: a number, or ``{limit, collision_strategy}``."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    value = spec.get("concurrency_limit")
    return ConcurrencyLimitConfig(**value) if isinstance(value, dict) else value


def deployments(timezone: str | None = None) -> list[Any]:
    """prefect.yaml's deployments (nightly pipeline, weekly tasks sweep) as runner deployments: same
    schedules, parameters, tags and concurrency limits; ``timezone`` replaces the schedules' own."""
    from prefect.schedules import Cron

    out = []
    for name, spec in deployment_specs().items():
        schedules = [Cron(s["cron"], timezone=timezone or s.get("timezone", "UTC")) for s in spec.get("schedules", [])]
        out.append(FLOWS[spec["entrypoint"]].to_deployment(
            name=name, schedules=schedules, parameters=spec.get("parameters") or {},
            description=spec.get("description"), tags=spec.get("tags"), concurrency_limit=_concurrency(spec)))
    return out


_SPECS = deployment_specs()
NIGHTLY_CRON = _SPECS["nightly"]["schedules"][0]["cron"]
WEEKLY_CRON = _SPECS["weekly-tasks-sweep"]["schedules"][0]["cron"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timezone", default=os.environ.get("MTDIFF_SCHEDULE_TZ"),
                        help="timezone of the cron schedules (default: prefect.yaml's, UTC)")
    args = parser.parse_args(argv)
    serve(*deployments(args.timezone))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
