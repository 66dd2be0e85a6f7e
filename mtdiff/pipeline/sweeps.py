"""Sweep configs and their DVC experiments: the config model and its expansion into points, the
``dvc exp run`` arguments of a point (``-S`` values in Hydra's override grammar), and its results read
back from ``dvc exp show --json``. ``flows.sweep`` runs the points as Prefect tasks.

A sweep config (YAML under configs/sweeps/, or a dict) holds::

    name: tasks                      # results go to sweeps/<name>/
    base: {train.steps: 1500}        # overrides shared by every point (the common budget)
    points:                          # named points: {name: {dotted.key: value, ...}}
      single_task: {tasks.label.enabled: false, sample.condition: uncond}
    grid:                            # and/or a cartesian product: {dotted.key: [v1, v2, ...]}
      diffusion.w_max: [0.05, 0.1]
    seeds: {values: [0, 1], points: [single_task]}  # these points again at each further seed
                                     # (or a list of such groups: other points, other seeds)
    metrics: ["evaluate/fid*"]       # main metrics to plot (globs); default: all metrics
    targets: []                      # DVC targets for `dvc exp run` (default: the whole pipeline)

Points are the named points times the grid combinations (either may be absent). ``seeds`` repeats
the listed points (all when ``points`` is left out) at each further seed (param ``seed``): the point at
``values[0]`` keeps its name, the others are ``<point>__seed-<v>``; the report adds mean ± std per point.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from mtdiff.config import ConfigError, flatten
from mtdiff.io import atomic_path
from mtdiff.pipeline.dvc_runner import dvc_command, load_repo_params, subprocess_env
from mtdiff.pipeline.report import SEED_SUFFIX, flatten_metrics, write_report

SWEEP_KEYS = {"name", "description", "base", "points", "grid", "seeds", "metrics", "targets"}
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


# -- config ---------------------------------------------------------------------------------
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
        merged = {**base, **pover, **gover}
        for key, value in merged.items():
            check_override(key, value)
        out.append(SweepPoint(name, merged))
    names = [p.name for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"sweep: duplicate point names {dupes}")
    return out


def repeat_seeds(points: list[SweepPoint], seeds: Any, where: str) -> list[SweepPoint]:
    """``seeds: {values: [0, 1], points: [a, b]}``: a and b at seed 0 (their names) and at seed 1
    (``a__seed-1``, right after a); the other points as they are. A list of such groups gives
    different points different seeds (each point in one group at most)."""
    if seeds is None:
        return points
    groups = seeds if isinstance(seeds, list) else [seeds]
    values_of: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        at = f"{where}: seeds" + (f"[{i}]" if groups is seeds else "")
        values, names = _seed_group(group, points, at)
        if twice := sorted(set(names) & set(values_of)):
            raise ConfigError(f"{at}.points: {twice} already in an earlier seeds group")
        values_of.update(dict.fromkeys(names, values))
    out: list[SweepPoint] = []
    for point in points:
        if point.name not in values_of:
            out.append(point)
            continue
        if "seed" in point.overrides:
            raise ConfigError(f"{where}: point {point.name} sets seed itself and is in seeds.points")
        values = values_of[point.name]
        out.append(SweepPoint(point.name, {**point.overrides, "seed": values[0]}))
        out += [SweepPoint(f"{point.name}{SEED_SUFFIX}{v}", {**point.overrides, "seed": v}) for v in values[1:]]
    return out


def _seed_group(group: Any, points: list[SweepPoint], at: str) -> tuple[list[int], list[str]]:
    """One ``{values, points}`` group, validated: its seeds and its points (all when left out)."""
    if not isinstance(group, dict) or set(group) - {"values", "points"}:
        raise ConfigError(f"{at}: expected {{values: [0, 1], points: [name, ...]}} (or a list of them)")
    values = group.get("values")
    if (not isinstance(values, list) or not values or len(set(values)) != len(values)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{at}.values: expected a list of distinct integers, got {values!r}")
    names = group.get("points") or [p.name for p in points]
    unknown = sorted(set(names) - {p.name for p in points})
    if unknown:
        raise ConfigError(f"{at}.points: no point(s) {unknown}")
    return values, names


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
    for target in targets:
        if not target.strip() or target.lstrip().startswith("-"):
            raise ConfigError(f"{source}: targets: {target!r} is not a DVC stage or dvc.yaml path "
                              f"(a leading '-' would be read as a dvc option)")
    expanded = expand_points(_overrides(config.get("base"), f"{source}: base"), points, grid)
    return SweepConfig(name=name, points=repeat_seeds(expanded, config.get("seeds"), source),
                       metrics=metrics, targets=targets, description=str(config.get("description") or ""),
                       source=source)


def select_points(cfg: SweepConfig, names: Sequence[str] | None) -> list[SweepPoint]:
    """The points of ``cfg`` named in ``names``, in the order given (all, in config order, when empty)."""
    if not names:
        return cfg.points
    missing = sorted(set(names) - {p.name for p in cfg.points})
    if missing:
        raise ConfigError(f"sweep {cfg.name}: no point(s) {missing}; have {[p.name for p in cfg.points]}")
    by_name = {p.name: p for p in cfg.points}
    return [by_name[n] for n in dict.fromkeys(names)]


def check_points(root: Path, cfg: SweepConfig, points: Sequence[SweepPoint]) -> None:
    """Validate every point's params against the repo's params.yaml, before the first one spends compute."""
    for point in points:
        try:
            load_repo_params(root, point.overrides)
        except ConfigError as err:
            raise ConfigError(f"sweep {cfg.name} point {point.name}: {err}") from None


# -- finished points: one JSON each, committed with the report, skipped on a rerun ---------------
POINT_STATE_ROOT = Path(".mtdiff") / "sweep_state"  # gitignored, .dvcignored


def point_result_path(out_dir: Path, point: str) -> Path:
    return out_dir / "points" / f"{point}.json"


def point_state_dir(root: Path, sweep: str, point: str) -> Path:
    """The point's resumable training state (its experiment's ``$MTDIFF_TRAIN_STATE_ROOT``): in the
    sweep's checkout, since the experiment's temporary copy dies with a kill; so a rerun of a killed
    point resumes its training from the last checkpoint (``train.ckpt_every``). Removed once it finished."""
    return root.resolve() / POINT_STATE_ROOT / sweep / point


def save_point_result(out_dir: Path, row: dict[str, Any]) -> Path:
    """``out_dir/points/<point>.json`` (atomic): a finished point's row, what the report is built from.
    Keys keep their order (not sorted): the params' order is the report's column order."""
    path = point_result_path(out_dir, row["point"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(row, indent=2, default=str) + "\n")
    return path


POINT_GRID = "samples/grid.png"  # the sample stage's grid, kept beside each point's row


def save_point_grid(root: Path, out_dir: Path, point: str, rev: str) -> Path:
    """``out_dir/points/<point>.png``: the point's sample grid out of its experiment (``dvc get`` at the
    experiment's commit, from this repo's cache), so the pictures are committed with the numbers.
    Raises RuntimeError (nothing written) when the experiment has no grid."""
    dest = out_dir / "points" / f"{point}.png"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        proc = subprocess.run(dvc_command("get", str(root), POINT_GRID, "--rev", rev, "-o", str(tmp), "--force"),
                              cwd=root, env=subprocess_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc get {POINT_GRID} at {rev[:7]} failed: {proc.stderr.strip()[-500:]}")
    return dest


def finished_point(out_dir: Path, point: SweepPoint,
                   resolve: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any] | None:
    """The saved row of ``point`` if it finished (status ok) with the same overrides, else None.

    ``resolve`` (overrides -> the params they give): overrides that differ but resolve to the same
    params count as the same (a ``seed: 0`` a seeds block added over the default seed 0). A point
    whose params changed, or whose file is unreadable, counts as not run (a killed run never leaves
    a file: it is written only after the point's experiment finished)."""
    path = point_result_path(out_dir, point.name)
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if row.get("status") != "ok" or not isinstance(row.get("params"), dict):
        return None
    if row["params"] == json.loads(json.dumps(point.overrides)):
        return row
    try:
        return row if resolve is not None and resolve(row["params"]) == resolve(point.overrides) else None
    except ValueError:  # a saved override the config no longer accepts (ConfigError)
        return None


def finished_rows(root: Path, cfg: SweepConfig, out_dir: Path) -> dict[str, dict[str, Any]]:
    """The saved row of every point of ``cfg`` that finished, by name (same params: same point)."""
    same_params = functools.partial(load_repo_params, root)
    return {p.name: row for p in cfg.points if (row := finished_point(out_dir, p, same_params))}


def rebuild_report(config: str | Path, root: Path) -> Any:
    """``sweeps/<name>/comparison.*`` and plots from the committed point results alone (nothing runs):
    after copying points in from another clone, or to read a sweep at another commit."""
    cfg = load_sweep(config, base_dir=root)
    out_dir = root / "sweeps" / cfg.name
    rows = list(finished_rows(root, cfg, out_dir).values())
    if not rows:
        raise FileNotFoundError(f"{out_dir / 'points'}: no finished point of sweep {cfg.name!r}")
    return sweep_report(cfg, out_dir, rows)


def sweep_report(cfg: SweepConfig, out_dir: Path, rows: Sequence[dict[str, Any]]) -> Any:
    """The sweep's comparison table and plots (``mtdiff.pipeline.report.write_report``) from its points' rows."""
    return write_report(rows, out_dir, metrics=cfg.metrics, title=f"sweep {cfg.name}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mtdiff.pipeline.sweeps",
                                 description="rebuild a sweep's comparison from its saved points (runs nothing)")
    ap.add_argument("command", choices=["report"])
    ap.add_argument("config", help="sweep YAML, e.g. configs/sweeps/study.yaml")
    ap.add_argument("--repo", default=".", help="DVC project root (default: .)")
    args = ap.parse_args(argv)
    report = rebuild_report(args.config, Path(args.repo).resolve())
    print(f"{report.csv}, {report.md} and {len(report.plots)} plot(s) rebuilt from the saved points")
    return 0


def write_sweep_file(out_dir: Path, cfg: SweepConfig, points: Sequence[SweepPoint]) -> Path:
    """``out_dir/sweep.yaml``: the config with the points that run (a record beside the report)."""
    path = out_dir / "sweep.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({**cfg.to_dict(), "points": {p.name: p.overrides for p in points}},
                                      sort_keys=False))
    return path


