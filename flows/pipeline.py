"""The mtdiff pipeline as a Prefect flow: one task per DVC stage, one MLflow parent run per flow run.

Each task runs ``dvc repro --single-item <stage>`` with the venv's DVC, so DVC's cache and
``dvc.lock`` decide what actually runs (an unchanged stage is skipped in a second). The stage's own
MLflow run nests under the flow's parent run through ``MTDIFF_PARENT_RUN_ID`` in its environment.

    python -m flows.pipeline                       # all stages of dvc.yaml, in order (what `make run` does)
    python -m flows.pipeline --stages train,sample train.steps=500 --force
"""
from __future__ import annotations

import flows  # sets PREFECT_HOME & co. before prefect is imported

if not hasattr(flows, "set_env_defaults"):  # pragma: no cover
    # An editable install made before flows/__init__.py existed maps `flows` as a namespace package,
    # so the package init never ran: run it now (reinstalling with `pip install -e .` also fixes it).
    from pathlib import Path as _Path

    _init = _Path(__file__).with_name("__init__.py")
    flows.__file__ = str(_init)
    exec(compile(_init.read_text(), str(_init), "exec"), flows.__dict__)

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run

from mtdiff import tracking
from mtdiff.config import ConfigError, Params, flatten, load_params, parse_overrides
from mtdiff.io import atomic_path

DEFAULT_STAGES = ("prepare", "latents", "representations", "train", "sample", "evaluate")
SUMMARY_METRICS = 20  # metrics printed at the end of a run
CONFIG_EXIT_CODE = 2  # stage_main exits 2 on a bad parameter: retrying cannot help
_EXITED_RE = re.compile(r"exited with (-?\d+)")
# DVC errors about the pipeline definition itself: as hopeless to retry as a bad param
_DVC_DEFINITION_ERRORS = ("failed to parse", "is not a valid", "does not exist", "is not a stage",
                          "unknown stage", "'dvc.yaml' validation failed")


class StageFailed(RuntimeError):
    """A DVC stage failed; may be transient (retried)."""

    def __init__(self, stage: str, returncode: int, stage_exit: int | None, tail: Sequence[str]):
        self.stage, self.returncode, self.stage_exit, self.tail = stage, returncode, stage_exit, list(tail)
        code = f"stage command exited with {stage_exit}" if stage_exit is not None else f"dvc exited {returncode}"
        last = "\n".join(self.tail[-15:])
        super().__init__(f"DVC stage '{stage}' failed ({code}); last output:\n{last}")


class StageConfigError(StageFailed):
    """A stage failed on bad params or a bad pipeline definition: not retried."""


# -- helpers shared with flows.sweep ---------------------------------------------------------
def find_repo(repo: str | os.PathLike | None = None) -> Path:
    """The DVC project to run in: ``repo``, else the working directory if it has dvc.yaml, else this checkout."""
    if repo is None:
        root = Path.cwd() if (Path.cwd() / "dvc.yaml").exists() else flows.REPO_ROOT
    else:
        root = Path(repo).expanduser().resolve()
    if not (root / "dvc.yaml").exists():
        raise ValueError(f"repo {root}: no dvc.yaml there (pass repo= the DVC project root)")
    return root


def dvc_stage_names(root: Path) -> list[str]:
    """Stage names of ``root/dvc.yaml`` in file order (the file lists them in pipeline order)."""
    with open(root / "dvc.yaml") as f:
        spec = yaml.safe_load(f) or {}
    stages = spec.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{root / 'dvc.yaml'}: no stages defined")
    return list(stages)


def resolve_stages(root: Path, stages: Sequence[str] | str | None) -> list[str]:
    """``None`` -> every stage of dvc.yaml in order; else the given ones (checked against dvc.yaml)."""
    available = dvc_stage_names(root)
    if stages is None:
        return available
    wanted = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
    wanted = [s for s in wanted if s]
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"unknown DVC stage(s) {unknown}; dvc.yaml has: {', '.join(available)}")
    if not wanted:
        raise ValueError("stages: empty list")
    return wanted


