"""Sweeps as a Prefect flow: each point of a grid is one DVC experiment, one nested MLflow run.

The sweep config (name, base, points, grid, metrics, targets) is described in :mod:`mtdiff.pipeline.sweeps`.
Each point runs, one after the other, as ``dvc exp run --temp --name <sweep>-<point>-<stamp> -S
++key=value ...``: in a temporary copy of the repo, so the workspace is untouched and DVC's run-cache
restores unchanged stages (prepare, latents, ...) instead of rerunning them. The experiment's metrics
come back through ``dvc exp show --json``; ``mtdiff.pipeline.report`` writes the comparison table
(``comparison.csv`` / ``.md``) and one bar plot per main metric.

    python -m flows.sweep configs/sweeps/tasks.yaml [--points a,b] [--dry-run]
"""
from __future__ import annotations

import flows  # noqa: F401  (sets PREFECT_HOME & co. before prefect is imported)

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import task_run as runtime_task_run

from flows.artifacts import sweep_artifacts
from flows.common import compute_slot, current_flow_run_id, find_repo, retryable
from mtdiff.config import TRAIN_STATE_ROOT_ENV, ConfigError
from mtdiff.pipeline import tracking
from mtdiff.pipeline.dvc_runner import dvc_command, load_repo_params, run_checked, shown_command, tracked_env
from mtdiff.pipeline.sweeps import (SweepConfig, SweepPoint, check_points, dry_run_commands, exp_name_for, exp_run_args,
                           experiment_result, finished_rows, git_head, load_sweep, point_result_path, point_state_dir,
                           save_point_grid, save_point_result, select_points, stale_rows, sweep_report,
                           untracked_files, write_sweep_file)


# -- task and flow ---------------------------------------------------------------------------
@task(name="sweep-point", task_run_name="exp {point}", retries=1, retry_delay_seconds=10,
      retry_condition_fn=retryable)
def run_point(point: str, overrides: dict[str, Any], exp_base: str, repo: str, targets: list[str],
              point_run_id: str | None, uri: str, tags: dict[str, str],
              copy_paths: list[str] | None = None, state_dir: str | None = None) -> dict[str, Any]:
    """``dvc exp run --temp`` one point; stage runs nest under ``point_run_id``; its training keeps its
    resumable state in ``state_dir`` (outside the temporary copy). Returns rev + metrics."""
    logger = get_run_logger()
    attempt = int(runtime_task_run.run_count or 1)
    exp_name = exp_base if attempt <= 1 else f"{exp_base}-try{attempt}"
    cmd = dvc_command(*exp_run_args(exp_name, overrides, targets, copy_paths))
    env = tracked_env(point_run_id, uri, flow_run_id=current_flow_run_id(),
                      tags={**tags, "dvc.exp_name": exp_name})
    if state_dir:
        env[TRAIN_STATE_ROOT_ENV] = state_dir
    logger.info("$ %s  (attempt %d)", shown_command(cmd), attempt)
    start = time.monotonic()
    run_checked(cmd, Path(repo), env, logger.info, what=f"exp {point}", prefix=f"[{point}] ")
    result = experiment_result(Path(repo), exp_name)
    if result["missing_metrics"]:
        # a metrics file (cache: false) that git ignores is left out of the experiment's commit
        logger.warning("experiment %s: %s not in its commit, so not in the comparison (git-ignored? "
                       "check `git check-ignore -v %s`)", exp_name, ", ".join(result["missing_metrics"]),
                       result["missing_metrics"][0])
    logger.info("point %s: experiment %s (%s) in %.1f s: %s", point, exp_name, (result["rev"] or "?")[:7],
                time.monotonic() - start, result["metrics"])
    return {"experiment": exp_name, **result}


