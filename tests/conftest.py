"""Shared fixtures: tests run in a temp dir with MLflow off unless they opt in."""
from __future__ import annotations

import os
import sys
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


# -- fresh machines and output folders (issue 11) ------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory):
    """Session-wide environment for every test (and the stage subprocesses tests start):

    - ``MTDIFF_OUTPUT_ROOTS``: pytest's temp folder, where tests put their stage outputs (outputs
      outside the project are refused otherwise, see ``mtdiff.config.check_output_dirs``);
    - ``MTDIFF_FMNIST_DIR``: when Debian's Fashion-MNIST is not installed (a fresh machine), a small
      deterministic look-alike in the real gzip'd IDX format (``tests/fixtures/fmnist_idx.py``), so
      the data-dependent tests run instead of being skipped;
    - ``PATH`` starts with this interpreter's folder, so the stage commands DVC runs (``python -m
      mtdiff.stages.<name>``) and the tools (``dvc``) are the suite's own, venv activated or not.
    """
    global FMNIST_DIR
    from fixtures import fmnist_idx

    env = {"MTDIFF_OUTPUT_ROOTS": os.pathsep.join(
        p for p in (str(tmp_path_factory.getbasetemp()), os.environ.get("MTDIFF_OUTPUT_ROOTS")) if p),
        "PATH": os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))}
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        env["MTDIFF_FMNIST_DIR"] = str(fmnist_idx.build(tmp_path_factory.mktemp("fashion-mnist-idx")))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        before, FMNIST_DIR = FMNIST_DIR, Path(env.get("MTDIFF_FMNIST_DIR", FMNIST_DIR))
        try:
            yield
        finally:
            FMNIST_DIR = before


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny models gain nothing from two, and on a shared, oversubscribed
    2-core machine OpenMP's spinning threads made steps ~20x slower. (Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """The tiny end-to-end project, built once per session (tests/fixtures/tiny_project.py); a test
    works on ``tiny_project.copy(dst)``."""
    from fixtures import tiny_project as tp

    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not at {FMNIST_DIR}")
    root = tmp_path_factory.mktemp("tiny-project") / "repo"
    return tp.TinyProject(root, tp.build(root, FMNIST_DIR))


@pytest.fixture
def tiny_imagenet(tmp_path):
    """A tiny ImageNet folder with broken files (tests/fixtures/imagenet_tree.py)."""
    from fixtures.imagenet_tree import build_tiny_imagenet

    return build_tiny_imagenet(tmp_path / "imagenet")
