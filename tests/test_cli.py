"""The ``mtdiff`` console script (run / sweep / serve / replay delegate to the existing entry points)
and the packaging facts around it (declared imports, the test extra, prefect.yaml's version)."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

from mtdiff import cli

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_command_with_what_it_does(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command, what in [("run", "Prefect flow"), ("sweep", "dvc exp run"), ("serve", "schedules"),
                          ("replay", "mlflow_pending"), ("stage", "stage"), ("config", "params"),
                          ("bench", "bench")]:
        assert re.search(rf"^\s+{command}\s+.*{re.escape(what)}", out, re.M | re.S), command
    assert "``" not in out  # no raw reST
    assert len(re.findall(r"^\s+run\s", out, re.M)) == 1  # each command listed once


def test_version(capsys):
    from mtdiff import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"mtdiff {__version__}"


@pytest.mark.parametrize("command, module, lead", [
    ("run", "flows.pipeline", []), ("sweep", "flows.sweep", []), ("serve", "flows.serve", []),
    ("replay", "mtdiff.pipeline.mlflow_replay", []), ("bench", "mtdiff.bench", []),
])
def test_commands_delegate_their_whole_argv(monkeypatch, command, module, lead):
    seen = {}
    fake = types.SimpleNamespace(main=lambda argv: seen.setdefault("argv", argv) and 0)
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: fake if name == module else pytest.fail(f"imported {name}"))
    assert cli.main([command, "--help", "x=1", "--points", "a,b"]) == 0
    assert seen["argv"] == [*lead, "--help", "x=1", "--points", "a,b"]


def test_replay_runs_the_tracking_replay(tmp_path, capsys):
    assert cli.main(["replay", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such pending file" in capsys.readouterr().out


def test_python_m_flows_entry_points_still_work():
    for module in ("flows.pipeline", "flows.sweep"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def test_pyproject_declares_imports_test_extra_and_prefect_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    for name in ("matplotlib", "ruamel.yaml", "mlflow", "prefect", "dvc", "pandas", "pyarrow", "timm"):
        assert name in deps, name
    assert "pytest" not in deps and any(d.startswith("pytest") for d in project["optional-dependencies"]["test"])
    assert "'.[test]'" in (REPO / "Makefile").read_text()
    (prefect_req,) = [d for d in project["dependencies"] if d.startswith("prefect")]
    lower = re.search(r">=\s*([\d.]+)", prefect_req).group(1)
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["prefect-version"] == lower


# -- issue 34 item 7: each stage's --help, `mtdiff config --explain`, `make run FMNIST_DIR=` ----------
@pytest.mark.parametrize("stage", cli.STAGES)
def test_stage_help_lists_the_params_it_reads_with_descriptions(stage, capsys):
    import importlib

    from mtdiff.stages import stage_param_keys

    module = importlib.import_module(f"mtdiff.stages.{stage}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m mtdiff.stages.{stage}")
    for key in stage_param_keys(stage):
        assert re.search(rf"^  {re.escape(key)}[ .]", out, re.M), key
    if stage == "train":
        assert re.search(r"^  train\.steps += 1500 +optimizer steps", out, re.M)


def test_stage_help_as_python_m():
    # The timeout only guards against a hang: here the import takes ~4 s, but CI's cold first import
    # of torch + torchvision + mlflow in a fresh venv once ran past 120 s.
    proc = subprocess.run([sys.executable, "-m", "mtdiff.stages.evaluate", "--help"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 0 and "error" not in proc.stderr
    assert "evaluate.download_weights" in proc.stdout and "usage: python -m mtdiff.stages.evaluate" in proc.stdout


def test_config_explain_says_what_a_key_means(capsys):
    assert cli.main(["config", "--explain", "train.steps", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "train.steps: optimizer steps in all" in out and "default 1500, runs with 7" in out
    assert cli.main(["config", "--explain", "evaluate"]) == 0
    assert "evaluate.download_weights" in capsys.readouterr().out
    assert cli.main(["config", "--explain", "train.nope"]) == 2


def test_make_passes_fmnist_dir_to_the_stages(tmp_path):
    root = Path(__file__).resolve().parents[1]
    show = ["make", "-s", "--no-print-directory", "-f", str(root / "Makefile"), "--eval",
            "show: ; @echo \"[$$MTDIFF_FMNIST_DIR]\"", "show"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MTDIFF_FMNIST_DIR", "FMNIST_DIR")}
    given = subprocess.run([*show, f"FMNIST_DIR={tmp_path}"], capture_output=True, text=True, env=env, cwd=root)
    assert given.stdout.strip() == f"[{tmp_path}]"
    default = subprocess.run(show, capture_output=True, text=True, env=env, cwd=root)
    assert default.stdout.strip() == "[]"  # the default path: params.yaml's data.fashion_mnist_dir decides
