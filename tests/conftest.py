"""Shared fixtures: tests run in a temp dir with MLflow off unless they opt in."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

FMNIST_DIR = Path(os.environ.get("MTDIFF_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
torch.set_num_threads(1)  # tiny tensors: one thread avoids oversubscription on 2-core CI


@pytest.fixture
def fmnist_dir() -> Path:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return FMNIST_DIR


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temp working directory with MLflow logging switched off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTDIFF_MLFLOW", "0")
    return tmp_path


@pytest.fixture
def make_params(workdir):
    """``make_params(**{"train.steps": 2})`` -> validated Params rooted in the temp workdir."""
    from mtdiff.config import DEFAULT_PARAMS, load_params

    def _make(overrides: dict | None = None, **kw):
        merged = {"data.out_dir": str(workdir / "data"), "train.out_dir": str(workdir / "checkpoints"),
                  "sample.out_dir": str(workdir / "samples"), "evaluate.out_dir": str(workdir / "metrics"),
                  **(overrides or {}), **kw}
        return load_params(DEFAULT_PARAMS, overrides=merged)

    return _make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