def _run_and_record(point: SweepPoint, point_task: Any, cfg: SweepConfig, stamp: str, head: str, root: Path,
                    uri: str, base_params: Any, sweep_run: Any, copy_paths: list[str] | None,
                    logger: Any, register: bool = False) -> dict[str, Any]:
    """One point: its MLflow run nested under the sweep's, its experiment, and its report row."""
    exp_base = exp_name_for(cfg.name, point.name, stamp)
    point_tags = {"mtdiff.sweep": cfg.name, "mtdiff.sweep_point": point.name,
                  **({tracking.REGISTER_TAG: "1"} if register else {})}
    point_run = tracking.start_client_run(
        point.name, uri=uri, experiment=base_params.mlflow.experiment, parent_run_id=sweep_run.run_id,
        tags={**point_tags, "mtdiff.kind": "sweep_point", "dvc.exp_name": exp_base, "git_commit": head})
    tracking.log_run_params(point_run, load_repo_params(root, point.overrides), point.overrides)
    state_dir = point_state_dir(root, cfg.name, point.name)
    if state_dir.exists():
        logger.info("point %s: an unfinished run's training state in %s: its training resumes from it",
                    point.name, state_dir.relative_to(root.resolve()))
    state = point_task(point.name, point.overrides, exp_base, str(root), cfg.targets,
                       point_run.run_id, uri, point_tags, copy_paths, str(state_dir), return_state=True)
    row: dict[str, Any] = {"point": point.name, "params": point.overrides, "mlflow_run_id": point_run.run_id,
                           "git_commit": head}
    if state.is_completed():
        result = state.result()
        row.update(status="ok", experiment=result["experiment"], metrics=result["metrics"], rev=result["rev"])
        point_run.set_tags({"dvc.exp_name": result["experiment"], "dvc.exp_rev": result["rev"]})
        point_run.log_metrics(result["metrics"])
        point_run.end("FINISHED")
        shutil.rmtree(state_dir, ignore_errors=True)  # its weights are in the experiment now
    else:
        error = state.result(raise_on_failure=False)
        row.update(status="failed", experiment=exp_base, metrics={}, error=str(error)[-2000:])
        logger.error("point %s failed: %s", point.name, error)
        point_run.end("FAILED")
    return row


def _keep_grid(root: Path, out_dir: Path, point: str, rev: str | None, logger: Any) -> None:
    """The point's sample grid beside its row (a missing grid is a warning: the numbers stand)."""
    try:
        if rev:
            logger.info("point %s: grid -> %s", point, save_point_grid(root, out_dir, point, rev).relative_to(root))
    except (RuntimeError, OSError) as exc:
        logger.warning("point %s: no grid kept: %s", point, exc)


def _resumable_rows(root: Path, cfg: SweepConfig, out_dir: Path, head: str, rerun_stale: bool,
                    logger: Any) -> dict[str, dict[str, Any]]:
    """The saved rows a run may reuse: every finished point, less the stale ones when ``rerun_stale``;
    each stale one is named in a warning either way."""
    done = finished_rows(root, cfg, out_dir)
    for name, line in stale_rows(root, done, head).items():
        logger.warning(line if not rerun_stale else line.replace("--rerun-stale runs it again", "running it again"))
        if rerun_stale:
            done.pop(name)
    return done