# -- dvc exp run ----------------------------------------------------------------------------
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


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_override(key: str, value: Any) -> None:
    """Refuse what ``dvc exp run -S`` would not pass through literally: keys that are no dotted names
    and string values holding ``${...}`` (DVC/Hydra interpolation would replace them)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ConfigError(f"sweep override key {key!r}: expected a dotted name like train.steps")
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str) and "${" in v:
            raise ConfigError(f"sweep override {key}={v!r}: '${{...}}' would be interpolated by DVC/Hydra; "
                              f"use the literal value")
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """``{"train.steps": 5}`` -> ``["-S", "++train.steps=5"]`` (``++``: add the key if params.yaml lacks it)."""
    args: list[str] = []
    for key, value in overrides.items():
        check_override(key, value)
        args += ["-S", f"++{key}={hydra_value(value)}"]
    return args


def exp_name_for(sweep: str, point: str, stamp: str, attempt: int = 1) -> str:
    """DVC experiment names must be unique and valid git ref parts."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{sweep}-{point}-{stamp}")
    return name if attempt <= 1 else f"{name}-try{attempt}"


def exp_run_args(exp_name: str, overrides: dict[str, Any], targets: Sequence[str] = (),
                 copy_paths: Sequence[str] | None = None) -> list[str]:
    """``exp run --temp --name <exp> [-C path ...] -S ++k=v ... [targets]`` (after ``dvc``): a temporary
    copy of the repo, so the workspace is untouched and DVC's run-cache restores unchanged stages."""
    for target in targets:
        if target.startswith("-"):
            raise ConfigError(f"target {target!r}: a leading '-' would be read as a dvc option")
    copies = [arg for path in copy_paths or [] for arg in ("-C", path)]
    return ["exp", "run", "--temp", "--name", exp_name, *copies, *set_param_args(overrides), *targets]


