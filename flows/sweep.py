"""Sweeps as a Prefect flow: each point of a grid is one DVC experiment, one nested MLflow run.

A sweep config (YAML under configs/sweeps/, or a dict) holds::

    name: tasks                      # results go to sweeps/<name>/
    base: {train.steps: 1500}        # overrides shared by every point (the common budget)
    points:                          # named points: {name: {dotted.key: value, ...}}
      single_task: {tasks.label.enabled: false, sample.condition: uncond}
    grid:                            # and/or a cartesian product: {dotted.key: [v1, v2, ...]}
      diffusion.w_max: [0.05, 0.1]
    metrics: ["evaluate/fid*"]       # main metrics to plot (globs); default: all metrics
    targets: []                      # DVC targets for `dvc exp run` (default: the whole pipeline)

Points are the named points times the grid combinations (either may be absent). Each runs,
one after the other, as ``dvc exp run --temp --name <sweep>-<point>-<stamp> -S ++key=value ...``:
in a temporary copy of the repo, so the workspace is untouched and DVC's run-cache restores
unchanged stages (prepare, latents, ...) instead of rerunning them. The experiment's metrics
come back through ``dvc exp show --json``; ``mtdiff.report`` writes the comparison table
(``comparison.csv`` / ``.md``) and one bar plot per main metric.

    python -m flows.sweep configs/sweeps/tasks.yaml [--points a,b] [--dry-run]
"""
from __future__ import annotations

import flows.pipeline as fp  # first: sets the Prefect env defaults before prefect is imported

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.runtime import task_run as runtime_task_run

from mtdiff import tracking
from mtdiff.config import ConfigError, flatten
from mtdiff.io import atomic_path
from mtdiff.report import flatten_metrics, write_report

SWEEP_KEYS = {"name", "description", "base", "points", "grid", "metrics", "targets"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLAIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")  # Hydra reads these unquoted as the same string
_HYDRA_WORDS = {"true", "false", "null", "none", "inf", "nan"}


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: dict[str, Any]


@dataclass
class SweepConfig:
    name: str
    points: list[SweepPoint]
    metrics: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    description: str = ""
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "metrics": self.metrics, "targets": self.targets,
                "points": {p.name: p.overrides for p in self.points}}


