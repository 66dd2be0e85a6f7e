"""The mtdiff pipeline as a Prefect flow: one task per DVC stage, one MLflow parent run per flow run.

Each task runs ``dvc repro --single-item <stage>`` with the venv's DVC, so DVC's cache and
``dvc.lock`` decide what actually runs (an unchanged stage is skipped in a second). The stage's own
MLflow run nests under the flow's parent run through ``MTDIFF_PARENT_RUN_ID`` in its environment.

A run with overrides is a DVC experiment instead: one task runs ``dvc exp run --temp --name
run-<stamp> -S key=value ... <stages>`` (a temporary copy: params.yaml and the workspace stay as they
are; ``dvc exp show`` lists it, ``dvc exp apply <name>`` brings its results into the workspace).

    python -m flows.pipeline                       # all stages of dvc.yaml, in order (what `make run` does)
    python -m flows.pipeline --stages train,sample train.steps=500 --force
"""
from __future__ import annotations

import flows  # noqa: F401  (sets PREFECT_HOME & co. before prefect is imported)

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run as runtime_task_run

from flows.artifacts import pipeline_artifacts
from flows.common import compute_slot, current_flow_run_id, find_repo, retryable
from mtdiff.config import ConfigError, Params, parse_overrides
from mtdiff.pipeline import dvc_runner, tracking
from mtdiff.pipeline.dvc_runner import (StageConfigError, StagePreempted, dvc_command, load_repo_params, metrics_files,
                               read_metrics, repro_command, resolve_stages, run_checked, shown_command, stage_outcome,
                               summary_text, tracked_env)
from mtdiff.train.preemption import PREEMPTED_EXIT_CODE
from mtdiff.pipeline.sweeps import exp_run_args, experiment_result

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


@task(name="dvc-experiment", task_run_name="dvc exp run {exp_name}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retryable)
def run_dvc_experiment(stages: list[str], overrides: dict[str, Any], exp_name: str, repo: str,
                       force: bool = False, parent_run_id: str | None = None, uri: str | None = None) -> dict[str, Any]:
    """``dvc exp run --temp -S ...`` of ``stages`` (and what they depend on): the overrides as an experiment."""
    logger = get_run_logger()
    attempt = int(runtime_task_run.run_count or 1)
    name = exp_name if attempt <= 1 else f"{exp_name}-try{attempt}"  # a failed attempt may keep its name
    args = exp_run_args(name, overrides, stages)
    cmd = dvc_command(*args[:2], *(["--force"] if force else []), *args[2:])
    env = tracked_env(parent_run_id, uri, flow_run_id=current_flow_run_id())
    logger.info("$ %s  (attempt %d)", shown_command(cmd), attempt)
    lines, seconds = run_checked(cmd, Path(repo), env, logger.info, what=f"exp {name}", prefix=f"[{name}] ")
    result = experiment_result(Path(repo), name)
    stage_results = [{"stage": s, "outcome": stage_outcome(s, lines), "seconds": seconds, "attempt": attempt}
                     for s in stages]
    logger.info("experiment %s (%s) in %.1f s", name, (result["rev"] or "?")[:7], seconds)
    return {"experiment": name, "results": stage_results, **result}


@flow(name="mtdiff-pipeline", log_prints=True)
def pipeline(stages: list[str] | str | None = None, force: bool = False,
             params_overrides: dict[str, Any] | list[str] | None = None, repo: str | None = None,
             retry_delay_seconds: float = 10.0) -> dict[str, Any]:
    """Run the DVC stages in order (default: all of dvc.yaml), each as a retried Prefect task.

    ``params_overrides`` (``{"train.steps": 500}`` or ``["train.steps=500"]``) are validated, then run as a
    DVC experiment (``dvc exp run --temp -S``): params.yaml is never rewritten; the MLflow parent run logs
    what the stages read (``load_repo_params``) and the experiment's name and rev. Without overrides the
    stages run with ``dvc repro`` in the workspace. ``force`` reruns unchanged stages.
    """
    logger = get_run_logger()
    root = find_repo(repo)
    order = resolve_stages(root, stages)
    overrides = parse_overrides(params_overrides)
    params = load_repo_params(root, overrides)  # what the stages will read; a bad override fails here
    with compute_slot(logger.info):  # one compute-heavy flow at a time (a sweep shares the cores)
        return _run_stages(root, order, overrides, params, force, retry_delay_seconds)


def _run_stages(root: Path, order: list[str], overrides: dict[str, Any], params: Params, force: bool,
                retry_delay_seconds: float) -> dict[str, Any]:
    """The flow's body once it holds the compute slot: the stages (an experiment when overridden), MLflow."""
    uri = tracking.absolute_tracking_uri(tracking.tracking_uri(params), root)
    flow_run_id = current_flow_run_id()
    tags = {"mtdiff.kind": "pipeline", "git_commit": tracking.git_commit(root) or "unknown",
            "prefect.flow_run_id": flow_run_id, "dvc.stages": ",".join(order), "dvc.force": str(force)}
    with tracking.client_run("pipeline", params=params, uri=uri, tags=tags,
                             parent_run_id=tracking.parent_run_id()) as parent:
        tracking.log_run_params(parent, params, overrides)
        if overrides:
            results, metrics = _run_experiment(root, order, overrides, force, parent, uri, retry_delay_seconds)
        else:
            results, metrics = _run_repro(root, order, params, force, parent, uri, retry_delay_seconds)
        if metrics:
            parent.log_metrics(metrics)
        parent.set_tags({"mtdiff.outcomes": ",".join(f"{r['stage']}:{r['outcome']}" for r in results)})
        pipeline_artifacts(metrics, results, uri, parent.run_id)  # shown on the flow run in the Prefect UI
    print(summary_text(root, params, results, metrics, uri, parent.run_id, flow_run_id))
    return {"stages": order, "results": results, "metrics": metrics, "tracking_uri": uri,
            "mlflow_run_id": parent.run_id, "repo": str(root)}


def _run_repro(root: Path, order: list[str], params: Params, force: bool, parent: Any, uri: str,
               retry_delay_seconds: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """``dvc repro`` stage by stage in the workspace; the metrics files it leaves there."""
    stage_task = run_dvc_stage.with_options(retry_delay_seconds=retry_delay_seconds)
    results = [stage_task.with_options(timeout_seconds=stage_timeout(stage))(stage, str(root), force, parent.run_id, uri)
               for stage in order]
    files = metrics_files(root, params)
    for path in files:
        parent.log_artifact(path, artifact_path="metrics")
    return results, read_metrics(files)


def _run_experiment(root: Path, order: list[str], overrides: dict[str, Any], force: bool, parent: Any, uri: str,
                    retry_delay_seconds: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The overrides as one DVC experiment; its metrics as ``dvc exp show`` has them."""
    exp_name = f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    timeout = sum(stage_timeout(stage) for stage in order)
    exp = run_dvc_experiment.with_options(retry_delay_seconds=retry_delay_seconds, timeout_seconds=timeout)(
        order, overrides, exp_name, str(root), force, parent.run_id, uri)
    parent.set_tags({"dvc.exp_name": exp["experiment"], "dvc.exp_rev": exp["rev"] or ""})
    print(f"experiment {exp['experiment']}: `dvc exp show` lists it, `dvc exp apply {exp['experiment']}` "
          f"brings its results into the workspace")
    return exp["results"], exp["metrics"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="params overrides key.sub=value (run as a DVC experiment; "
                                                            "params.yaml is not changed)")
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
