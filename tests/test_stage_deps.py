"""dvc.yaml tells the truth: each stage's code deps cover every mtdiff module the stage imports
(derived from the source, transitively), and the train stage tracks exactly the train keys that
change what training computes (the ones the resumable state's params hash covers)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "latents", "representations", "train", "sample", "evaluate")
# Imported by stages but unable to change an output: the pipeline machinery (MLflow logging, its model
# registry; mtdiff/pipeline/), the stop-signal watch, the package docstrings, the allocator setting, the
# command-line wrapper.
OUTPUT_NEUTRAL = {"mtdiff/__init__.py", "mtdiff/host_memory.py", "mtdiff/stages/__init__.py",
                  "mtdiff/train/__init__.py", "mtdiff/train/preemption.py"}


def _neutral(path: str) -> bool:
    return path in OUTPUT_NEUTRAL or path.startswith("mtdiff/pipeline/")


def _module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _imported(path: Path, module: str) -> set[str]:
    """mtdiff modules imported by ``path`` (absolute or relative; ``from pkg import mod`` counts mod)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "mtdiff"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] == "mtdiff":
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
    return found


def imported_files(module: str) -> set[str]:
    """Repo-relative files of every mtdiff module ``module`` loads (itself, its imports, their packages)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(_imported(path, name))
    return {str(_module_file(m).relative_to(REPO)) for m in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.fixture(scope="module")
def dvc_stages():
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_deps_cover_what_the_stage_imports(dvc_stages, stage):
    deps = dvc_stages[stage]["deps"]
    files = imported_files(f"mtdiff.stages.{stage}")
    assert f"mtdiff/stages/{stage}.py" in files and "mtdiff/config.py" in files  # the derivation works
    missing = sorted(f for f in files if not _neutral(f) and not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage}: add {missing} to its deps (imported by mtdiff.stages.{stage})"
    stale = sorted(d for d in deps if d.startswith("mtdiff/") and not any(_covered(f, [d]) for f in files))
    assert not stale, f"dvc.yaml stage {stage}: deps {stale} are not imported by the stage"


def test_train_tracks_the_train_keys_that_change_results(dvc_stages):
    from mtdiff.checkpoint import _TRAIN_KEYS_IGNORED
    from mtdiff.config import TrainConfig

    tracked = {p for p in dvc_stages["train"]["params"] if isinstance(p, str) and p.startswith("train")}
    assert "train" not in tracked, "list the train keys: the whole section reruns training on log_every"
    # steps is the budget (the params hash leaves it out only so that raising it resumes), out_dir the output
    expected = {f"train.{k}" for k in TrainConfig.model_fields if k not in _TRAIN_KEYS_IGNORED | {"steps", "out_dir"}}
    assert tracked == expected | {"train.steps", "train.out_dir"}
