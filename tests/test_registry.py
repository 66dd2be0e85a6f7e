"""MLflow models and data of a training run (mtdiff.pipeline.registry, called by the train stage): the EMA
model logged with a signature and an input example, registered as ``mtdiff``, loadable with
``mlflow.pytorch.load_model`` and sampling; the data set as the run's input; the loss curve as a
metric history; system metrics."""
from __future__ import annotations

import pytest
import torch

from fixtures.tiny_run import data_root, link_data, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    return data_root(tmp_path_factory)


def test_train_registers_the_ema_model_and_records_the_data(shared_data, workdir, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from fixtures.mlflow_store import sqlite_store
    from mlflow import MlflowClient

    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.diffusion import Sampler
    from mtdiff.pipeline.registry import MODEL_NAME, file_digest
    from mtdiff.stages import train

    link_data(shared_data, workdir)
    uri = sqlite_store(workdir / "store")
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    monkeypatch.setenv("MTDIFF_PARENT_RUN_ID", "")
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    client = MlflowClient(tracking_uri=uri)

    # a sweep's training registers nothing unless the sweep asks (flows.sweep --register)
    monkeypatch.setenv("MTDIFF_MLFLOW_TAGS", '{"mtdiff.sweep": "s"}')
    train.run(tiny_params(workdir, **{"train.steps": 4, "mlflow.experiment": "registry-test", "seed": 3}))
    assert client.search_model_versions(f"name='{MODEL_NAME}'") == []
    monkeypatch.delenv("MTDIFF_MLFLOW_TAGS")
    for n in (1, 2):  # a version per training run; training alone moves no alias
        train.run(tiny_params(workdir, **{"train.steps": 4, "mlflow.experiment": "registry-test", "seed": n}))
        (version,) = client.search_model_versions(f"name='{MODEL_NAME}' and version_number={n}")
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "train"
        assert version.tags["params_hash"] == run.data.tags["params_hash"]
        assert float(version.tags["final_loss"]) == pytest.approx(run.data.metrics["train/step/loss"])
        assert client.get_registered_model(MODEL_NAME).aliases == {}
    _evaluation_moves_the_alias(workdir, client)

    # the loss curve is a metric history, the data set the run's input (digest of the manifest)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/step/loss")] == [2, 4]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == file_digest(workdir / "data" / "prepared" / "manifest.parquet")
    assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["training"]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)

    # the registered model: signature + input example, loads and samples one image per label
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/2")
    assert info.signature.inputs.to_dict()[0]["type"] == "tensor"
    assert info.saved_input_example_info is not None
    sampler = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@champion")
    ema = load_checkpoint(workdir / "checkpoints" / "ema.pt")["ema"]["shadow"]
    assert all(torch.equal(v, ema[k]) for k, v in sampler.model.state_dict().items())
    # the sampler as the sample stage builds it (guidance, input policies, steps)
    assert sampler.sampler == Sampler.from_params(tiny_params(workdir), sampler.sampler.diffusion)
    images = sampler(torch.tensor([0, 3, 7]), steps=3, seed=1)
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    assert torch.equal(images, sampler(torch.tensor([0, 3, 7]), steps=3, seed=1))  # seeded
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/2")
    assert pyfunc.predict(torch.tensor([1, 2]).numpy(), params={"steps": 2}).shape == (2, 1, 28, 28)
    _loads_in_a_fresh_process_without_mtdiff(uri, workdir)


def _evaluation_moves_the_alias(workdir, client) -> None:
    """The evaluate stage's part: its numbers against the model of ema.pt (by digest), then the alias."""
    from mtdiff.pipeline import registry
    from mtdiff.pipeline.tracking import stage_run

    params = tiny_params(workdir, **{"mlflow.experiment": "registry-test"})
    with stage_run(params, "evaluate") as run:
        version = registry.evaluated_version(workdir / "checkpoints" / "ema.pt")
        run.log_metrics({"evaluate/fid": 12.5}, model_id=registry.model_id_of(version))
        registry.promote(params, version)
    assert str(version.version) == "2"  # ema.pt is the newest training's
    assert str(client.get_model_version_by_alias(registry.MODEL_NAME, "champion").version) == "2"
    linked = {m.key: m.value for m in client.get_logged_model(registry.model_id_of(version)).metrics}
    assert linked["evaluate/fid"] == 12.5  # beside what training linked (final loss, model size)


LOAD_AND_SAMPLE = """
import sys
sys.path.append(sys.argv[2])  # the venv's site-packages: MLflow and torch, but no .pth: no editable mtdiff
try:
    import mtdiff
    raise SystemExit("mtdiff importable before loading: the test proves nothing")
except ImportError:
    pass
import mlflow, torch
mlflow.set_tracking_uri(sys.argv[1])
sampler = mlflow.pytorch.load_model("models:/mtdiff@champion")
print("shape", tuple(sampler(torch.tensor([0, 1]), steps=2).shape), sys.modules["mtdiff"].__file__)
"""


def _loads_in_a_fresh_process_without_mtdiff(uri: str, workdir) -> None:
    """The registered model loads and samples with only MLflow's loader: the mtdiff it needs comes from
    the model's code_paths, not from this checkout or the venv's editable install (python -S)."""
    import subprocess
    import sys
    import sysconfig

    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-S", "-c", LOAD_AND_SAMPLE, uri, site], capture_output=True, text=True,
                          cwd=workdir, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, where = proc.stdout.split("shape ", 1)[1].rsplit(" ", 1)
    assert shape == "(2, 1, 28, 28)" and "/code/mtdiff/" in where.replace("\\", "/")


def test_no_mlflow_no_registry(shared_data, workdir, monkeypatch):
    """MLflow off (MTDIFF_MLFLOW=0): training neither logs nor fails."""
    from mtdiff.pipeline import registry
    from mtdiff.stages import train

    link_data(shared_data, workdir)
    called = []
    monkeypatch.setattr(registry, "log_model", lambda *a, **k: called.append(a))
    train.run(tiny_params(workdir, **{"train.steps": 2}))
    assert called == []