def _overrides(value: Any, where: str) -> dict[str, Any]:
    """A mapping of overrides, nested (``{tasks: {label: {enabled: false}}}``) or dotted, -> dotted."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of key.sub: value, got {type(value).__name__}")
    return flatten(value)


def _label(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


def expand_points(base: dict[str, Any], points: dict[str, dict[str, Any]] | None,
                  grid: dict[str, list[Any]] | None) -> list[SweepPoint]:
    """Named points x grid combinations, each merged over ``base`` (later wins)."""
    named = list((points or {}).items()) or [("", {})]
    combos: list[tuple[str, dict[str, Any]]] = [("", {})]
    if grid:
        keys = list(grid)
        for key in keys:
            if not isinstance(grid[key], list) or not grid[key]:
                raise ConfigError(f"sweep grid.{key}: expected a non-empty list of values")
        combos = []
        for values in itertools.product(*(grid[k] for k in keys)):
            label = "-".join(f"{k.rsplit('.', 1)[-1]}-{_label(v)}" for k, v in zip(keys, values))
            combos.append((label, dict(zip(keys, values))))
    out: list[SweepPoint] = []
    for (pname, pover), (gname, gover) in itertools.product(named, combos):
        name = "__".join(n for n in (pname, gname) if n) or "base"
        out.append(SweepPoint(name, {**base, **pover, **gover}))
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sweep: duplicate point names {dupes}")
    return out


def load_sweep(config: str | Path | dict[str, Any], name: str | None = None,
               base_dir: Path | None = None) -> SweepConfig:
    """Parse a sweep config (YAML path or dict); paths are tried as given, then under ``base_dir``."""
    source = "<dict>"
    if not isinstance(config, dict):
        path = Path(config)
        if not path.exists() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
        if not path.exists():
            raise ConfigError(f"sweep config {config}: no such file")
        source = str(path)
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        name = name or config.get("name") or path.stem
    unknown = sorted(set(config) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(sorted(SWEEP_KEYS))}")
    name = str(name or config.get("name") or "sweep")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{source}: name {name!r}: use letters, digits, '_', '.', '-'")
    raw_points = config.get("points")
    if isinstance(raw_points, list):  # [{name: x, overrides: {...}}, ...]
        try:
            raw_points = {str(p["name"]): p.get("overrides") for p in raw_points}
        except (TypeError, KeyError):
            raise ConfigError(f"{source}: points: list items need 'name' (and 'overrides')") from None
    if raw_points is not None and not isinstance(raw_points, dict):
        raise ConfigError(f"{source}: points: expected a mapping name -> overrides")
    points = {}
    for pname, pover in (raw_points or {}).items():
        if not _NAME_RE.match(str(pname)):
            raise ConfigError(f"{source}: point name {pname!r}: use letters, digits, '_', '.', '-'")
        points[str(pname)] = _overrides(pover, f"{source}: points.{pname}")
    grid = config.get("grid")
    if grid is not None and not isinstance(grid, dict):
        raise ConfigError(f"{source}: grid: expected a mapping key -> list of values")
    grid = {k: v for k, v in flatten(grid or {}).items()} if grid else None
    if not points and not grid:
        raise ConfigError(f"{source}: a sweep needs 'points' and/or 'grid'")
    metrics = config.get("metrics") or []
    targets = config.get("targets") or []
    for key, value in (("metrics", metrics), ("targets", targets)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key}: expected a list of strings")
    return SweepConfig(name=name, points=expand_points(_overrides(config.get("base"), f"{source}: base"),
                                                       points, grid),
                       metrics=metrics, targets=targets, description=str(config.get("description") or ""),
                       source=source)


def hydra_value(value: Any) -> str:
    """A value in the Hydra override grammar that ``dvc exp run -S`` parses back to ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN_RE.match(value) and value.lower() not in _HYDRA_WORDS:
            return value
        # quoted: 'true', '1e-4', paths with spaces stay strings
        # Hydra unescapes backslashes only before a quote (or the closing quote)
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
        return "'" + escaped + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot pass {value!r} ({type(value).__name__}) to dvc exp run -S")


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """``{"train.steps": 5}`` -> ``["-S", "++train.steps=5"]`` (``++``: add the key if params.yaml lacks it)."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"++{key}={hydra_value(value)}"]
    return args


def exp_name_for(sweep: str, point: str, stamp: str, attempt: int = 1) -> str:
    """DVC experiment names must be unique and valid git ref parts."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{sweep}-{point}-{stamp}")
    return name if attempt <= 1 else f"{name}-try{attempt}"


