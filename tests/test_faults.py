"""Fault injection: a stage SIGKILLed at a random point and run again ends with exactly the outputs of
an uninterrupted run (atomic outputs, stale temp folders cleaned, nothing half-written kept)."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fixtures.tiny_run import TINY
from mtdiff.io import OUTPUT_MARKER


def _prepare_cmd(fmnist_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mtdiff.stages.prepare", f"data.fashion_mnist_dir={fmnist_dir}",
            "data.max_per_split=200", "data.resolution=32", "data.out_dir=data", "prepare.num_workers=0"]


def _env() -> dict[str, str]:
    env = {**os.environ, "MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MTDIFF_PARAMS", None)
    return env


def _snapshot(prepared: Path) -> dict:
    """The prepared outputs, minus wall-clock timings."""
    out = {"files": sorted(p.name for p in prepared.iterdir())}
    for p in sorted(prepared.glob("*.npy")):
        out[p.name] = np.load(p).tobytes()
    out["manifest"] = pd.read_parquet(prepared / "manifest.parquet").to_dict("list")
    report = json.loads((prepared / "report.json").read_text())

    def drop_seconds(d):
        return {k: drop_seconds(v) if isinstance(v, dict) else v for k, v in d.items() if k != "seconds"}

    out["report"] = drop_seconds(report)
    out["classes"] = (prepared / "classes.json").read_text()
    return out


def test_prepare_sigkilled_at_random_points_then_rerun_matches_uninterrupted(fmnist_dir, tmp_path):
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    ref_root.mkdir()
    root.mkdir()
    start = time.monotonic()
    subprocess.run(_prepare_cmd(fmnist_dir), cwd=ref_root, env=_env(), check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    reference = _snapshot(ref_root / "data" / "prepared")
    assert OUTPUT_MARKER in reference["files"]

    rng = random.Random(11)
    for attempt in range(3):
        proc = subprocess.Popen(_prepare_cmd(fmnist_dir), cwd=root, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        prepared = root / "data" / "prepared"
        if prepared.exists():  # the kill came after the swap (or a previous attempt finished): complete
            assert _snapshot(prepared) == reference
    subprocess.run(_prepare_cmd(fmnist_dir), cwd=root, env=_env(), check=True, capture_output=True, timeout=300)
    assert _snapshot(root / "data" / "prepared") == reference
    assert not list((root / "data").glob(".prepared.*")), "temp folders of killed runs are cleaned up"


# -- latents, train, sample, evaluate ---------------------------------------------------------------
# One tiny pixel-mode pipeline (joint image-label; no Inception, no representations: evaluate skips
# those groups with a reason) is run once uninterrupted in ``ref/``. Each test copies ``ref/`` minus
# one stage's outputs (as DVC removes them before a run), SIGKILLs that stage at random points, runs
# it again and compares its outputs with ``ref/``'s.
STAGES = ("prepare", "latents", "train", "sample", "evaluate")
OUTPUTS = {"latents": ["data/latents"], "train": ["checkpoints", ".mtdiff/train_state", "metrics/train.json",
                                                  "metrics/train_log.csv"],
           "sample": ["samples"], "evaluate": ["metrics/evaluate.json", "metrics/plots"]}
_TIMING = re.compile(r"(seconds|time|_s$|per_s|resumed_from)")


def _overrides(fmnist_dir: Path) -> list[str]:
    over = {**TINY, "data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 48, "data.out_dir": "data",
            "train.out_dir": "checkpoints", "sample.out_dir": "samples", "evaluate.out_dir": "metrics",
            "evaluate.inception": False, "prepare.num_workers": 0, "train.num_workers": 0,
            "train.steps": 6, "train.ckpt_every": 2, "sample.num_samples": 8}
    return [f"{k}={v}" for k, v in over.items()]


def _stage_env() -> dict[str, str]:
    return {"MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MTDIFF_OFFLINE": "1"}


def _run_stage(stage: str, root: Path, fmnist_dir: Path) -> None:
    """``python -m mtdiff.stages.<stage> <overrides>`` in ``root``, in this process (modules already
    imported: no interpreter start per run)."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key, value in _stage_env().items():
            mp.setenv(key, value)
        mp.delenv("MTDIFF_PARAMS", raising=False)
        importlib.import_module(f"mtdiff.stages.{stage}").main(_overrides(fmnist_dir))


