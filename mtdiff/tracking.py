"""MLflow logging for every stage run.

``stage_run(params, stage)`` opens one MLflow run for a stage, nested under the pipeline's
parent run when ``MTDIFF_PARENT_RUN_ID`` (or ``MLFLOW_PARENT_RUN_ID``) is set, logs the flattened
params and tags, and yields a :class:`StageRun` whose ``log_*`` methods never raise: when the
tracking server is down the stage warns and goes on, and what it could not send is appended to
``<out_dir>/mlflow_pending.jsonl`` so nothing is lost (``replay_pending`` sends it later).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from mtdiff.config import REPO_ROOT, Params
from mtdiff.utils import get_logger

log = get_logger(__name__)
PARENT_ENV_VARS = ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID")
PENDING_FILE = "mlflow_pending.jsonl"


def tracking_uri(params: Params | None = None) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the repo."""
    if params is not None and params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class StageRun:
    """Thin, failure-tolerant wrapper around the active MLflow run (or none)."""

    def __init__(self, run_id: str | None, pending_dir: Path):
        self.run_id = run_id
        self.pending_path = pending_dir / PENDING_FILE

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run_id is not None:
            try:
                fn(*args, **kwargs)
                return
            except Exception as exc:  # tracking must never kill a stage
                log.warning("MLflow %s failed (%s); kept in %s", what, exc, self.pending_path)
        self._keep(what, args, kwargs)

    def _keep(self, what: str, args, kwargs) -> None:
        self.pending_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"what": what, "args": [str(a) if isinstance(a, Path) else a for a in args],
                  "kwargs": kwargs, "time": time.time()}
        with open(self.pending_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._call("log_metrics", mlflow.log_metrics, clean, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        self._call("log_params", mlflow.log_params, {k: str(v)[:6000] for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        self._call("set_tags", mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        self._call("log_artifact", mlflow.log_artifact, str(path), artifact_path=artifact_path)

    def log_image(self, image, artifact_file: str) -> None:
        """``image``: a PIL image or HWC uint8 array."""
        import mlflow

        if self.run_id is None:
            return self._keep("log_image", (artifact_file,), {})
        self._call("log_image", mlflow.log_image, image, artifact_file=artifact_file)


def parent_run_id() -> str | None:
    for var in PARENT_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


@contextlib.contextmanager
def stage_run(params: Params, stage: str, out_dir: str | os.PathLike = ".",
              extra_tags: dict[str, Any] | None = None) -> Iterator[StageRun]:
    """One MLflow run for ``stage``; yields a StageRun that logs, or keeps locally when it cannot."""
    out_dir = Path(out_dir)
    if os.environ.get("MTDIFF_MLFLOW", "1") == "0":
        yield StageRun(None, out_dir)
        return
    run_id = None
    try:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri(params))
        mlflow.set_experiment(params.mlflow.experiment)
        tags = {"mtdiff.stage": stage, "git_commit": git_commit() or "unknown",
                "prefect.flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID", ""), **(extra_tags or {})}
        parent = parent_run_id()
        if parent:
            tags["mlflow.parentRunId"] = parent
        active = mlflow.start_run(run_name=stage, tags=tags)
        run_id = active.info.run_id
    except Exception as exc:
        log.warning("MLflow unavailable at %s (%s); stage '%s' goes on and keeps its logs in %s",
                    tracking_uri(params), exc, stage, out_dir / PENDING_FILE)
    run = StageRun(run_id, out_dir)
    run.log_params(params.flat())
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if run_id is not None:
            try:
                import mlflow

                mlflow.end_run(status=status)
            except Exception as exc:
                log.warning("MLflow end_run failed: %s", exc)