def load_repo_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """The repo's params.yaml with ``overrides``, validated (ConfigError names the bad key)."""
    return load_params(root / "params.yaml", overrides=overrides or None)


def dvc_command(*args: str) -> list[str]:
    """DVC of this interpreter's environment (the venv), not whatever `dvc` is on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """Our environment + ``extra`` (None removes the variable); the venv's bin first on PATH so the
    stages' ``python -m mtdiff.stages.<name>`` commands use this interpreter."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def stream_command(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Callable[[str], Any],
                   prefix: str = "", keep: int = 200) -> tuple[int, list[str]]:
    """Run ``cmd``, sending each output line (stdout+stderr) to ``log``; return (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=keep)
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log(prefix + line)
        return proc.wait(), list(tail)
    except BaseException:  # cancelled / interrupted: do not leave DVC running behind us
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def stage_exit_code(lines: Sequence[str]) -> int | None:
    """The stage command's own exit code from DVC's 'failed to run: ..., exited with N' line."""
    for line in reversed(lines):
        m = _EXITED_RE.search(line)
        if m:
            return int(m.group(1))
    return None


def failure_for(stage: str, returncode: int, lines: Sequence[str]) -> StageFailed:
    code = stage_exit_code(lines)
    text = "\n".join(lines[-30:])
    hopeless = code == CONFIG_EXIT_CODE or (code is None and any(p in text for p in _DVC_DEFINITION_ERRORS))
    return (StageConfigError if hopeless else StageFailed)(stage, returncode, code, lines)


def retryable(task_obj, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but bad params / a bad pipeline definition."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - unreadable result: be conservative and retry
            exc = err
    return not isinstance(exc, (ConfigError, StageConfigError))


def write_params_overrides(path: Path, overrides: dict[str, Any]) -> None:
    """Write ``key.sub: value`` overrides into params.yaml in place (comments kept), as ``dvc exp run -S``
    does, so dvc.lock records the values the stages ran with."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    ry = YAML()
    ry.preserve_quotes = True
    data = ry.load(path.read_text()) or CommentedMap()
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = CommentedMap()
            node = node[k]
        node[keys[-1]] = value
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            ry.dump(data, f)


def numeric_leaves(obj: Any) -> dict[str, float]:
    """Finite numbers of a (nested) JSON object as dotted keys (bools and strings dropped)."""
    flat = flatten(obj) if isinstance(obj, dict) else {}
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def metrics_files(root: Path, params: Params) -> list[Path]:
    dirs = {root / "metrics", (root / params.metrics_dir).resolve()}
    return sorted({p for d in dirs if d.is_dir() for p in d.glob("*.json")})


def read_metrics(files: Sequence[Path]) -> dict[str, float]:
    """``metrics/evaluate.json {"fid_1k": 9.1}`` -> ``{"evaluate/fid_1k": 9.1}``."""
    out: dict[str, float] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out.update({f"{path.stem}/{k}": v for k, v in numeric_leaves(data).items()})
    return out


def stage_outcome(stage: str, lines: Sequence[str]) -> str:
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if "is cached - skipping" in text:
        return "restored"
    if "didn't change, skipping" in text or "Data and pipelines are up to date" in text:
        return "unchanged"
    return "done"


def current_flow_run_id() -> str:
    try:
        return str(runtime_flow_run.id or "")
    except Exception:  # noqa: BLE001 - outside a flow run
        return ""


# -- tasks and flow --------------------------------------------------------------------------
@task(name="dvc-stage", task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retryable)
def run_dvc_stage(stage: str, repo: str, force: bool = False, parent_run_id: str | None = None,
                  uri: str | None = None) -> dict[str, Any]:
    """``dvc repro --single-item <stage>`` in ``repo``, output streamed to the Prefect log."""
    logger = get_run_logger()
    attempt = int(runtime_task_run.run_count or 1)
    cmd = dvc_command("repro", "--single-item", *(["--force"] if force else []), stage)
    env = subprocess_env(MTDIFF_PARENT_RUN_ID=parent_run_id, MLFLOW_PARENT_RUN_ID=None,
                         MLFLOW_TRACKING_URI=uri, MTDIFF_DVC_STAGE=stage,
                         PREFECT__FLOW_RUN_ID=current_flow_run_id() or None)
    logger.info("$ %s  (attempt %d)", " ".join(cmd[1:]), attempt)
    start = time.monotonic()
    rc, lines = stream_command(cmd, Path(repo), env, logger.info, prefix=f"[{stage}] ")
    seconds = round(time.monotonic() - start, 2)
    if rc != 0:
        raise failure_for(stage, rc, lines)
    outcome = stage_outcome(stage, lines)
    logger.info("stage %s: %s in %.1f s", stage, outcome, seconds)
    return {"stage": stage, "outcome": outcome, "seconds": seconds, "attempt": attempt}


