"""mtdiff.pipeline.local_sweep: a sweep's points run in-process (a GPU node without DVC), rows as flows.sweep's."""
from __future__ import annotations

import json
import shutil

import pytest

from fixtures.tiny_run import TINY
from mtdiff.config import DEFAULT_PARAMS
from mtdiff.pipeline.local_sweep import run_here
from mtdiff.pipeline.sweeps import finished_point, load_sweep


def _sweep(fmnist_dir) -> dict:
    base = {**TINY, "data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 32, "train.steps": 2,
            "sample.num_samples": 8, "sample.steps": 2, "evaluate.num_samples": 8, "evaluate.num_ref": 32,
            "evaluate.inception": False, "evaluate.classify_t": [1], "prepare.num_workers": 0}
    return {"name": "tiny", "base": base, "points": {"joint": {}, "classcond": {
        "model.class_conditional": True, "tasks.label.enabled": False}}, "seeds": {"values": [0, 1], "points": ["joint"]}}


@pytest.mark.slow
def test_points_run_in_process_share_data_per_seed_and_skip_when_finished(workdir, fmnist_dir):
    shutil.copyfile(DEFAULT_PARAMS, workdir / "params.yaml")
    (workdir / "dvc.yaml").write_text("stages: {}\n")  # the project root marker
    cfg = _sweep(fmnist_dir)
    done = run_here(cfg, workdir, "abc123", names=["joint__seed-1", "joint", "classcond"])
    assert done == ["joint__seed-1", "joint", "classcond"]  # the order asked for
    points = workdir / "sweeps" / "tiny" / "points"
    rows = {p: json.loads((points / f"{p}.json").read_text()) for p in done}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["git_commit"] == "abc123" and row["experiment"].startswith("in-process@")
        assert row["metrics"]["train/steps"] == 2 and "evaluate/fid_fmnist_cnn" in row["metrics"]
        assert (points / f"{name}.png").stat().st_size > 0
    assert "evaluate/label_acc_ens" in rows["joint"]["metrics"]
    assert "evaluate/label_acc_ens" not in rows["classcond"]["metrics"]
    # prepare / latents / representations once per seed: two data folders for three points
    assert len(list((workdir / "sweep_work" / "tiny").glob("data-*"))) == 2
    assert all(finished_point(points.parent, p) for p in load_sweep(cfg).points)
    assert run_here(cfg, workdir, "abc123") == []  # finished points are skipped
    with pytest.raises(ValueError, match="no point.*nope"):
        run_here(cfg, workdir, "abc123", names=["nope"])