def exp_show(root: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(fp.dvc_command("exp", "show", "--json"), cwd=root, env=fp.subprocess_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout or "[]")


def find_experiment(show: list[dict[str, Any]], exp_name: str) -> dict[str, Any] | None:
    """The newest commit of experiment ``exp_name`` in ``dvc exp show --json`` output."""
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            revs = exp.get("revs") or []
            if exp.get("name") == exp_name or any(r.get("name") == exp_name for r in revs):
                return revs[0] if revs else None
    return None


def experiment_result(root: Path, exp_name: str) -> dict[str, Any]:
    found = find_experiment(exp_show(root), exp_name)
    if found is None:
        raise RuntimeError(f"experiment {exp_name} not in `dvc exp show` after it ran")
    data = found.get("data") or {}
    per_file = data.get("metrics") or {}
    missing = sorted(f for f, v in per_file.items() if isinstance(v, dict) and v.get("error"))
    return {"rev": found.get("rev"), "metrics": flatten_metrics(per_file), "missing_metrics": missing}


def untracked_files(root: Path) -> list[str]:
    """Untracked, not ignored files: ``dvc exp run --temp`` leaves them out of the experiment's copy."""
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else []


def git_head(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{root}: dvc exp run needs a git repo with at least one commit")
    return proc.stdout.strip()


# -- task and flow ---------------------------------------------------------------------------
@task(name="sweep-point", task_run_name="exp {point}", retries=1, retry_delay_seconds=10,
      retry_condition_fn=fp.retryable)
def run_point(point: str, overrides: dict[str, Any], exp_base: str, repo: str, targets: list[str],
              point_run_id: str | None, uri: str, tags: dict[str, str],
              copy_paths: list[str] | None = None) -> dict[str, Any]:
    """``dvc exp run --temp`` one point; stage runs nest under ``point_run_id``. Returns rev + metrics."""
    logger = get_run_logger()
    attempt = int(runtime_task_run.run_count or 1)
    exp_name = exp_base if attempt <= 1 else f"{exp_base}-try{attempt}"
    copies = [arg for path in copy_paths or [] for arg in ("-C", path)]
    cmd = fp.dvc_command("exp", "run", "--temp", "--name", exp_name, *copies, *set_param_args(overrides),
                         *targets)
    env = fp.subprocess_env(MTDIFF_PARENT_RUN_ID=point_run_id, MLFLOW_PARENT_RUN_ID=None,
                            MLFLOW_TRACKING_URI=uri, MTDIFF_DVC_STAGE=None,
                            MTDIFF_MLFLOW_TAGS=json.dumps({**tags, "dvc.exp_name": exp_name}),
                            PREFECT__FLOW_RUN_ID=fp.current_flow_run_id() or None)
    logger.info("$ %s  (attempt %d)", " ".join(cmd[1:]), attempt)
    start = time.monotonic()
    rc, lines = fp.stream_command(cmd, Path(repo), env, logger.info, prefix=f"[{point}] ")
    if rc != 0:
        raise fp.failure_for(f"exp {point}", rc, lines)
    result = experiment_result(Path(repo), exp_name)
    if result["missing_metrics"]:
        # a metrics file (cache: false) that git ignores is left out of the experiment's commit
        logger.warning("experiment %s: %s not in its commit, so not in the comparison (git-ignored? "
                       "check `git check-ignore -v %s`)", exp_name, ", ".join(result["missing_metrics"]),
                       result["missing_metrics"][0])
    logger.info("point %s: experiment %s (%s) in %.1f s: %s", point, exp_name, (result["rev"] or "?")[:7],
                time.monotonic() - start, result["metrics"])
    return {"experiment": exp_name, **result}


@flow(name="mtdiff-sweep", log_prints=True)
def sweep(config: str | dict[str, Any] = "configs/sweeps/tasks.yaml", repo: str | None = None,
          name: str | None = None, points: list[str] | None = None, retries: int = 1,
          retry_delay_seconds: float = 10.0, copy_paths: list[str] | None = None) -> dict[str, Any]:
    """Run every point of ``config`` as a DVC experiment and write ``sweeps/<name>/comparison.*``.

    ``points`` runs a subset by name. A failed point is reported (status 'failed' in the table) and the
    flow fails at the end, after the report for the others is written. ``copy_paths``: untracked or
    ignored paths to copy into each experiment's temp dir (``dvc exp run -C``); committing them is better.
    """
    logger = get_run_logger()
    root = fp.find_repo(repo)
    cfg = load_sweep(config, name=name, base_dir=root)
    todo = cfg.points
    if points:
        missing = sorted(set(points) - {p.name for p in cfg.points})
        if missing:
            raise ConfigError(f"sweep {cfg.name}: no point(s) {missing}; have {[p.name for p in cfg.points]}")
        todo = [p for p in cfg.points if p.name in set(points)]
    for point in todo:  # every point must be valid before the first one spends compute
        try:
            fp.load_repo_params(root, point.overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep {cfg.name} point {point.name}: {err}") from None
    head = git_head(root)
    untracked = [f for f in untracked_files(root) if f not in set(copy_paths or [])]
    if untracked:
        logger.warning("%d untracked file(s) are NOT in the experiments (dvc exp run --temp copies what git "
                       "tracks; git add them or pass copy_paths): %s", len(untracked),
                       ", ".join(untracked[:20]) + (" ..." if len(untracked) > 20 else ""))
    base_params = fp.load_repo_params(root)
    uri = tracking.absolute_tracking_uri(tracking.tracking_uri(base_params), root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = root / "sweeps" / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "sweep.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({**cfg.to_dict(), "points": {p.name: p.overrides for p in todo}},
                                      sort_keys=False))
    point_task = run_point.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    rows: list[dict[str, Any]] = []
    sweep_tags = {"mtdiff.kind": "sweep", "mtdiff.sweep": cfg.name, "git_commit": head,
                  "prefect.flow_run_id": fp.current_flow_run_id(),
                  "mtdiff.sweep_points": ",".join(p.name for p in todo)}
    with tracking.client_run(f"sweep:{cfg.name}", params=base_params, uri=uri, tags=sweep_tags,
                             parent_run_id=tracking.parent_run_id()) as sweep_run:
        sweep_run.log_artifact(out_dir / "sweep.yaml")
        for point in todo:
            exp_base = exp_name_for(cfg.name, point.name, stamp)
            point_tags = {"mtdiff.sweep": cfg.name, "mtdiff.sweep_point": point.name}
            point_run = tracking.start_client_run(
                point.name, uri=uri, experiment=base_params.mlflow.experiment, parent_run_id=sweep_run.run_id,
                tags={**point_tags, "mtdiff.kind": "sweep_point", "dvc.exp_name": exp_base, "git_commit": head})
            point_run.log_params(point.overrides)
            state = point_task(point.name, point.overrides, exp_base, str(root), cfg.targets,
                               point_run.run_id, uri, point_tags, copy_paths, return_state=True)
            row: dict[str, Any] = {"point": point.name, "params": point.overrides,
                                   "mlflow_run_id": point_run.run_id}
            if state.is_completed():
                result = state.result()
                row.update(status="ok", experiment=result["experiment"], metrics=result["metrics"],
                           rev=result["rev"])
                point_run.set_tags({"dvc.exp_name": result["experiment"], "dvc.exp_rev": result["rev"]})
                point_run.log_metrics(result["metrics"])
                point_run.end("FINISHED")
            else:
                error = state.result(raise_on_failure=False)
                row.update(status="failed", experiment=exp_base, metrics={}, error=str(error)[-2000:])
                logger.error("point %s failed: %s", point.name, error)
                point_run.end("FAILED")
            rows.append(row)
        report = write_report(rows, out_dir, metrics=cfg.metrics, title=f"sweep {cfg.name}")
        for path in [report.csv, report.md, *report.plots]:
            sweep_run.log_artifact(path, artifact_path="report")
        failed = [r["point"] for r in rows if r["status"] != "ok"]
        sweep_run.set_tags({"mtdiff.failed_points": ",".join(failed)})
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
    parser.add_argument("--points", default=None, help="comma-separated subset of point names")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed point (not for bad params)")
    parser.add_argument("--copy", action="append", default=None, metavar="PATH",
                        help="untracked/ignored path to copy into each experiment (dvc exp run -C); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print the points and commands, run nothing")
    args = parser.parse_args(argv)
    subset = [p for p in (args.points or "").split(",") if p] or None
    try:
        if args.dry_run:
            root = fp.find_repo(args.repo)
            cfg = load_sweep(args.config, name=args.name, base_dir=root)
            for point in cfg.points:
                if subset and point.name not in subset:
                    continue
                fp.load_repo_params(root, point.overrides)
                copies = [arg for path in args.copy or [] for arg in ("-C", path)]
                cmd = ["dvc", "exp", "run", "--temp", "--name", exp_name_for(cfg.name, point.name, "STAMP"),
                       *copies, *set_param_args(point.overrides), *cfg.targets]
                print(f"{point.name}: {shlex.join(cmd)}")
            return 0
        sweep(config=args.config, repo=args.repo, name=args.name, points=subset, retries=args.retries,
              copy_paths=args.copy)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the flow already logged the details
        print(f"error: sweep failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
