"""MLflow tracking: nesting tags, tracking-server-down behaviour and replay of the kept records."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from fixtures.mlflow_store import sqlite_store
from mtdiff.config import DEFAULT_PARAMS, load_params
from mtdiff.pipeline.mlflow_replay import read_pending, replay_pending
from mtdiff.pipeline.tracking import PENDING_FILE, client_run, pending_file, stage_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_down(tmp_path, monkeypatch):
    """Tracking URI at a closed local port, with no retries and a short timeout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    for var in ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID", "MTDIFF_DVC_STAGE", "MTDIFF_MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _store(tmp_path) -> str:
    return sqlite_store(tmp_path / "store")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_stage_continues_when_server_down_and_replay_sends_records(mlflow_down, monkeypatch):
    params = load_params(DEFAULT_PARAMS, overrides={"mlflow.experiment": "down", "train.steps": 7})
    out = mlflow_down / "out"
    artifact = mlflow_down / "summary.json"
    artifact.write_text('{"ok": true}')
    monkeypatch.setenv("MTDIFF_DVC_STAGE", "train")
    reached_end = False
    with stage_run(params, "train", out) as run:
        assert run.run_id is None
        run.log_metrics({"loss": 1.5, "skip": None}, step=3)
        run.set_tags({"note": "offline"})
        run.log_image(np.full((4, 4, 3), 200, np.uint8), "grid.png")
        run.log_artifact(artifact)
        reached_end = True
    assert reached_end
    assert not out.exists()  # nothing lands in the stage's (DVC) output folder
    records = read_pending(pending_file("train"))
    kinds = [r["what"] for r in records]
    assert kinds == ["start_run", "log_params", "log_metrics", "set_tags", "log_image", "log_artifact", "end_run"]
    assert len({r["key"] for r in records}) == 1
    assert records[0]["kwargs"]["tags"]["dvc.stage"] == "train"
    assert records[2]["args"][0] == {"loss": 1.5} and records[2]["kwargs"]["step"] == 3

    uri = _store(mlflow_down)
    summary = replay_pending(pending_file("train"), uri=uri)
    assert summary["failed"] == 0 and summary["replayed"] == 5 and len(summary["runs"]) == 1
    client = _client(uri)
    run = client.get_run(summary["runs"][0])
    assert run.info.run_name == "train" and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "7"
    assert run.data.tags["mtdiff.stage"] == "train" and run.data.tags["note"] == "offline"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5)]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"grid.png", "summary.json"}
    assert client.get_experiment(run.info.experiment_id).name == "down"

    again = replay_pending(pending_file("train"), uri=uri)  # idempotent: the group is already there
    assert again["runs"] == [] and again["skipped_groups"] == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_replay_into_existing_run_and_failed_status(mlflow_down):
    uri = _store(mlflow_down)
    client = _client(uri)
    exp_id = client.create_experiment("existing")
    run_id = client.create_run(exp_id, run_name="sample").info.run_id
    pending = mlflow_down / PENDING_FILE
    pending.write_text("\n".join([
        json.dumps({"what": "log_metrics", "args": [{"fid": 12.5}], "kwargs": {"step": None}, "time": 1e9,
                    "key": "k1", "stage": "sample", "run_id": run_id}),
        "not json",
        json.dumps({"what": "log_artifact", "args": [str(mlflow_down / "gone.png")], "kwargs": {},
                    "time": 1e9, "key": "k1", "stage": "sample", "run_id": run_id}),
    ]) + "\n")
    summary = replay_pending(pending, uri=uri)
    assert summary == {"runs": [run_id], "replayed": 1, "skipped_groups": 0, "failed": 1}
    assert client.get_run(run_id).data.metrics == {"fid": 12.5}
    # the failed record is retried (the group is not marked done), the sent one is not sent twice
    again = replay_pending(pending, uri=uri)
    assert again == {"runs": [run_id], "replayed": 0, "skipped_groups": 0, "failed": 1}
    (mlflow_down / "gone.png").write_bytes(b"png")  # the artifact is back
    assert replay_pending(pending, uri=uri) == {"runs": [run_id], "replayed": 1, "skipped_groups": 0, "failed": 0}
    assert replay_pending(pending, uri=uri)["skipped_groups"] == 1
    assert len(client.get_metric_history(run_id, "fid")) == 1
    assert "gone.png" in {a.path for a in client.list_artifacts(run_id)}

    # a stage that raises while the server is down: its run is replayed as FAILED
    params = load_params(DEFAULT_PARAMS, overrides={"mlflow.experiment": "existing"})
    with pytest.raises(RuntimeError):
        with stage_run(params, "evaluate", mlflow_down / "ev"):
            raise RuntimeError("boom")
    replayed = replay_pending(pending_file("evaluate"), uri=uri)
    assert client.get_run(replayed["runs"][0]).info.status == "FAILED"


