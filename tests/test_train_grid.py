"""Sample grids every ``train.grid_every`` steps: step-tagged MLflow images drawn from the EMA weights,
without changing what training computes (same weights with grids on as with them off)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fixtures.tiny_run import data_root, link_data, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")

# dropout draws from the global RNG during training: any global RNG draw (or a train/eval mode left
# changed) by the grid would change the weights
GRID_RUN = {"train.steps": 6, "model.dropout": 0.1, "sample.steps": 4, "mlflow.experiment": "grid-test"}


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    return data_root(tmp_path_factory)


def _train(root: Path, grid_every: int) -> dict[str, torch.Tensor]:
    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.stages import train

    params = tiny_params(root, **GRID_RUN, **{"train.grid_every": grid_every})
    result = train.train(params)
    assert result.model.training  # the trained model is left in train mode
    state = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in load_checkpoint(root / "checkpoints" / "ema.pt")["ema"]["shadow"].items()})
    return state


def test_grids_are_step_tagged_mlflow_images_and_leave_training_unchanged(shared_data, workdir, monkeypatch):
    from fixtures.mlflow_store import sqlite_store
    from mlflow import MlflowClient

    from mtdiff.train.loop import GRID_KEY

    off, on = workdir / "off", workdir / "on"
    for root in (off, on):
        link_data(shared_data, root)
    without = _train(off, grid_every=0)

    uri = sqlite_store(workdir / "store")
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    with_grids = _train(on, grid_every=2)

    assert without.keys() == with_grids.keys()
    changed = [k for k in without if not torch.equal(without[k], with_grids[k])]
    assert not changed, f"grids changed the training trajectory: {changed[:5]}"

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("grid-test").experiment_id])
    images = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
    # MLflow names a step-tagged image <key with / as ~>+step+<step>+timestamp+...
    found = [re.match(r"(.+?)[+%]step[+%](\d+)[+%]", name) for name in images]
    assert all(found) and {m[1] for m in found} == {GRID_KEY.replace("/", "~")}, images
    assert sorted({int(m[2]) for m in found}) == [2, 4, 6], images