def _child(stage: str, root: Path, fmnist_dir: Path) -> None:  # a forked process, SIGKILLed by the test
    # One intra-op thread: torch then never enters an OpenMP parallel region, which libgomp cannot
    # run in a child forked from a parent that already used its thread pool (it may hang).
    torch.set_num_threads(1)
    # tqdm's write lock holds a process-shared semaphore: a child SIGKILLed while holding it would
    # leave the parent's next progress bar waiting forever (seen). The child gets a private lock.
    import threading

    import tqdm.auto
    import tqdm.std

    for bar_cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:
        bar_cls.set_lock(threading.RLock())
    _run_stage(stage, root, fmnist_dir)
    os._exit(0)


def _clean_json(obj, root: str):
    """JSON without wall-clock fields, the project path replaced (two roots compare equal)."""
    if isinstance(obj, dict):
        return {k: _clean_json(v, root) for k, v in obj.items() if not _TIMING.search(k)}
    if isinstance(obj, list):
        return [_clean_json(v, root) for v in obj]
    return obj.replace(root, "<root>") if isinstance(obj, str) else obj


def _outputs(root: Path, stage: str) -> dict:
    """A stage's outputs as comparable values: arrays, tensors, JSON without timings, other bytes."""
    out = {}
    for rel in OUTPUTS[stage]:
        base = root / rel
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else [base]
        for p in files:
            key = str(p.relative_to(root))
            if p.suffix == ".npy":
                out[key] = np.load(p).tobytes()
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    out[key] = {k: z[k].tobytes() for k in z.files}
            elif p.suffix == ".pt":
                if p.name != "ema.pt":  # the resumable state (RNG states, stats) is not an output to compare
                    continue
                state = torch.load(p, map_location="cpu", weights_only=True)
                shadow = state["ema"].get("shadow", state["ema"])
                out[key] = (state["step"], {k: v.numpy().tobytes() for k, v in shadow.items()})
            elif p.suffix == ".json":
                out[key] = _clean_json(json.loads(p.read_text()), str(root))
            elif p.name == "train_log.csv":
                with p.open(newline="") as f:
                    out[key] = [{k: v for k, v in row.items() if not _TIMING.search(k)} for row in csv.DictReader(f)]
            else:
                out[key] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def pipeline_ref(tmp_path_factory):
    """``(ref root, {stage: seconds}, fmnist dir)``: the uninterrupted run."""
    from conftest import FMNIST_DIR

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not at {FMNIST_DIR}")
    from mtdiff.config import DEFAULT_PARAMS

    root = tmp_path_factory.mktemp("pipeline") / "ref"
    root.mkdir()
    # the stages read <cwd>/params.yaml: a snapshot, so edits to the repo's params.yaml during the
    # test cannot make two runs differ
    shutil.copyfile(DEFAULT_PARAMS, root / "params.yaml")
    durations = {}
    for stage in STAGES:
        t0 = time.monotonic()
        _run_stage(stage, root, FMNIST_DIR)
        durations[stage] = time.monotonic() - t0
    return root, durations, FMNIST_DIR


@pytest.mark.parametrize("stage", ["latents", "train", "sample", "evaluate"])
def test_stage_sigkilled_at_a_random_point_then_rerun_matches_uninterrupted(pipeline_ref, tmp_path, stage):
    """The killed run is a fork of this process (SIGKILL, no cleanup of any kind runs), killed at a
    random point of the stage's work; the rerun's outputs equal the uninterrupted run's."""
    import multiprocessing

    ref, durations, fmnist_dir = pipeline_ref
    reference = _outputs(ref, stage)
    assert reference, f"{stage}: no outputs in the reference run"
    root = tmp_path / "run"
    shutil.copytree(ref, root, symlinks=True)
    for rel in OUTPUTS[stage]:
        p = root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    rng = random.Random(f"{stage}/11")
    kills, fraction = 0, rng.uniform(0.1, 0.9)
    for _ in range(8):  # two kills; a run that finished before its kill is retried with an earlier one
        proc = multiprocessing.get_context("fork").Process(target=_child, args=(stage, root, fmnist_dir))
        proc.start()
        time.sleep(fraction * durations[stage])
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        if proc.exitcode == -signal.SIGKILL:
            kills += 1
            fraction = rng.uniform(0.1, 0.9)
            if kills == 2:
                break
        else:  # finished first (train resumes from the previous kill's checkpoint, or a fast machine)
            fraction /= 2
    assert kills >= 1, f"{stage}: every run finished before its kill"
    _run_stage(stage, root, fmnist_dir)
    assert _outputs(root, stage) == reference
    leftovers = [p for p in root.rglob(".*") if p.name not in (".mtdiff", OUTPUT_MARKER)
                 and (not p.is_relative_to(root / ".mtdiff") or p.name.endswith(".tmp"))]
    assert not leftovers, f"temp files of killed runs left behind: {leftovers}"
