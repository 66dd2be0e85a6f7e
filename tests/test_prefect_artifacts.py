"""Prefect artifacts of the flows (flows.artifacts), task timeouts on the stages and the serve
deployments' concurrency limits (no Prefect server needed: the artifact calls are recorded)."""
from __future__ import annotations

import pytest
import yaml

from flows import artifacts

REPO = artifacts.Path(__file__).resolve().parent.parent


@pytest.fixture
def recorded(monkeypatch):
    import prefect.artifacts as pa

    calls = []
    for name in ("create_table_artifact", "create_markdown_artifact", "create_link_artifact"):
        monkeypatch.setattr(pa, name, lambda _n=name, **kw: calls.append((_n, kw)) or f"id-{len(calls)}")
    return calls


def test_pipeline_artifacts_metrics_table_and_mlflow_link(recorded, monkeypatch):
    monkeypatch.delenv(artifacts.MLFLOW_UI_ENV, raising=False)
    monkeypatch.setattr(artifacts, "mlflow_run_url", lambda uri, run_id, exp=None: f"U/{exp or 'e'}/{run_id}")
    ids = artifacts.pipeline_artifacts({"evaluate/fid": 48.1234567, "train/final_loss": 0.5},
                                       [{"stage": "train", "outcome": "restored"}], "sqlite:///x.db", "r1")
    assert ids == {"metrics": "id-1", "mlflow": "id-2"}
    (kind, table), (kind2, link) = recorded
    assert kind == "create_table_artifact" and table["key"] == "mtdiff-pipeline-metrics"
    assert table["table"] == [{"metric": "evaluate/fid", "value": 48.123457},
                              {"metric": "train/final_loss", "value": 0.5}]
    assert "train: restored" in table["description"]
    assert kind2 == "create_link_artifact" and link["link"] == "U/e/r1" and link["key"] == "mtdiff-pipeline-mlflow"


def test_sweep_artifacts_comparison_markdown_table_and_link(recorded, tmp_path, monkeypatch):
    csv_path = tmp_path / "comparison.csv"
    csv_path.write_text("point,status,evaluate/fid\nsingle_task,ok,78.1\njoint_label,ok,198.7\n")
    monkeypatch.setattr(artifacts, "mlflow_run_url", lambda uri, run_id, exp=None: f"U/{run_id}")
    artifacts.sweep_artifacts("Tasks_1", "| point |\n|---|\n| single_task |", csv_path, "sqlite:///x.db", "s1")
    by_kind = {k: kw for k, kw in recorded}
    assert by_kind["create_markdown_artifact"]["key"] == "mtdiff-sweep-tasks-1"
    assert by_kind["create_markdown_artifact"]["markdown"].startswith("| point |")
    assert by_kind["create_table_artifact"]["table"][1] == {"point": "joint_label", "status": "ok",
                                                            "evaluate/fid": "198.7"}
    assert by_kind["create_link_artifact"]["link"] == "U/s1"


def test_artifact_failures_never_fail_the_flow(monkeypatch, caplog):
    import prefect.artifacts as pa

    def boom(**kw):
        raise RuntimeError("no flow run context")

    monkeypatch.setattr(pa, "create_table_artifact", boom)
    monkeypatch.setattr(pa, "create_link_artifact", boom)
    out = artifacts.pipeline_artifacts({}, [], "http://u:secret@mlflow:5000", "r")
    assert out == {"metrics": None, "mlflow": None} and "not created" in caplog.text


def test_mlflow_run_url(monkeypatch):
    monkeypatch.delenv(artifacts.MLFLOW_UI_ENV, raising=False)
    assert artifacts.mlflow_run_url("https://user:pw@ml.example/", "r1", "7") == "https://ml.example/#/experiments/7/runs/r1"
    assert artifacts.mlflow_run_url("sqlite:///m.db", "r1", "0") == "http://127.0.0.1:5000/#/experiments/0/runs/r1"
    monkeypatch.setenv(artifacts.MLFLOW_UI_ENV, "http://host:8080/")
    assert artifacts.mlflow_run_url("sqlite:///m.db", "r1", "3") == "http://host:8080/#/experiments/3/runs/r1"
    assert artifacts.mlflow_run_url("sqlite:///m.db", None) is None
    assert artifacts.artifact_key("mtdiff-sweep", "My Sweep_2") == "mtdiff-sweep-my-sweep-2"


def test_stage_timeouts_and_no_retry_after_a_timeout(monkeypatch):
    from types import SimpleNamespace

    from flows import pipeline as fp
    from flows.common import retryable

    monkeypatch.delenv("MTDIFF_STAGE_TIMEOUT_S", raising=False)
    assert fp.stage_timeout("train") == 7 * 86400 and fp.stage_timeout("sample") == 86400
    monkeypatch.setenv("MTDIFF_STAGE_TIMEOUT_S", "60")
    assert fp.stage_timeout("train") == 60
    assert retryable(None, None, SimpleNamespace(data=TimeoutError("task timed out"))) is False
    assert retryable(None, None, SimpleNamespace(data=RuntimeError("transient"))) is True


def test_serve_has_the_concurrency_limits_of_prefect_yaml():
    from flows.serve import deployments

    spec = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    served = {d.name: d for d in deployments()}
    assert served.keys() == spec.keys()
    for name, dep in served.items():
        limit = dep.concurrency_limit
        limit = getattr(limit, "limit", limit)
        assert limit == spec[name]["concurrency_limit"] == 1, name


def test_mlflow_run_url_asks_no_tracking_server():
    """The pipeline's link must not wait on a server that is down (MLflow retries for minutes)."""
    import time

    start = time.monotonic()
    assert artifacts.mlflow_run_url("http://127.0.0.1:9/", "r1") == "http://127.0.0.1:9/#/runs/r1"
    assert time.monotonic() - start < 1