@flow(name="mtdiff-sweep", log_prints=True)
def sweep(config: str | dict[str, Any] = "configs/sweeps/tasks.yaml", repo: str | None = None,
          name: str | None = None, points: list[str] | None = None, retries: int = 1,
          retry_delay_seconds: float = 10.0, copy_paths: list[str] | None = None,
          rerun: bool = False, rerun_stale: bool = False, register: bool = False) -> dict[str, Any]:
    """Run every point of ``config`` as a DVC experiment and write ``sweeps/<name>/comparison.*``.

    ``points`` runs a subset by name. A failed point is reported (status 'failed' in the table) and the
    flow fails at the end, after the report for the others is written. ``copy_paths``: untracked or
    ignored paths to copy into each experiment's temp dir (``dvc exp run -C``); committing them is better.

    Resumable: each finished point's row is saved as ``sweeps/<name>/points/<point>.json`` (commit it
    with the report); a rerun skips the points saved with the same overrides (``rerun``: run them all
    again) and builds the report from the saved and the new rows, so a study can span sessions. A saved
    point computed on a commit whose code or params differ from HEAD's (:func:`mtdiff.pipeline.sweeps.stale_rows`)
    is flagged in one warning line each; ``rerun_stale`` runs those again. ``register``: the points'
    trainings register their models too (by default a sweep leaves the model registry alone).
    """
    logger = get_run_logger()
    root = find_repo(repo)
    cfg = load_sweep(config, name=name, base_dir=root)
    todo = select_points(cfg, points)
    check_points(root, cfg, todo)  # every point must be valid before the first one spends compute
    head = git_head(root)
    untracked = [f for f in untracked_files(root) if f not in set(copy_paths or [])]
    if untracked:
        logger.warning("%d untracked file(s) are NOT in the experiments (dvc exp run --temp copies what git "
                       "tracks; git add them or pass copy_paths): %s", len(untracked),
                       ", ".join(untracked[:20]) + (" ..." if len(untracked) > 20 else ""))
    base_params = load_repo_params(root)
    uri = tracking.absolute_tracking_uri(tracking.tracking_uri(base_params), root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = root / "sweeps" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_file = write_sweep_file(out_dir, cfg, todo)
    point_task = run_point.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    done = {} if rerun else _resumable_rows(root, cfg, out_dir, head, rerun_stale, logger)
    sweep_tags = {"mtdiff.kind": "sweep", "mtdiff.sweep": cfg.name, "git_commit": head,
                  "prefect.flow_run_id": current_flow_run_id(),
                  "mtdiff.sweep_points": ",".join(p.name for p in todo)}
    with compute_slot(logger.info), tracking.client_run(
            f"sweep:{cfg.name}", params=base_params, uri=uri, tags=sweep_tags,
            parent_run_id=tracking.parent_run_id()) as sweep_run:
        sweep_run.log_artifact(sweep_file)
        ran: dict[str, dict[str, Any]] = {}
        for point in todo:
            if point.name in done:
                logger.info("point %s: finished before (%s), skipped; --rerun runs it again", point.name,
                            point_result_path(out_dir, point.name).relative_to(root))
                continue
            ran[point.name] = _run_and_record(point, point_task, cfg, stamp, head, root, uri, base_params,
                                              sweep_run, copy_paths, logger, register)
            if ran[point.name]["status"] == "ok":
                save_point_result(out_dir, ran[point.name])
                _keep_grid(root, out_dir, point.name, ran[point.name]["rev"], logger)
        # the report: every point of the config that ran now or finished in an earlier run
        rows = [ran.get(p.name) or done[p.name] for p in cfg.points if p.name in ran or p.name in done]
        report = sweep_report(cfg, out_dir, rows)
        for path in [report.csv, report.md, *report.plots]:
            sweep_run.log_artifact(path, artifact_path="report")
        failed = [r["point"] for r in rows if r["status"] != "ok"]
        sweep_run.set_tags({"mtdiff.failed_points": ",".join(failed)})
        sweep_artifacts(cfg.name, report.markdown, report.csv, uri, sweep_run.run_id)  # Prefect UI
        print(f"\nsweep {cfg.name}: {len(rows) - len(failed)}/{len(rows)} points ok; report in {out_dir}\n")
        print(report.markdown)
        if failed:
            raise RuntimeError(f"sweep {cfg.name}: point(s) {failed} failed; report for the rest in {out_dir}")
    return {"name": cfg.name, "rows": rows, "csv": str(report.csv), "md": str(report.md),
            "plots": [str(p) for p in report.plots], "metrics": report.metrics, "markdown": report.markdown,
            "mlflow_run_id": sweep_run.run_id, "tracking_uri": uri}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/sweeps/tasks.yaml", help="sweep YAML")
    parser.add_argument("--repo", default=None, help="DVC project root (default: cwd or this checkout)")
    parser.add_argument("--name", default=None, help="sweep name (default: the config's name)")
    parser.add_argument("--points", default=None, help="comma-separated subset of point names, run in this order")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed point (not for bad params)")
    parser.add_argument("--copy", action="append", default=None, metavar="PATH",
                        help="untracked/ignored path to copy into each experiment (dvc exp run -C); repeatable")
    parser.add_argument("--rerun", action="store_true", help="run points again that finished before "
                                                             "(sweeps/<name>/points/<point>.json)")
    parser.add_argument("--rerun-stale", action="store_true", help="run points again that finished on "
                                                                   "other code or params than HEAD's")
    parser.add_argument("--register", action="store_true", help="register the points' models in the MLflow "
                                                                "registry (default: a sweep registers none)")
    parser.add_argument("--dry-run", action="store_true", help="print the points and commands, run nothing")
    args = parser.parse_args(argv)
    subset = [p for p in (args.points or "").split(",") if p] or None
    try:
        if args.dry_run:
            root = find_repo(args.repo)
            cfg = load_sweep(args.config, name=args.name, base_dir=root)
            for line in dry_run_commands(root, cfg, subset, args.copy):
                print(line)
            return 0
        sweep(config=args.config, repo=args.repo, name=args.name, points=subset, retries=args.retries,
              copy_paths=args.copy, rerun=args.rerun, rerun_stale=args.rerun_stale,
              register=args.register)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the flow already logged the details
        print(f"error: sweep failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
