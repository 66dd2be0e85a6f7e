"""Fault injection: a stage SIGKILLed at a random point and run again ends with exactly the outputs of
an uninterrupted run (atomic outputs, stale temp folders cleaned, nothing half-written kept)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures.faults import KILLED_STAGES, kill_and_rerun
from mtdiff.io import OUTPUT_MARKER


def _prepare_cmd(fmnist_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mtdiff.stages.prepare", f"data.fashion_mnist_dir={fmnist_dir}",
            "data.max_per_split=200", "data.resolution=32", "data.out_dir=data", "prepare.num_workers=0"]


def _env() -> dict[str, str]:
    env = {**os.environ, "MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MTDIFF_PARAMS", None)
    return env


def _snapshot(prepared: Path) -> dict:
    """The prepared outputs, every file's content."""
    out = {"files": sorted(p.name for p in prepared.iterdir())}
    for p in sorted(prepared.glob("*.npy")):
        out[p.name] = np.load(p).tobytes()
    out["manifest"] = pd.read_parquet(prepared / "manifest.parquet").to_dict("list")
    out["report"] = json.loads((prepared / "report.json").read_text())  # no timings: compared whole
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


@pytest.mark.parametrize("stage", KILLED_STAGES)
def test_stage_sigkilled_at_a_random_point_then_rerun_matches_uninterrupted(tiny_project, tmp_path, stage):
    """Two SIGKILLs at random points of the stage's work, then a full run: the outputs equal the
    uninterrupted run's and no temp file is left (scripts/fault_loop.py runs this over many points)."""
    result = kill_and_rerun(tiny_project.root, tiny_project.durations, stage, tmp_path / "run",
                            random.Random(f"{stage}/11"))
    assert result["kills"], f"{stage}: every run finished before its kill"
    assert result["equal"], f"{stage}: outputs after kills at {result['kills']} differ from the uninterrupted run's"
    assert not result["leftovers"], f"temp files of killed runs left behind: {result['leftovers']}"
