"""A sweep's points run in this process, one stage after another: for a machine with a GPU but
without DVC, git or MLflow (a rented node, a batch job), where ``flows.sweep`` cannot run.

Each point runs the stages' own ``run(params)`` (the same code ``dvc repro`` runs) with its output
folders under ``sweep_work/<sweep>/``: prepare, latents and representations once per distinct data params and
seed, train / sample / evaluate per point. A finished point leaves the same
row ``flows.sweep`` writes (``sweeps/<name>/points/<point>.json``, ``experiment: in-process@<host>``)
and its grid, so ``python -m mtdiff.pipeline.sweeps report`` builds the comparison from either kind of row.
Points already finished with the same overrides are skipped; ``--budget-s`` stops starting points
once the time is spent (a long job is split over calls, each finished point kept).

    python -m mtdiff.pipeline.local_sweep configs/sweeps/dit_reference.yaml --commit $(git rev-parse HEAD)
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import shutil
import socket
import time
from pathlib import Path
from types import ModuleType

from mtdiff.config import Params, load_params, project_root
from mtdiff.pipeline.report import flatten_metrics
from mtdiff.pipeline.sweeps import SweepPoint, finished_point, load_sweep, save_point_result
from mtdiff.utils import get_logger

log = get_logger("mtdiff.pipeline.local_sweep")
WORK_DIR = "sweep_work"  # gitignored scratch for the points' stage outputs
DATA_SECTIONS = ("data", "prepare", "latents", "representations")


def _data_key(params: Params) -> str:
    """Points whose data stages (prepare, latents, representations) see the same params share their outputs."""
    relevant = {k: v for k, v in params.flat().items()
                if k.split(".")[0] in DATA_SECTIONS or k in ("seed", "diffusion.mode", "tasks.transition.pairing",
                                                              "tasks.transition.enabled")
                and not k.endswith("out_dir")}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:10]


def point_params(root: Path, sweep: str, point: SweepPoint) -> Params:
    """The point's params: params.yaml, its overrides, and output folders of its own (data shared, :func:`_data_key`)."""
    work = Path(WORK_DIR) / sweep
    dirs = {"train.out_dir": str(work / point.name / "checkpoints"), "sample.out_dir": str(work / point.name / "samples"),
            "evaluate.out_dir": str(work / point.name / "metrics")}
    params = load_params(root / "params.yaml", overrides={**point.overrides, **dirs})
    return load_params(root / "params.yaml",
                       overrides={**point.overrides, **dirs, "data.out_dir": str(work / f"data-{_data_key(params)}")})


def stage_module(name: str) -> ModuleType:
    """The stage module dvc.yaml's ``cmd`` runs (``python -m mtdiff.stages.<name>``), found by name: the
    pipeline machinery imports no stage module (tests/test_layering.py)."""
    return importlib.import_module(f"mtdiff.stages.{name}")


def run_point(params: Params) -> dict[str, float]:
    """The pipeline's stages in order for one point; returns its flattened metrics."""
    prepare, latents, representations, train, sample, evaluate = map(
        stage_module, ("prepare", "latents", "representations", "train", "sample", "evaluate"))
    if not (params.prepared_dir / "report.json").exists():
        prepare.run(params)
    if not (params.latents_dir / "train" / "meta.json").exists():  # pixel mode too: the stored images
        latents.run(params)
    if not (params.representations_dir / "meta.json").exists():
        representations.run(params)
    for stage in (train, sample, evaluate):
        stage.run(params)
    files = sorted(params.metrics_dir.glob("*.json"))
    return flatten_metrics({str(f): json.loads(f.read_text()) for f in files if f.stem != "mlflow_pending"})


def run_here(config: str, root: Path, commit: str, names: list[str] | None = None,
             budget_s: float | None = None) -> list[str]:
    """Run the sweep's unfinished points (or ``names``) here; returns the points finished by this call."""
    cfg = load_sweep(config, base_dir=root)
    out_dir = root / "sweeps" / cfg.name
    by_name = {p.name: p for p in cfg.points}
    missing = sorted(set(names or ()) - set(by_name))
    if missing:
        raise ValueError(f"sweep {cfg.name}: no point(s) {missing}; have {sorted(by_name)}")
    todo = [by_name[n] for n in names] if names else cfg.points  # the order asked for
    start, done = time.monotonic(), []
    for point in todo:
        if finished_point(out_dir, point):
            log.info("point %s: finished before, skipped", point.name)
            continue
        if budget_s is not None and time.monotonic() - start > budget_s:
            log.info("budget of %.0f s spent: %s and later points left for the next call", budget_s, point.name)
            break
        t0 = time.monotonic()
        params = point_params(root, cfg.name, point)
        metrics = run_point(params)
        row = {"point": point.name, "params": point.overrides, "mlflow_run_id": None, "git_commit": commit,
               "status": "ok", "experiment": f"in-process@{socket.gethostname()}", "metrics": metrics,
               "seconds": round(time.monotonic() - t0, 1)}
        path = save_point_result(out_dir, row)
        grid = params.samples_dir / "grid.png"
        if grid.exists():
            shutil.copyfile(grid, out_dir / "points" / f"{point.name}.png")
        log.info("point %s finished in %.0f s -> %s", point.name, row["seconds"], path)
        done.append(point.name)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtdiff.pipeline.local_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="sweep YAML, e.g. configs/sweeps/dit_reference.yaml")
    ap.add_argument("--commit", required=True, help="the code's git commit, recorded in each row")
    ap.add_argument("--points", nargs="*", default=None,
                    help="only these points, in this order (default: every point, in the config's order)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no point after this many seconds")
    args = ap.parse_args(argv)
    done = run_here(args.config, project_root(), args.commit, args.points, args.budget_s)
    print(f"{len(done)} point(s) finished: {', '.join(done) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
