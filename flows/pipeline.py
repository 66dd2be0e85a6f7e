"""The mtdiff pipeline as a Prefect flow: one task per DVC stage, one MLflow parent run per flow run.

Each task runs ``dvc repro --single-item <stage>`` with the venv's DVC, so DVC's cache and
``dvc.lock`` decide what actually runs (an unchanged stage is skipped in a second). The stage's own
MLflow run nests under the flow's parent run through ``MTDIFF_PARENT_RUN_ID`` in its environment.

    python -m flows.pipeline                       # all stages of dvc.yaml, in order (what `make run` does)
    python -m flows.pipeline --stages train,sample train.steps=500 --force
"""
from __future__ import annotations

import flows  # noqa: F401  (sets PREFECT_HOME & co. before prefect is imported)

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run as runtime_task_run

from flows.artifacts import pipeline_artifacts
from flows.common import compute_slot, current_flow_run_id, find_repo, retryable
from mtdiff import dvc_runner, tracking
from mtdiff.config import ConfigError, Params, parse_overrides
from mtdiff.preemption import PREEMPTED_EXIT_CODE
from mtdiff.dvc_runner import (StageConfigError, StagePreempted, load_repo_params, metrics_files,
                               read_metrics, repro_command, resolve_stages, run_checked, shown_command, stage_outcome,
                               summary_text, tracked_env, write_params_overrides)

# Task timeout per stage in seconds (a timed-out stage is stopped and not retried); generous, since the
# imagenet256 profile trains for days. MTDIFF_STAGE_TIMEOUT_S=<seconds> sets one for every stage.
STAGE_TIMEOUT_S = {"train": 7 * 86400}
DEFAULT_STAGE_TIMEOUT_S = 86400


def stage_timeout(stage: str) -> float:
    override = os.environ.get("MTDIFF_STAGE_TIMEOUT_S")
    return float(override) if override else float(STAGE_TIMEOUT_S.get(stage, DEFAULT_STAGE_TIMEOUT_S))


# -- tasks and flow --------------------------------------------------------------------------
@task(name="dvc-stage", task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retryable)
def run_dvc_stage(stage: str, repo: str, force: bool = False, parent_run_id: str | None = None,
                  uri: str | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``repo``, output streamed to the Prefect log."""
    logger = get_run_logger()
    attempt = int(runtime_task_run.run_count or 1)
    cmd = repro_command(stage, force)
    env = tracked_env(parent_run_id, uri, stage=stage, flow_run_id=current_flow_run_id())
    logger.info("$ %s  (attempt %d)", shown_command(cmd), attempt)
    lines, seconds = run_checked(cmd, Path(repo), env, logger.info, what=stage, prefix=f"[{stage}] ")
    outcome = stage_outcome(stage, lines)
    logger.info("stage %s: %s in %.1f s", stage, outcome, seconds)
    return {"stage": stage, "outcome": outcome, "seconds": seconds, "attempt": attempt}


@flow(name="mtdiff-pipeline", log_prints=True)
def pipeline(stages: list[str] | str | None = None, force: bool = False,
             params_overrides: dict[str, Any] | list[str] | None = None, repo: str | None = None,
             retry_delay_seconds: float = 10.0) -> dict[str, Any]:
    """Run the DVC stages in order (default: all of dvc.yaml), each as a retried Prefect task.

    ``params_overrides`` (``{"train.steps": 500}`` or ``["train.steps=500"]``) are validated, then written
    into params.yaml before the stages run (as ``dvc exp run -S`` does); the MLflow parent run logs what the
    stages then read (``load_repo_params``). ``force`` reruns unchanged stages.
    """
    logger = get_run_logger()
    root = find_repo(repo)
    order = resolve_stages(root, stages)
    overrides = parse_overrides(params_overrides)
    params = load_repo_params(root, overrides)  # what the stages will read; a bad override fails here
    with compute_slot(logger.info):  # before params.yaml changes: a running sweep copies the workspace
        return _run_stages(root, order, overrides, params, force, retry_delay_seconds)


def _run_stages(root: Path, order: list[str], overrides: dict[str, Any], params: Params, force: bool,
                retry_delay_seconds: float) -> dict[str, Any]:
    """The flow's body once it holds the compute slot: overrides into params.yaml, the stages, MLflow."""
    logger = get_run_logger()
    if overrides:
        write_params_overrides(root / "params.yaml", overrides)
        logger.info("params.yaml updated with %s", overrides)
    uri = tracking.absolute_tracking_uri(tracking.tracking_uri(params), root)
    flow_run_id = current_flow_run_id()
    tags = {"mtdiff.kind": "pipeline", "git_commit": tracking.git_commit(root) or "unknown",
            "prefect.flow_run_id": flow_run_id, "dvc.stages": ",".join(order), "dvc.force": str(force)}
    results: list[dict[str, Any]] = []
    stage_task = run_dvc_stage.with_options(retry_delay_seconds=retry_delay_seconds)
    with tracking.client_run("pipeline", params=params, uri=uri, tags=tags,
                             parent_run_id=tracking.parent_run_id()) as parent:
        tracking.log_run_params(parent, params, overrides)
        for stage in order:
            results.append(stage_task.with_options(timeout_seconds=stage_timeout(stage))(
                stage, str(root), force, parent.run_id, uri))
        files = metrics_files(root, params)
        metrics = read_metrics(files)
        if metrics:
            parent.log_metrics(metrics)
        for path in files:
            parent.log_artifact(path, artifact_path="metrics")
        parent.set_tags({"mtdiff.outcomes": ",".join(f"{r['stage']}:{r['outcome']}" for r in results)})
        pipeline_artifacts(metrics, results, uri, parent.run_id)  # shown on the flow run in the Prefect UI
    print(summary_text(root, params, results, metrics, uri, parent.run_id, flow_run_id))
    return {"stages": order, "results": results, "metrics": metrics, "tracking_uri": uri,
            "mlflow_run_id": parent.run_id, "repo": str(root)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="params overrides key.sub=value (written to params.yaml)")
    parser.add_argument("--stages", default=None, help="comma-separated DVC stages (default: all, in order)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    parser.add_argument("--repo", default=None, help="DVC project root (default: cwd or this checkout)")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="seconds between retries")
    args = parser.parse_args(argv)
    try:
        # one pipeline per project at a time: a second `make run` fails at once instead of racing DVC's lock
        with dvc_runner.pipeline_lock(find_repo(args.repo)):
            pipeline(stages=args.stages, force=args.force, params_overrides=args.overrides or None,
                     repo=args.repo, retry_delay_seconds=args.retry_delay)
    except (ConfigError, StageConfigError, ValueError, dvc_runner.PipelineBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StagePreempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - the flow already logged the traceback
        print(f"error: pipeline failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
