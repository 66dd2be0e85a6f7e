"""Prefect flows (pipeline, sweep, schedules) on tiny temp git+DVC repos whose two stages are trivial
scripts calling mtdiff.pipeline.tracking.stage_run, so the tests are fast and independent of the real stages.

One Prefect test harness serves the whole session (only one may exist per session: the sweep flow
tests live here too, not in a second module).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import fixtures.prefect_env  # noqa: F401  (before flows: Prefect state in a temp dir)
from fixtures.mlflow_store import sqlite_store

REPO = Path(__file__).resolve().parent.parent

STAGE_SCRIPT = '''\
"""Test stage: logs to MLflow via stage_run, writes out/<name>; stage b writes metrics/b.json."""
import json, sys
from pathlib import Path
from mtdiff.config import load_params
from mtdiff.pipeline.tracking import file_metrics, stage_run

name = sys.argv[1]
params = load_params()
with open("order.log", "a") as f:
    f.write(name + "\\n")
out = Path("out") / name
out.mkdir(parents=True, exist_ok=True)
with stage_run(params, name, out) as run:
    run.log_metrics({"steps": params.train.steps})
    (out / "done.txt").write_text(str(params.train.steps))
    if name == "b":
        Path("metrics").mkdir(exist_ok=True)
        Path("samples").mkdir(exist_ok=True)
        Path("samples/grid.png").write_text(f"grid of lr {params.train.lr}")  # the sweep keeps it per point
        numbers = {"score": params.train.steps * params.train.lr, "detail": {"n": 2}, "note": "text"}
        Path("metrics/b.json").write_text(json.dumps(numbers))
        run.log_metrics(file_metrics("metrics/b.json", numbers))  # as the real stages do
'''

# No mtdiff import: a fast stage whose failures are scripted by $FLOWTEST_FAIL="<stage>:<exit code>:<times>"
FLAKY_SCRIPT = '''\
import os, sys
from pathlib import Path
name = sys.argv[1]
with open("attempts.log", "a") as f:
    f.write(name + "\\n")
tries = Path("attempts.log").read_text().split().count(name)
stage, code, times = (os.environ.get("FLOWTEST_FAIL") or "::0").split(":")
if stage == name and tries <= int(times):
    print(f"stage {name}: scripted failure {tries}", flush=True)
    sys.exit(int(code))
with open("order.log", "a") as f:
    f.write(name + "\\n")
Path("out", name).mkdir(parents=True, exist_ok=True)
Path("out", name, "done.txt").write_text("ok")
if name == "b":
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/b.json").write_text('{"score": 1}')
    Path("samples").mkdir(exist_ok=True)
    Path("samples/grid.png").write_text("grid")
'''

PARAMS_YAML = """\
# test params (a comment that must survive overrides)
train:
  steps: 3   # steps comment
  lr: 0.1
mlflow:
  experiment: flowtest
"""


def _dvc_yaml(script: str) -> str:
    return f"""\
stages:
  a:
    cmd: python {script} a
    deps: [{script}]
    params: [train.steps]
    outs: [out/a]
  b:
    cmd: python {script} b
    deps: [{script}, out/a]
    params: [train]
    outs: [out/b, samples]
    metrics:
      - metrics/b.json:
          cache: false
"""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path, flaky: bool = False) -> Path:
    """git init + dvc init + params/stages, committed (dvc exp needs a commit)."""
    root.mkdir(parents=True, exist_ok=True)
    script = "flaky.py" if flaky else "stage.py"
    (root / script).write_text(FLAKY_SCRIPT if flaky else STAGE_SCRIPT)
    (root / "params.yaml").write_text(PARAMS_YAML)
    (root / "dvc.yaml").write_text(_dvc_yaml(script))
    (root / ".gitignore").write_text("order.log\nattempts.log\nmlartifacts/\n/store/\n/.mtdiff/\n")
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "test repo")
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """The session's single Prefect test server (PREFECT_HOME: see fixtures.prefect_env)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(tmp_path, monkeypatch):
    """Git identity for commits (and DVC's experiment commits), MLflow on, a fresh sqlite store."""
    for var, value in {"GIT_AUTHOR_NAME": "mtdiff test", "GIT_AUTHOR_EMAIL": "test@example.com",
                       "GIT_COMMITTER_NAME": "mtdiff test", "GIT_COMMITTER_EMAIL": "test@example.com",
                       "MTDIFF_MLFLOW": "1", "DVC_NO_ANALYTICS": "1"}.items():
        monkeypatch.setenv(var, value)
    for var in ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID", "MTDIFF_DVC_STAGE", "MTDIFF_MLFLOW_TAGS",
                "FLOWTEST_FAIL", "MTDIFF_PARAMS"):
        monkeypatch.delenv(var, raising=False)
    uri = sqlite_store(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _runs(uri: str, experiment: str = "flowtest", filter_string: str = ""):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string) if exp else []