def dry_run_commands(root: Path, cfg: SweepConfig, subset: Sequence[str] | None = None,
                     copy_paths: Sequence[str] | None = None) -> Iterator[str]:
    """``<point>: dvc exp run ...`` per point (of ``subset`` if given), each validated first."""
    for point in cfg.points:
        if subset and point.name not in subset:
            continue
        load_repo_params(root, point.overrides)
        cmd = ["dvc", *exp_run_args(exp_name_for(cfg.name, point.name, "STAMP"), point.overrides,
                                    cfg.targets, copy_paths)]
        yield f"{point.name}: {shlex.join(cmd)}"


# -- results --------------------------------------------------------------------------------
def exp_show(root: Path) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of ``root``."""
    proc = subprocess.run(dvc_command("exp", "show", "--json"), cwd=root, env=subprocess_env(),
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
    """``{"rev", "metrics": {"evaluate/fid": ...}, "missing_metrics": [files not in its commit]}``."""
    found = find_experiment(exp_show(root), exp_name)
    if found is None:
        raise RuntimeError(f"experiment {exp_name} not in `dvc exp show` after it ran")
    data = found.get("data") or {}
    per_file = data.get("metrics") or {}
    missing = sorted(f for f, v in per_file.items() if isinstance(v, dict) and v.get("error"))
    return {"rev": found.get("rev"), "metrics": flatten_metrics(per_file), "missing_metrics": missing}


# what a point's numbers depend on: a commit touching only other files (docs, tests) leaves them valid
RESULT_PATHS = ("mtdiff", "dvc.yaml", "params.yaml", "configs", "pyproject.toml")


def code_changed(root: Path, old: str | None, new: str) -> bool:
    """Whether :data:`RESULT_PATHS` differ between commits ``old`` and ``new`` (an unknown or missing
    ``old`` counts as changed)."""
    if not old:
        return True
    if old == new:
        return False
    proc = subprocess.run(["git", "diff", "--quiet", old, new, "--", *RESULT_PATHS], cwd=root,
                          capture_output=True)
    return proc.returncode != 0  # 1: they differ; 128: old is not in this repo


def stale_rows(root: Path, rows: dict[str, dict[str, Any]], head: str) -> dict[str, str]:
    """Point -> one line saying why its saved row was computed on other code than ``head``."""
    out = {}
    for name, row in rows.items():
        commit = row.get("git_commit")
        if code_changed(root, commit, head):
            out[name] = (f"point {name}: finished on commit {(commit or 'unknown')[:10]}, and the code or "
                         f"params ({', '.join(RESULT_PATHS)}) changed since (HEAD {head[:10]}); "
                         f"--rerun-stale runs it again")
    return out


def untracked_files(root: Path) -> list[str]:
    """Untracked, not ignored files: ``dvc exp run --temp`` leaves them out of the experiment's copy."""
    proc = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=root,
                          capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else []


def git_head(root: Path) -> str:
    """HEAD's commit; ConfigError if ``root`` is no git repo with a commit (``dvc exp run`` needs one)."""
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{root}: dvc exp run needs a git repo with at least one commit")
    return proc.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