def test_mlflow_stage_run_nests_under_parent_with_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(DEFAULT_PARAMS, overrides={"mlflow.experiment": "nest"})
    with client_run("pipeline", params=params, tags={"kind": "parent"}) as parent:
        assert parent.run_id
        monkeypatch.setenv("MTDIFF_PARENT_RUN_ID", parent.run_id)
        monkeypatch.setenv("MTDIFF_DVC_STAGE", "prepare")
        monkeypatch.setenv("MTDIFF_MLFLOW_TAGS", json.dumps({"mtdiff.sweep_point": "p1"}))
        with stage_run(params, "prepare", tmp_path / "out") as run:
            run.log_metrics({"n": 3})
        parent.log_metrics({"total": 1.0})
    client = _client(uri)
    children = client.search_runs([client.get_experiment_by_name("nest").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [c.info.run_name for c in children] == ["prepare"]
    tags = children[0].data.tags
    assert tags["dvc.stage"] == "prepare" and tags["mtdiff.sweep_point"] == "p1"
    top = client.get_run(parent.run_id)
    assert top.info.status == "FINISHED" and top.data.metrics == {"total": 1.0}
    assert not (tmp_path / "out" / PENDING_FILE).exists()
    # artifacts live beside the sqlite store, not in ./mlruns of whichever dir created the experiment
    assert client.get_experiment_by_name("nest").artifact_location == str(tmp_path / "mlartifacts" / "nest")
    assert not (tmp_path / "mlruns").exists()


def test_mlflow_client_run_tolerates_down_server(mlflow_down):
    with client_run("sweep", uri=None, experiment="x", pending_dir=mlflow_down / "keep") as run:
        assert run.run_id is None
        run.log_metrics({"a": 1.0})
    kinds = [r["what"] for r in read_pending(mlflow_down / "keep" / PENDING_FILE)]
    assert kinds == ["start_run", "log_metrics", "end_run"]


def test_mlflow_full_params_long_values_and_overrides_tag(tmp_path, monkeypatch):
    """log_run_params: every resolved param under its dotted key (as a stage run logs them), the
    overrides as JSON in a tag, and a value longer than MLflow's limit cut with a marker instead of
    failing the whole batch."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from mtdiff.pipeline.tracking import OVERRIDES_TAG, log_run_params

    monkeypatch.chdir(tmp_path)
    uri = sqlite_store(tmp_path)
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    long_dir = "/data/" + "x" * (MAX_PARAM_VAL_LENGTH + 500)
    overrides = {"train.steps": 9, "data.imagenet_dir": long_dir}
    params = load_params(DEFAULT_PARAMS, overrides={**overrides, "mlflow.experiment": "full"})
    with client_run("pipeline", params=params, uri=uri) as parent:
        log_run_params(parent, params, overrides)
    run = _client(uri).get_run(parent.run_id)
    assert set(run.data.params) == set(params.flat())
    assert run.data.params["train.steps"] == "9" and run.data.params["model.channel_mult"] == "[1, 2, 2]"
    cut = run.data.params["data.imagenet_dir"]
    assert len(cut) == MAX_PARAM_VAL_LENGTH and cut.startswith("/data/xxx")
    assert cut.endswith(f"...[{len(long_dir)} chars]")
    assert json.loads(run.data.tags[OVERRIDES_TAG]) == {"train.steps": 9, "data.imagenet_dir": long_dir}


# -- issue 34 item 6: an unreachable server costs seconds ---------------------------------------
def test_unreachable_server_costs_seconds_not_minutes(mlflow_down, monkeypatch):
    """MLflow's own retries are not turned down here (MLflow's defaults retry ~4 minutes a call): the
    project's probe and bounded retries must keep the stage's tracking overhead to seconds."""
    import os
    import time

    from mtdiff.pipeline.tracking import HTTP_DEFAULTS

    for var in HTTP_DEFAULTS:  # setenv first so the teardown removes what the stage sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    params = load_params(DEFAULT_PARAMS, overrides={"mlflow.experiment": "down"})
    start = time.monotonic()
    with stage_run(params, "train", mlflow_down / "out") as run:
        run.log_metrics({"loss": 1.0}, step=1)
        run.set_tags({"a": "b"})
    assert time.monotonic() - start < 15
    assert run.run_id is None and not run.online
    kinds = [r["what"] for r in read_pending(pending_file("train"))]
    assert kinds == ["start_run", "log_params", "log_metrics", "set_tags", "end_run"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


@pytest.mark.parametrize("down", [True, False])
def test_server_gone_mid_run_keeps_later_records_without_calling_it(mlflow_down, down):
    """After a failed call, a server that no longer answers is not called again (each call would pay
    the retries); the records keep the run's id for the replay. A store that still answers (a value it
    rejected) is tried again on the next call."""
    from mtdiff.pipeline.tracking import StageRun

    uri = f"http://127.0.0.1:{_closed_port()}" if down else "sqlite:///still-here.db"
    run = StageRun("run-1", None, stage="train", pending_path=pending_file("train"), uri=uri)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("connection refused")

    run._op = lambda what: failing
    for step in range(4):
        run.log_metrics({"loss": float(step)}, step=step)
    assert len(calls) == (1 if down else 4) and run.online is (not down)
    records = read_pending(pending_file("train"))
    assert [r["kwargs"]["step"] for r in records] == [0, 1, 2, 3]
    assert {r["run_id"] for r in records} == {"run-1"}