def _children(uri: str, parent_id: str):
    return _runs(uri, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_pipeline_flow_runs_stages_in_order_with_nested_mlflow_runs(prefect_harness, flow_env, tmp_path):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo")
    result = pipeline(repo=str(repo), params_overrides={"train.steps": 4}, retry_delay_seconds=0)

    assert result["stages"] == ["a", "b"]
    assert [(r["stage"], r["outcome"]) for r in result["results"]] == [("a", "ran"), ("b", "ran")]
    # overrides run as a DVC experiment (issue 34 item 2): params.yaml and the workspace untouched
    assert (repo / "params.yaml").read_text() == PARAMS_YAML and not (repo / "order.log").exists()
    from mtdiff.pipeline.sweeps import exp_show, find_experiment

    exp_name = _runs_exp_name(flow_env, result["mlflow_run_id"])
    found = find_experiment(exp_show(repo), exp_name)  # what `dvc exp show` lists, with the values that ran
    assert found["data"]["params"]["params.yaml"]["data"]["train"]["steps"] == 4

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=flow_env)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.stages"] == "a,b"
    assert parent.data.tags["git_commit"] == _git(repo, "rev-parse", "HEAD")
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert flow_run_id
    assert parent.data.metrics["b/score"] == pytest.approx(0.4)
    assert parent.data.metrics["b/detail.n"] == 2
    # the full resolved params (dotted, as the stage runs log them) and the overrides behind them
    assert parent.data.params["train.steps"] == "4" and parent.data.params["mlflow.experiment"] == "flowtest"
    assert parent.data.params["diffusion.timesteps"] == "1000"  # a default, not in the test's params.yaml
    assert json.loads(parent.data.tags["mtdiff.overrides"]) == {"train.steps": 4}
    from prefect.client.orchestration import get_client

    from flows.common import COMPUTE_LIMIT

    with get_client(sync_client=True) as prefect_client:  # the flow created the global limit and let go of it
        assert prefect_client.read_global_concurrency_limit_by_name(COMPUTE_LIMIT).active_slots == 0
    children = sorted(_children(flow_env, parent.info.run_id), key=lambda r: r.info.start_time)
    # one metric, one key: stage b's run and the parent log b.json's numbers under the same keys
    b_keys = {k: v for k, v in children[1].data.metrics.items() if k.startswith("b/")}
    assert b_keys == {k: v for k, v in parent.data.metrics.items() if k.startswith("b/")} and len(b_keys) == 2
    assert children[1].data.params == parent.data.params
    assert [c.info.run_name for c in children] == ["a", "b"]
    for child in children:
        assert child.data.tags["dvc.stage"] == child.info.run_name
        assert child.data.tags["prefect.flow_run_id"] == flow_run_id
        assert child.data.metrics["steps"] == 4
        assert child.info.status == "FINISHED"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.artifact_location.startswith(str(tmp_path / "store" / "mlartifacts"))

    # without overrides: dvc repro in the workspace; DVC stays the source of truth: nothing changed, nothing reruns
    plain = pipeline(repo=str(repo), retry_delay_seconds=0)
    assert [r["outcome"] for r in plain["results"]] == ["ran", "ran"]
    assert (repo / "order.log").read_text().split() == ["a", "b"]
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["a"]["params"]["params.yaml"]["train.steps"] == 3
    again = pipeline(repo=str(repo), stages=["b"], retry_delay_seconds=0)
    assert [(r["stage"], r["outcome"]) for r in again["results"]] == [("b", "unchanged")]


