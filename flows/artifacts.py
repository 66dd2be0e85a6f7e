"""Prefect artifacts of the mtdiff flows, shown in the Prefect UI on the flow run (Artifacts tab):

- pipeline: ``mtdiff-pipeline-metrics`` (table: every numeric metric of metrics/*.json, with the
  stage outcomes) and ``mtdiff-pipeline-mlflow`` (link to the pipeline's MLflow run);
- sweep: ``mtdiff-sweep-<name>`` (the comparison table, markdown, as in ``comparison.md``),
  ``mtdiff-sweep-<name>-table`` (the same rows as a table) and ``mtdiff-sweep-<name>-mlflow`` (link).

A failure to create an artifact is a warning, never a failed flow. The MLflow link points at the
tracking server for http(s) URIs, else at a local ``mlflow ui`` ($MTDIFF_MLFLOW_UI_URL, default
http://127.0.0.1:5000).
"""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger(__name__)

MLFLOW_UI_ENV = "MTDIFF_MLFLOW_UI_URL"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def mlflow_run_url(uri: str, run_id: Optional[str], experiment_id: Optional[str] = None) -> Optional[str]:
    """The MLflow UI page of ``run_id`` (None without a run); ``#/runs/<id>`` (the UI redirects to the
    run's experiment) when the experiment is not known without asking a tracking server."""
    if not run_id:
        return None
    remote = uri.startswith(("http://", "https://"))
    if experiment_id is None and not remote:  # a local store answers at once; a server may be down (retries)
        try:
            from mlflow import MlflowClient

            experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
        except Exception as exc:  # noqa: BLE001 - a link without the experiment still finds the run
            log.debug("no experiment id for run %s: %s", run_id, exc)
    base = uri if remote else os.environ.get(MLFLOW_UI_ENV, DEFAULT_MLFLOW_UI)
    base = re.sub(r"//[^/@]*@", "//", base.rstrip("/"))  # never put credentials into a link
    if experiment_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/#/runs/{run_id}"


def _safe(what: str, fn, *args, **kwargs) -> Optional[Any]:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - artifacts are a view: never fail the flow for one
        log.warning("Prefect artifact %s not created: %s", what, exc)
        return None


def link_mlflow_run(key: str, uri: str, run_id: Optional[str], what: str) -> Optional[Any]:
    from prefect.artifacts import create_link_artifact

    url = mlflow_run_url(uri, run_id)
    if url is None:
        return None
    return _safe(key, create_link_artifact, key=key, link=url, link_text=f"MLflow run {run_id}",
                 description=f"The {what}'s MLflow run (tracking URI {re.sub(r'//[^/@]*@', '//', uri)})")


def pipeline_artifacts(metrics: Mapping[str, float], results: Iterable[Mapping[str, Any]], uri: str,
                       run_id: Optional[str]) -> dict[str, Any]:
    """The pipeline's metrics table and the link to its MLflow run; returns the artifact ids."""
    from prefect.artifacts import create_table_artifact

    outcomes = ", ".join(f"{r['stage']}: {r['outcome']}" for r in results)
    table = [{"metric": k, "value": round(float(v), 6)} for k, v in sorted(metrics.items())]
    return {
        "metrics": _safe("metrics", create_table_artifact, key="mtdiff-pipeline-metrics", table=table or
                         [{"metric": "(none)", "value": None}],
                         description=f"metrics/*.json after the run. Stages: {outcomes}"),
        "mlflow": link_mlflow_run("mtdiff-pipeline-mlflow", uri, run_id, "pipeline"),
    }


def sweep_artifacts(name: str, markdown: str, csv_path: str | Path, uri: str,
                    run_id: Optional[str]) -> dict[str, Any]:
    """The sweep's comparison (markdown and table) and the link to its MLflow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows: list[dict[str, Any]] = []
    if Path(csv_path).exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    base = artifact_key("mtdiff-sweep", name)
    return {
        "markdown": _safe("comparison", create_markdown_artifact, key=base, markdown=markdown,
                          description=f"sweep {name}: comparison of the points (comparison.md)"),
        "table": _safe("comparison table", create_table_artifact, key=f"{base}-table", table=rows or
                       [{"point": "(none)"}], description=f"sweep {name}: comparison.csv"),
        "mlflow": link_mlflow_run(f"{base}-mlflow", uri, run_id, f"sweep {name}"),
    }
