"""Sweep config expansion, DVC -S value encoding, experiment lookup and the comparison report
(mtdiff.pipeline.sweeps / mtdiff.pipeline.report, no Prefect needed; the sweep flow itself is tested in test_flows.py)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtdiff.config import DEFAULT_PARAMS, ConfigError, load_params
from mtdiff.pipeline.report import (comparison_frame, flatten_metrics, main_metrics, to_markdown,
                           write_report)
from mtdiff.pipeline.sweeps import (SweepPoint, check_points, expand_points, exp_name_for, exp_run_args, find_experiment,
                           hydra_value, load_sweep, select_points, set_param_args)

REPO = Path(__file__).resolve().parent.parent


def test_sweep_expand_points_and_grid_merge_over_base():
    points = expand_points({"train.steps": 10, "train.lr": 0.1},
                           {"p": {"train.lr": 0.2}, "q": {}},
                           {"diffusion.w_max": [0.0, 0.5], "seed": [1]})
    assert [p.name for p in points] == ["p__w_max-0.0-seed-1", "p__w_max-0.5-seed-1",
                                        "q__w_max-0.0-seed-1", "q__w_max-0.5-seed-1"]
    assert points[1] == SweepPoint("p__w_max-0.5-seed-1",
                                   {"train.steps": 10, "train.lr": 0.2, "diffusion.w_max": 0.5, "seed": 1})
    assert points[2].overrides["train.lr"] == 0.1  # base value where the point does not override
    assert [p.name for p in expand_points({}, None, {"train.lr": [1, 2]})] == ["lr-1", "lr-2"]
    assert expand_points({"a": 1}, {"only": {}}, None) == [SweepPoint("only", {"a": 1})]


def test_sweep_load_config_forms_and_errors(tmp_path):
    cfg = load_sweep({"name": "n", "base": {"train": {"steps": 5}},
                      "points": [{"name": "x", "overrides": {"tasks": {"label": {"enabled": False}}}}],
                      "metrics": ["evaluate/fid*"]})
    assert cfg.name == "n" and cfg.metrics == ["evaluate/fid*"]
    assert cfg.points == [SweepPoint("x", {"train.steps": 5, "tasks.label.enabled": False})]
    path = tmp_path / "mine.yaml"
    path.write_text("points:\n  a: {train.lr: 0.3}\n")
    assert load_sweep(path).name == "mine"  # name defaults to the file stem
    assert load_sweep("mine.yaml", base_dir=tmp_path).points[0].overrides == {"train.lr": 0.3}
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep({"points": {"a": {}}, "pointz": {}})
    with pytest.raises(ConfigError, match="needs 'points' and/or 'grid'"):
        load_sweep({"name": "empty"})
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep({"grid": {"train.lr": 0.1}})
    with pytest.raises(ConfigError, match="point name"):
        load_sweep({"points": {"bad name": {}}})
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep(tmp_path / "missing.yaml")


@pytest.mark.parametrize("value", ["uncond", "true", "1e-4", "a b", "it's", "C:\\dir\\", "/usr/share/x",
                                   "stabilityai/sd-vae-ft-ema", "", 0.1, 3, -2, True, False, None,
                                   [1, 10, 50], {"k": [1.5, "x"]}])
def test_sweep_hydra_value_round_trips_through_dvc_set_param(value):
    from dvc.utils.hydra import to_hydra_overrides

    (override,) = to_hydra_overrides([f"++k={hydra_value(value)}"])
    assert override.value() == value and type(override.value()) is type(value)


def test_sweep_set_param_args_and_exp_names():
    assert set_param_args({"train.steps": 5, "sample.condition": "uncond"}) == [
        "-S", "++train.steps=5", "-S", "++sample.condition=uncond"]
    assert exp_name_for("tasks", "joint label/x", "20250101-000000") == "tasks-joint-label-x-20250101-000000"
    assert exp_name_for("s", "p", "t", attempt=2) == "s-p-t-try2"
    assert exp_run_args("e", {"train.lr": 0.5}, ["train"], ["data/x"]) == [
        "exp", "run", "--temp", "--name", "e", "-C", "data/x", "-S", "++train.lr=0.5", "train"]
    assert exp_run_args("e", {}) == ["exp", "run", "--temp", "--name", "e"]


def test_sweep_select_and_check_points(tmp_path):
    cfg = load_sweep({"name": "s", "points": {"a": {"train.lr": 0.1}, "b": {}, "c": {"train.nope": 1}}})
    assert [p.name for p in select_points(cfg, None)] == ["a", "b", "c"]
    assert [p.name for p in select_points(cfg, ["c", "a", "c"])] == ["c", "a"]  # the order given, once each
    with pytest.raises(ConfigError, match=r"no point\(s\) \['z'\]"):
        select_points(cfg, ["a", "z"])
    (tmp_path / "params.yaml").write_text(DEFAULT_PARAMS.read_text())
    check_points(tmp_path, cfg, select_points(cfg, ["a", "b"]))
    with pytest.raises(ConfigError, match="sweep s point c: .*train.nope"):
        check_points(tmp_path, cfg, cfg.points)


def test_mtdiff_modules_never_import_flows_or_prefect():
    code = ("import sys, mtdiff.pipeline.dvc_runner, mtdiff.pipeline.sweeps, mtdiff.pipeline.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flows', 'prefect')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_sweep_tasks_config_points_are_valid_and_share_the_budget():
    cfg = load_sweep(REPO / "configs" / "sweeps" / "tasks.yaml")
    names = [p.name for p in cfg.points]
    assert {"single_task", "joint_label", "joint_representation", "masked"} <= set(names)
    budgets = set()
    for point in cfg.points:
        params = load_params(DEFAULT_PARAMS, overrides=point.overrides)  # cross-checks pass
        budgets.add((params.train.steps, params.train.batch_size, params.sample.num_samples,
                     params.evaluate.num_samples))
        enabled = params.tasks.enabled
        if point.name == "single_task":
            assert enabled == [] and params.sample.condition == "uncond"
        if point.name == "joint_label":
            assert enabled == ["label"] and params.sample.condition == "label"
        if point.name == "joint_representation":
            assert enabled == ["representation"] and params.sample.condition == "uncond"
        if point.name == "masked":
            assert enabled == ["masked"] and params.sample.condition == "uncond"
    assert len(budgets) == 1


def test_sweep_settings_config_samples_each_setting_given_its_input_at_one_budget():
    """configs/sweeps/settings.yaml (make settings): each setting alone and with the label, sampled
    given its task input (transition: the source; inpainting: the masked image), one budget."""
    cfg = load_sweep(REPO / "configs" / "sweeps" / "settings.yaml")
    want = {"plain": ([], "uncond"), "transition": (["transition"], "transition"),
            "inpainting": (["masked"], "masked"), "representation": (["representation"], "uncond")}
    budgets, seen = set(), {}
    for point in cfg.points:
        params = load_params(DEFAULT_PARAMS, overrides=point.overrides)  # cross-checks pass
        budgets.add((params.train.steps, params.train.batch_size, params.sample.num_samples, params.sample.steps))
        seen[point.name] = (params.tasks.enabled, params.sample.condition)
    assert len(budgets) == 1
    for name, (tasks, condition) in want.items():
        assert seen[name] == (tasks, condition)
        if name != "plain":  # the multi-task twin: the same setting plus the label
            assert seen[f"{name}_label"] == (["label", *tasks], condition)
    assert "flows.sweep configs/sweeps/settings.yaml" in (REPO / "Makefile").read_text()


def test_sweep_find_experiment_in_exp_show_json():
    show = [{"rev": "workspace", "name": None, "experiments": None},
            {"rev": "abc", "name": "main", "experiments": [
                {"name": "s-p-1", "revs": [{"rev": "111", "name": "s-p-1", "data": {"metrics": {
                    "metrics/evaluate.json": {"data": {"fid": 12.5, "nested": {"acc": 0.9}, "tag": "x"}}}}}]},
                {"name": "s-q-1", "revs": [{"rev": "222", "name": "s-q-1", "data": {}}]}]}]
    found = find_experiment(show, "s-p-1")
    assert found["rev"] == "111"
    assert flatten_metrics(found["data"]["metrics"]) == {"evaluate/fid": 12.5, "evaluate/nested.acc": 0.9}
    assert find_experiment(show, "nope") is None


def _rows():
    return [{"point": "single_task", "status": "ok", "experiment": "e1", "params": {"tasks.label.enabled": False},
             "metrics": {"evaluate/fid": 30.0, "evaluate/acc": 0.5}},
            {"point": "joint_label", "status": "ok", "experiment": "e2", "params": {"tasks.label.enabled": True},
             "metrics": {"evaluate/fid": 20.0, "representations/acc": 0.9}},
            {"point": "masked", "status": "failed", "experiment": "e3", "params": {"tasks.masked.enabled": True},
             "metrics": {}}]


def test_sweep_report_table_markdown_and_plots(tmp_path):
    report = write_report(_rows(), tmp_path / "out", metrics=["fid*", "nothing*"], title="sweep t")
    frame = pd.read_csv(report.csv)
    assert list(frame.columns) == ["point", "status", "experiment", "tasks.label.enabled", "tasks.masked.enabled",
                                   "evaluate/acc", "evaluate/fid", "representations/acc"]
    assert list(frame["evaluate/fid"][:2]) == [30.0, 20.0] and math.isnan(frame["evaluate/fid"][2])
    md = report.md.read_text()
    assert md.startswith("# sweep t") and "| joint_label | ok | e2 | True | - | - | 20 | 0.9 |" in md
    # the compact table: varying params and the main metrics only
    assert report.markdown.splitlines()[0] == ("| point | status | tasks.label.enabled | tasks.masked.enabled"
                                               " | evaluate/fid |")
    assert "| masked | failed | - | True | - |" in report.markdown and report.markdown in md
    assert report.metrics == ["evaluate/fid"]
    assert [p.name for p in report.plots] == ["evaluate_fid.png"]
    assert report.plots[0].read_bytes()[:4] == b"\x89PNG"
    # no pattern given (or none matches): every metric is plotted
    assert main_metrics(report.frame) == ["evaluate/acc", "evaluate/fid", "representations/acc"]
    assert main_metrics(report.frame, ["zzz"]) == main_metrics(report.frame)
    assert main_metrics(report.frame, ["*/acc"]) == ["evaluate/acc", "representations/acc"]


def test_sweep_report_rejects_empty_and_clashing_rows():
    with pytest.raises(ValueError, match="no sweep points"):
        comparison_frame([])
    with pytest.raises(ValueError, match="both as params and metrics"):
        comparison_frame([{"point": "p", "params": {"a/b": 1}, "metrics": {"a/b": 1.0}}])
    frame = comparison_frame([{"point": "p|q", "status": "ok", "params": {"evaluate.classify_t": [1, 10]},
                               "metrics": {}}])
    assert "p\\|q" in to_markdown(frame) and "[1, 10]" in to_markdown(frame)


def test_sweep_seeds_repeat_the_listed_points_at_each_seed():
    cfg = load_sweep({"name": "s", "base": {"train.steps": 5}, "points": {"a": {}, "b": {"x.y": 1}, "c": {}},
                      "seeds": {"values": [3, 7], "points": ["a", "b"]}})
    assert [(p.name, p.overrides.get("seed")) for p in cfg.points] == [
        ("a", 3), ("a__seed-7", 7), ("b", 3), ("b__seed-7", 7), ("c", None)]
    assert cfg.points[3].overrides == {"train.steps": 5, "x.y": 1, "seed": 7}
    bad = [({"values": []}, "distinct integers"), ({"values": [1, 1]}, "distinct integers"),
           ({"values": [0, 1], "points": ["zz"]}, "no point"), ({"values": [0], "other": 1}, "seeds:")]
    for seeds, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_sweep({"points": {"a": {}}, "seeds": seeds})
    with pytest.raises(ConfigError, match="sets seed itself"):
        load_sweep({"points": {"a": {"seed": 2}}, "seeds": {"values": [0, 1]}})


def test_sweep_seed_groups_give_points_different_seeds():
    groups = [{"values": [0, 1, 2], "points": ["a"]}, {"values": [0, 1], "points": ["b"]}]
    cfg = load_sweep({"name": "s", "points": {"a": {}, "b": {}, "c": {}}, "seeds": groups})
    assert [(p.name, p.overrides.get("seed")) for p in cfg.points] == [
        ("a", 0), ("a__seed-1", 1), ("a__seed-2", 2), ("b", 0), ("b__seed-1", 1), ("c", None)]
    with pytest.raises(ConfigError, match=r"seeds\[1\]\.points: \['a'\] already in an earlier seeds group"):
        load_sweep({"points": {"a": {}, "b": {}}, "seeds": [{"values": [0, 1], "points": ["a"]}, {"values": [0, 2]}]})
    with pytest.raises(ConfigError, match=r"seeds\[0\]\.values"):
        load_sweep({"points": {"a": {}}, "seeds": [{"values": "0"}]})


def test_sweep_report_mean_and_std_over_seeds(tmp_path):
    rows = [{"point": p, "status": s, "experiment": p, "params": {}, "metrics": m} for p, s, m in [
        ("a", "ok", {"evaluate/fid": 10.0}), ("a__seed-1", "ok", {"evaluate/fid": 14.0}),
        ("b", "ok", {"evaluate/fid": 5.0}), ("b__seed-1", "failed", {})]]
    report = write_report(rows, tmp_path, metrics=["fid"])
    summary = pd.read_csv(tmp_path / "comparison_seeds.csv")
    assert list(summary["point"]) == ["a"] and summary["seeds"][0] == 2  # b has one ok seed: no row
    assert summary["evaluate/fid"][0] == 12.0 and math.isclose(summary["evaluate/fid std"][0], 8 ** 0.5)
    assert "| a | 2 | 12 ± 2.8 |" in report.md.read_text()


def test_sweep_finished_point_needs_status_ok_and_the_same_overrides(tmp_path):
    from mtdiff.pipeline.sweeps import SweepPoint, finished_point, point_result_path, save_point_result

    point = SweepPoint("a", {"train.lr": 0.5, "model.channel_mult": [1, 2]})
    assert finished_point(tmp_path, point) is None
    row = {"point": "a", "params": point.overrides, "status": "ok", "metrics": {"b/score": 1.0}}
    assert save_point_result(tmp_path, row) == point_result_path(tmp_path, "a") == tmp_path / "points" / "a.json"
    assert finished_point(tmp_path, point) == row
    assert finished_point(tmp_path, SweepPoint("a", {"train.lr": 1.0, "model.channel_mult": [1, 2]})) is None
    save_point_result(tmp_path, {**row, "status": "failed"})
    assert finished_point(tmp_path, point) is None
    point_result_path(tmp_path, "a").write_text('{"point": "a", "par')  # torn by hand: not finished
    assert finished_point(tmp_path, point) is None


def test_sweep_finished_point_same_params_through_resolve(tmp_path):
    """A seeds block that adds ``seed: 0`` over the default seed 0 keeps the point finished; another
    seed, or a saved override the config no longer accepts, does not."""
    from mtdiff.config import load_params
    from mtdiff.pipeline.sweeps import SweepPoint, finished_point, save_point_result

    params_yaml = Path(__file__).resolve().parents[1] / "params.yaml"
    resolve = lambda overrides: load_params(params_yaml, overrides=overrides)  # noqa: E731
    save_point_result(tmp_path, {"point": "a", "params": {"train.lr": 0.5}, "status": "ok"})
    assert finished_point(tmp_path, SweepPoint("a", {"train.lr": 0.5, "seed": 0})) is None  # overrides alone
    assert finished_point(tmp_path, SweepPoint("a", {"train.lr": 0.5, "seed": 0}), resolve)["params"] == {"train.lr": 0.5}
    assert finished_point(tmp_path, SweepPoint("a", {"train.lr": 0.5, "seed": 1}), resolve) is None
    save_point_result(tmp_path, {"point": "a", "params": {"train.no_such_key": 1}, "status": "ok"})
    assert finished_point(tmp_path, SweepPoint("a", {"train.lr": 0.5}), resolve) is None


def test_sweep_report_rebuilt_from_saved_points_alone(tmp_path):
    """python -m mtdiff.pipeline.sweeps report: the comparison from the saved points, in the config's order,
    without the points whose overrides changed; no saved point is a clear error."""
    from mtdiff.pipeline.sweeps import main, save_point_result

    (tmp_path / "s.yaml").write_text("name: s\npoints:\n  a: {train.lr: 0.5}\n  b: {train.lr: 0.1}\n"
                                     "  c: {train.lr: 0.2}\nmetrics: [evaluate/fid]\n")
    with pytest.raises(FileNotFoundError, match="no finished point of sweep 's'"):
        main(["report", str(tmp_path / "s.yaml"), "--repo", str(tmp_path)])
    out = tmp_path / "sweeps" / "s"
    for point, lr, fid in (("b", 0.1, 7.0), ("a", 0.5, 9.0), ("c", 0.3, 1.0)):  # c ran with another lr
        save_point_result(out, {"point": point, "params": {"train.lr": lr}, "status": "ok",
                                "metrics": {"evaluate/fid": fid}})
    assert main(["report", str(tmp_path / "s.yaml"), "--repo", str(tmp_path)]) == 0
    frame = pd.read_csv(out / "comparison.csv")
    assert frame["point"].tolist() == ["a", "b"] and frame["evaluate/fid"].tolist() == [9.0, 7.0]


def test_sweep_points_finished_on_other_code_are_flagged(tmp_path):
    """Issue 34 item 7: a saved row from a commit whose code or params differ from HEAD is stale; one
    that differs only in docs is not; an unknown commit is."""
    import subprocess

    from mtdiff.pipeline.sweeps import stale_rows

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "mtdiff").mkdir()
    (tmp_path / "mtdiff" / "a.py").write_text("x = 1\n")
    git("add", "-A"), git("commit", "-qm", "one")
    first = git("rev-parse", "HEAD")
    (tmp_path / "notes.md").write_text("docs\n")
    git("add", "-A"), git("commit", "-qm", "docs")
    docs_only = git("rev-parse", "HEAD")
    (tmp_path / "mtdiff" / "a.py").write_text("x = 2\n")
    git("add", "-A"), git("commit", "-qm", "code")
    head = git("rev-parse", "HEAD")
    rows = {"old": {"git_commit": first}, "same": {"git_commit": head}, "gone": {"git_commit": "0" * 40},
            "none": {}}
    assert set(stale_rows(tmp_path, rows, head)) == {"old", "gone", "none"}
    assert stale_rows(tmp_path, {"docs": {"git_commit": first}}, docs_only) == {}
    line = stale_rows(tmp_path, rows, head)["old"]
    assert "\n" not in line and first[:10] in line and "--rerun-stale" in line