@flow(name="mtdiff-pipeline", log_prints=True)
def pipeline(stages: list[str] | str | None = None, force: bool = False,
             params_overrides: dict[str, Any] | list[str] | None = None, repo: str | None = None,
             retry_delay_seconds: float = 10.0) -> dict[str, Any]:
    """Run the DVC stages in order (default: all of dvc.yaml), each as a retried Prefect task.

    ``params_overrides`` (``{"train.steps": 500}`` or ``["train.steps=500"]``) are validated, then written
    into params.yaml before the stages run (as ``dvc exp run -S`` does). ``force`` reruns unchanged stages.
    """
    logger = get_run_logger()
    root = find_repo(repo)
    order = resolve_stages(root, stages)
    overrides = parse_overrides(params_overrides)
    params = load_repo_params(root, overrides)  # a bad override fails here, before anything runs
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
        if overrides:
            parent.log_params({f"override.{k}": v for k, v in overrides.items()})
        for stage in order:
            results.append(stage_task(stage, str(root), force, parent.run_id, uri))
        files = metrics_files(root, params)
        metrics = read_metrics(files)
        if metrics:
            parent.log_metrics(metrics)
        for path in files:
            parent.log_artifact(path, artifact_path="metrics")
        parent.set_tags({"mtdiff.outcomes": ",".join(f"{r['stage']}:{r['outcome']}" for r in results)})
    print(summary_text(root, params, results, metrics, uri, parent.run_id, flow_run_id))
    return {"stages": order, "results": results, "metrics": metrics, "tracking_uri": uri,
            "mlflow_run_id": parent.run_id, "repo": str(root)}


def summary_text(root: Path, params: Params, results: list[dict], metrics: dict[str, float], uri: str,
                 run_id: str | None, flow_run_id: str) -> str:
    def where(p: Path) -> str:
        p = p if p.is_absolute() else root / p
        return f"{p}{'' if p.exists() else '  (not produced)'}"

    lines = ["", "mtdiff pipeline done: " + ", ".join(f"{r['stage']} {r['outcome']}" for r in results),
             f"  data:         {where(params.prepared_dir.parent)}",
             f"  checkpoints:  {where(params.checkpoints_dir)}",
             f"  samples:      {where(params.samples_dir)}",
             f"  metrics:      {where(params.metrics_dir)}"]
    # evaluate's figures first; the full list is in `dvc metrics show` and the MLflow parent run
    keys = sorted(metrics, key=lambda k: (not k.startswith("evaluate/"), k))
    for key in keys[:SUMMARY_METRICS]:
        lines.append(f"    {key} = {metrics[key]:.6g}")
    if len(keys) > SUMMARY_METRICS:
        lines.append(f"    ... {len(keys) - SUMMARY_METRICS} more: `dvc metrics show`, or the MLflow run below")
    lines.append(f"  MLflow:       {uri}  parent run {run_id or '(not tracked)'}"
                 f"  -> mlflow ui --backend-store-uri {uri}")
    if flow_run_id:
        lines.append(f"  Prefect:      flow run {flow_run_id}")
    return "\n".join(lines)


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
        pipeline(stages=args.stages, force=args.force, params_overrides=args.overrides or None,
                 repo=args.repo, retry_delay_seconds=args.retry_delay)
    except (ConfigError, StageConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the flow already logged the traceback
        print(f"error: pipeline failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