def _runs_exp_name(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["dvc.exp_name"]


def test_pipeline_flow_retries_transient_failures_not_bad_params(prefect_harness, flow_env, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from mtdiff.pipeline.dvc_runner import StageConfigError, StagePreempted
    from mtdiff.config import ConfigError

    monkeypatch.setenv("MTDIFF_MLFLOW", "0")
    repo = make_repo(tmp_path / "repo", flaky=True)
    monkeypatch.setenv("FLOWTEST_FAIL", "b:1:1")  # b fails once with a plain error: retried
    result = pipeline(repo=str(repo), retry_delay_seconds=0)
    assert [(r["stage"], r["attempt"]) for r in result["results"]] == [("a", 1), ("b", 2)]
    assert (repo / "attempts.log").read_text().split() == ["a", "b", "b"]
    assert result["mlflow_run_id"] is None  # MLflow off: the flow still runs

    monkeypatch.setenv("FLOWTEST_FAIL", "b:2:99")  # exit 2 = bad params: no retry
    with pytest.raises(StageConfigError, match="exited with 2"):
        pipeline(repo=str(repo), stages="b", force=True, retry_delay_seconds=0)
    assert (repo / "attempts.log").read_text().split().count("b") == 3

    monkeypatch.setenv("FLOWTEST_FAIL", "b:75:99")  # exit 75 = preempted, its state saved: no retry
    with pytest.raises(StagePreempted, match="'b' was preempted; run the pipeline again to resume"):
        pipeline(repo=str(repo), stages="b", force=True, retry_delay_seconds=0)
    assert (repo / "attempts.log").read_text().split().count("b") == 4

    with pytest.raises(ConfigError, match="train.nope"):  # caught before any stage runs
        pipeline(repo=str(repo), params_overrides=["train.nope=1"], retry_delay_seconds=0)
    with pytest.raises(ValueError, match="unknown DVC stage"):
        pipeline(repo=str(repo), stages=["a", "zzz"], retry_delay_seconds=0)
    assert (repo / "attempts.log").read_text().split().count("b") == 4
    assert "nope" not in (repo / "params.yaml").read_text()


def test_pipeline_flow_goes_on_when_tracking_server_is_down(prefect_harness, flow_env, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from mtdiff.pipeline.mlflow_replay import read_pending, replay_pending
    from mtdiff.pipeline.tracking import pending_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    repo = make_repo(tmp_path / "repo")
    result = pipeline(repo=str(repo), stages=["a"], retry_delay_seconds=0)
    assert result["mlflow_run_id"] is None and result["results"][0]["outcome"] == "ran"
    pending = pending_file("a", repo)  # <repo>/.mtdiff/mlflow_pending/a.jsonl, outside the DVC outputs
    kinds = [r["what"] for r in read_pending(pending)]
    assert kinds == ["start_run", "log_params", "log_metrics", "end_run"]

    summary = replay_pending(pending, uri=flow_env)  # the server is back (here: the sqlite store)
    assert summary["failed"] == 0 and len(summary["runs"]) == 1
    (run,) = _runs(flow_env)
    assert run.info.run_name == "a" and run.data.metrics == {"steps": 3.0}
    assert run.data.tags["dvc.stage"] == "a"


@pytest.mark.slow
def test_sweep_flow_two_points_comparison_and_nested_runs(prefect_harness, flow_env, tmp_path):
    import pandas as pd

    from flows.sweep import sweep

    repo = make_repo(tmp_path / "repo")
    params_before = (repo / "params.yaml").read_text()
    config = {"name": "two", "base": {"train.steps": 2},
              "points": {"half": {"train.lr": 0.5}, "one": {"train": {"lr": 1.0}}},
              "metrics": ["b/score"]}
    result = sweep(config=config, repo=str(repo), retry_delay_seconds=0)

    frame = pd.read_csv(repo / "sweeps" / "two" / "comparison.csv")
    assert list(frame["point"]) == ["half", "one"] and list(frame["status"]) == ["ok", "ok"]
    assert list(frame["b/score"]) == pytest.approx([1.0, 2.0])
    assert list(frame["train.lr"]) == [0.5, 1.0]
    assert "| half | ok | 0.5 | 1 |" in (repo / "sweeps" / "two" / "comparison.md").read_text()
    assert result["markdown"].splitlines()[0] == "| point | status | train.lr | b/score |"
    (plot,) = result["plots"]
    assert Path(plot).name == "b_score.png" and Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert (repo / "params.yaml").read_text() == params_before  # --temp: the workspace is untouched
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "ls"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    assert all(row["experiment"] in shown for row in result["rows"])

    sweep_run_id = result["mlflow_run_id"]
    points = {r.info.run_name: r for r in _children(flow_env, sweep_run_id)}
    assert set(points) == {"half", "one"}
    assert points["half"].data.metrics["b/score"] == pytest.approx(1.0)
    assert points["one"].data.params["train.lr"] == "1.0"
    assert points["one"].data.params["train.steps"] == "2" and "model.channels" in points["one"].data.params
    assert json.loads(points["one"].data.tags["mtdiff.overrides"]) == {"train.steps": 2, "train.lr": 1.0}
    stage_names = {}
    for name, point_run in points.items():
        stages = _children(flow_env, point_run.info.run_id)
        stage_names[name] = sorted(s.info.run_name for s in stages)
        assert all(s.data.tags["mtdiff.sweep_point"] == name for s in stages)
        assert all(s.data.tags["dvc.exp_name"] == point_run.data.tags["dvc.exp_name"] for s in stages)
    # stage a depends on train.steps only: it runs for the first point; DVC's run-cache restores it for the second
    assert stage_names == {"half": ["a", "b"], "one": ["b"]}
    assert os.path.basename(result["csv"]) == "comparison.csv"

    # resumable: each finished point is saved; a rerun skips both and rebuilds the same report
    points_dir = repo / "sweeps" / "two" / "points"
    assert sorted(p.name for p in points_dir.iterdir()) == ["half.json", "half.png", "one.json", "one.png"]
    assert (points_dir / "one.png").read_text() == "grid of lr 1.0"  # out of the point's experiment
    first = {r["point"]: r["experiment"] for r in result["rows"]}
    again = sweep(config=config, repo=str(repo), retry_delay_seconds=0)
    assert {r["point"]: r["experiment"] for r in again["rows"]} == first
    assert pd.read_csv(repo / "sweeps" / "two" / "comparison.csv").equals(frame)
    # a point without its file (killed before it finished) or with other overrides runs again
    (points_dir / "half.json").unlink()
    changed = {**config, "points": {"half": {"train.lr": 0.5}, "one": {"train.lr": 2.0}}}
    third = sweep(config=changed, repo=str(repo), retry_delay_seconds=0)
    rows = {r["point"]: r for r in third["rows"]}
    assert all(rows[p]["experiment"] != first[p] for p in first)
    assert rows["one"]["metrics"]["b/score"] == pytest.approx(4.0)


def test_sweep_flow_rejects_invalid_point_before_running(prefect_harness, flow_env, tmp_path):
    from flows.sweep import sweep
    from mtdiff.config import ConfigError

    repo = make_repo(tmp_path / "repo")
    bad = {"name": "bad", "points": {"ok": {}, "broken": {"tasks.label.enabled": False}}}  # condition label
    with pytest.raises(ConfigError, match="point broken.*sample.condition"):
        sweep(config=bad, repo=str(repo))
    assert not (repo / "order.log").exists()


def test_serve_deployments_and_prefect_yaml_schedules():
    from prefect.flows import load_flow_from_entrypoint

    from flows.serve import NIGHTLY_CRON, WEEKLY_CRON, deployments

    deps = {d.name: d for d in deployments()}
    assert deps["nightly"].schedules[0].schedule.cron == NIGHTLY_CRON == "0 2 * * *"
    assert deps["weekly-tasks-sweep"].schedules[0].schedule.cron == WEEKLY_CRON
    assert deps["weekly-tasks-sweep"].parameters["config"] == "configs/sweeps/tasks.yaml"

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["nightly"]["schedules"][0]["cron"] == NIGHTLY_CRON
    assert by_name["weekly-tasks-sweep"]["schedules"][0]["cron"] == WEEKLY_CRON
    for dep in by_name.values():
        assert dep["work_pool"]["name"] == "mtdiff-process"
        served = deps[dep["name"]]  # serving uses prefect.yaml's definition
        assert served.concurrency_limit == dep["concurrency_limit"] == 1
        assert served.tags == dep["tags"] and served.parameters == dep["parameters"]
        assert [s.schedule.cron for s in served.schedules] == [s["cron"] for s in dep["schedules"]]
        flow_obj = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        assert flow_obj.name in {"mtdiff-pipeline", "mtdiff-sweep"}
    assert (REPO / by_name["weekly-tasks-sweep"]["parameters"]["config"]).exists()


def test_compute_slot_creates_the_global_limit_and_excludes_a_second_holder(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    from flows.common import COMPUTE_LIMIT, compute_slot

    with get_client(sync_client=True) as client:
        try:  # a fresh server: no limit (an earlier flow test may have created it)
            client.delete_global_concurrency_limit_by_name(COMPUTE_LIMIT)
        except ObjectNotFound:
            pass
        with compute_slot():
            limit = client.read_global_concurrency_limit_by_name(COMPUTE_LIMIT)
            assert limit.limit == 1 and limit.active_slots == 1
            with pytest.raises(TimeoutError):  # the sweep waits while the pipeline holds the slot
                with concurrency(COMPUTE_LIMIT, timeout_seconds=2, strict=True):
                    pass
        assert client.read_global_concurrency_limit_by_name(COMPUTE_LIMIT).active_slots == 0
        with compute_slot():  # released, and an existing limit is reused
            pass


def test_compute_slot_without_a_standing_server_leaves_the_limit_alone(monkeypatch):
    # an ephemeral server's leases die with its process: a killed holder would keep the slot for ever
    import flows.common as fc

    monkeypatch.setattr(fc, "standing_server", lambda: False)
    monkeypatch.setattr(fc, "ensure_concurrency_limit", lambda *a, **k: pytest.fail("limit touched"))
    lines = []
    with fc.compute_slot(lines.append):
        pass
    assert "not used" in lines[0]


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_prefect_settings_come_from_prefect_toml(tmp_path, where):
    """Prefect reads prefect.toml from the repo root; started elsewhere, flows/__init__ passes it on."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_SERVER") and k != "PYTHONPATH"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    code = ("import os, flows.pipeline; from prefect.settings import get_current_settings as g; s = g(); "
            "print(s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds, "
            "'PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS' in os.environ, s.home)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO if where == "repo" else tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "180", str(where == "elsewhere"), str(tmp_path / "home")]


def test_flow_module_entry_points_parse_arguments(tmp_path, capsys):
    from flows import pipeline as fp
    from flows import sweep as fs

    assert fp.main(["--repo", str(tmp_path), "train.steps=2"]) == 2  # no dvc.yaml there
    assert "no dvc.yaml" in capsys.readouterr().err
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: 'true'\n")
    (tmp_path / "params.yaml").write_text(PARAMS_YAML)
    sweep_yaml = tmp_path / "s.yaml"
    sweep_yaml.write_text(json.dumps({"name": "s", "grid": {"train.lr": [0.1, 0.2]}}))
    assert fs.main([str(sweep_yaml), "--repo", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr-0.1: dvc exp run --temp --name s-lr-0.1-STAMP -S ++train.lr=0.1" in out
    assert "lr-0.2:" in out


def test_dvc_runner_failure_classification_and_outcomes():
    from mtdiff.pipeline.dvc_runner import (StageConfigError, StageFailed, StagePreempted, failure_for, stage_exit_code,
                                   stage_outcome)

    lines = ["Running stage 'b':", "> python flaky.py b", "ERROR: failed to run: python flaky.py b, exited with 2"]
    assert stage_exit_code(lines) == 2 and stage_exit_code(["all good"]) is None
    bad = failure_for("b", 255, lines)
    assert type(bad) is StageConfigError and bad.stage_exit == 2
    assert str(bad) == "DVC stage 'b' failed: failed to run: python flaky.py b, exited with 2"  # one line
    said = failure_for("b", 255, ["error: train.lr: Input should be greater than 0", *lines[1:]])
    assert str(said) == "DVC stage 'b' failed: train.lr: Input should be greater than 0"  # the stage's own line
    flaky = failure_for("b", 255, [*lines[:2], "ERROR: failed to run: python flaky.py b, exited with 1"])
    assert type(flaky) is StageFailed and flaky.stage_exit == 1
    assert type(failure_for("x", 255, ["ERROR: 'x' does not exist"])) is StageConfigError  # bad definition
    assert type(failure_for("x", 1, ["ERROR: unexpected error - disk full"])) is StageFailed
    assert "dvc exited 1" in str(failure_for("x", 1, ["boom"]))
    stopped = failure_for("train", 255, ["preempted: train stopped by SIGTERM at step 7/10; ...",
                                         "ERROR: failed to run: python -m mtdiff.stages.train, exited with 75"])
    assert type(stopped) is StagePreempted and "stopped by SIGTERM at step 7/10" in str(stopped)
    assert stage_outcome("b", lines) == "ran"
    assert stage_outcome("a", ["Stage 'a' is cached - skipping run, checking out outputs"]) == "restored"
    assert stage_outcome("a", ["Stage 'a' didn't change, skipping"]) == "unchanged"
    assert stage_outcome("a", ["something else"]) == "done"


def test_dvc_runner_params_overrides_metrics_and_env(tmp_path, monkeypatch):
    from mtdiff.pipeline.dvc_runner import (StageFailed, find_repo, read_metrics, resolve_stages, run_checked,
                                   tracked_env, write_params_overrides)

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_YAML)
    write_params_overrides(params, {"train.steps": 9, "sample.condition": "uncond"})
    text = params.read_text()
    assert "steps: 9   # steps comment" in text and text.startswith("# test params")
    assert yaml.safe_load(text)["sample"] == {"condition": "uncond"} and yaml.safe_load(text)["train"]["lr"] == 0.1

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "evaluate.json").write_text(
        json.dumps({"fid": 9.5, "ok": True, "name": "x", "nested": {"acc": 1}}))
    (tmp_path / "m" / "broken.json").write_text("{not json")
    (tmp_path / "m" / "nan.json").write_text('{"v": NaN, "w": 2}')
    files = sorted((tmp_path / "m").glob("*.json"))
    assert read_metrics(files) == {"evaluate/fid": 9.5, "evaluate/nested.acc": 1.0, "nan/w": 2.0}

    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", "stale")
    monkeypatch.setenv("MTDIFF_DVC_STAGE", "stale")
    env = tracked_env("p1", "sqlite:///x.db", stage="train", flow_run_id="f1")
    assert (env["MTDIFF_PARENT_RUN_ID"], env["MTDIFF_DVC_STAGE"], env["PREFECT__FLOW_RUN_ID"]) == ("p1", "train", "f1")
    assert "MLFLOW_PARENT_RUN_ID" not in env and "MTDIFF_MLFLOW_TAGS" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    env = tracked_env(None, None, tags={"k": "v"})
    assert "MTDIFF_PARENT_RUN_ID" not in env and "MTDIFF_DVC_STAGE" not in env and "PREFECT__FLOW_RUN_ID" not in env
    assert json.loads(env["MTDIFF_MLFLOW_TAGS"]) == {"k": "v"}

    (tmp_path / "dvc.yaml").write_text(_dvc_yaml("stage.py"))
    monkeypatch.chdir(tmp_path)
    assert find_repo() == tmp_path and resolve_stages(tmp_path, "b, a") == ["b", "a"]
    with pytest.raises(ValueError, match="no dvc.yaml"):
        find_repo(tmp_path / "m")
    monkeypatch.chdir(tmp_path / "m")  # no dvc.yaml in the working directory: the default root is used
    assert find_repo(None, default_root=tmp_path) == tmp_path
    with pytest.raises(ValueError, match="no dvc.yaml"):
        find_repo(None, default_root=tmp_path / "m")

    seen: list[str] = []
    lines, _ = run_checked([sys.executable, "-c", "print('hi'); print('there')"], tmp_path, dict(os.environ),
                                 seen.append, what="t", prefix="[t] ")
    assert lines == ["hi", "there"] and seen == ["[t] hi", "[t] there"]
    with pytest.raises(StageFailed, match="dvc exited 3"):
        run_checked([sys.executable, "-c", "import sys; print('x'); sys.exit(3)"], tmp_path, dict(os.environ),
                    seen.append, what="t")


@pytest.mark.slow
def test_sweep_sigkilled_during_a_point_reruns_only_the_unfinished_one(prefect_harness, flow_env, tmp_path):
    """Issue 22: the whole sweep (flow, dvc, the stage) SIGKILLed while its second point runs; the rerun
    keeps the first point's saved result, runs the second, and every report file is whole."""
    import signal

    import pandas as pd

    from flows.sweep import sweep

    repo = make_repo(tmp_path / "repo")
    stage = (repo / "stage.py").read_text()
    # the killed run's second point hangs in stage b until the test kills everything
    # ... after saving a "training state" where the sweep says; the rerun's stage b reports finding it
    stage = stage.replace('if name == "b":\n', 'if name == "b" and params.train.lr > 1 and os.environ.get("FLOWTEST_HANG"):\n'
                          '        Path(os.environ["MTDIFF_TRAIN_STATE_ROOT"]).mkdir(parents=True)\n'
                          '        Path(os.environ["MTDIFF_TRAIN_STATE_ROOT"], "last.pt").write_text("step 4")\n'
                          '        Path(os.environ["FLOWTEST_HANG"]).write_text("in b")\n        time.sleep(600)\n'
                          '    if name == "b":\n', 1).replace("import json, sys", "import json, os, sys, time")
    stage = stage.replace('"note": "text"}', '"note": "text",\n                   "resumed": int(Path('
                          'os.environ["MTDIFF_TRAIN_STATE_ROOT"], "last.pt").exists())}')
    (repo / "stage.py").write_text(stage)
    _git(repo, "commit", "-qam", "a stage that can hang")
    config = {"name": "killed", "base": {"train.steps": 2},
              "points": {"first": {"train.lr": 0.5}, "second": {"train.lr": 2.0}}, "metrics": ["b/score"]}
    (repo / "killed.yaml").write_text(yaml.safe_dump(config))
    hang = tmp_path / "hanging"
    proc = subprocess.Popen([sys.executable, "-m", "flows.sweep", "killed.yaml", "--repo", str(repo)], cwd=repo,
                            env={**os.environ, "FLOWTEST_HANG": str(hang), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not hang.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hang.exists(), "the second point never started"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    out = repo / "sweeps" / "killed"
    assert sorted(p.name for p in (out / "points").iterdir()) == ["first.json", "first.png"]
    assert not list(out.glob("comparison*")) and not list(out.rglob("*.tmp*"))
    first = json.loads((out / "points" / "first.json").read_text())
    # each point's training state lives in the sweep's checkout, not in the experiment's temp copy:
    # the killed point's survives the kill, the finished point's is gone
    state = repo / ".mtdiff" / "sweep_state" / "killed"
    assert (state / "second" / "last.pt").read_text() == "step 4" and not (state / "first").exists()

    result = sweep(config=str(repo / "killed.yaml"), repo=str(repo), retry_delay_seconds=0)
    rows = {r["point"]: r for r in result["rows"]}
    assert rows["first"]["experiment"] == first["experiment"]  # not run again
    assert rows["second"]["status"] == "ok" and rows["second"]["metrics"]["b/score"] == pytest.approx(4.0)
    assert rows["second"]["metrics"]["b/resumed"] == 1 and rows["first"]["metrics"]["b/resumed"] == 0
    assert not state.joinpath("second").exists()  # finished: its state removed
    frame = pd.read_csv(out / "comparison.csv")
    assert list(frame["point"]) == ["first", "second"] and list(frame["b/score"]) == pytest.approx([1.0, 4.0])
