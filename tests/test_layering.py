"""The layering, read from the source (AST, nothing imported):

- the ML core (``mtdiff/`` minus ``pipeline/``, ``stages/``, ``bench/``, ``cli.py``) imports neither
  ``mtdiff.pipeline`` (where the study's claims table lives) nor ``mtdiff.stages`` nor ``flows``;
- the pipeline machinery (``mtdiff/pipeline/``) imports no stage module and no ``flows``;
- nothing in ``mtdiff/`` or ``flows/`` imports a stage module (``mtdiff.stages.<name>``) statically:
  the stages import only the package ``mtdiff.stages`` (``stage_main``), and an orchestrator that runs
  a stage in-process (``mtdiff stage``, ``local_sweep``) reaches it by name at run time,
  ``importlib.import_module(f"mtdiff.stages.{name}")``: the module dvc.yaml's ``cmd`` runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "mtdiff"
STAGES = sorted(p.stem for p in (PKG / "stages").glob("*.py") if p.stem != "__init__")
NOT_CORE = ("pipeline", "stages", "bench", "cli.py")
# run stages in-process, by name (the rule's one way in)
IN_PROCESS_RUNNERS = ("mtdiff/cli.py", "mtdiff/pipeline/local_sweep.py")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO) -> list[str]:
    """Every module ``path`` imports, absolute (``from a import b`` gives ``a.b``, as ``b`` may be a module)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [base, *(f"{base}.{a.name}" for a in node.names)]
    return found


def _files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def _core_files() -> list[Path]:
    return [p for p in _files("mtdiff") if p.relative_to(PKG).parts[0] not in NOT_CORE]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _offences(files: list[Path], forbidden: tuple[str, ...], root: Path = REPO) -> list[str]:
    """``<file> imports <module>`` for each import of ``files`` that is, or lies under, one of ``forbidden``."""
    found = []
    for p in files:
        names = [n for n in imports(p, root) if _under(n, forbidden)]
        # ``from a.b import c`` is one import: named as a.b.c only when a.b itself is allowed
        found += [f"{p.relative_to(root)} imports {n}" for n in dict.fromkeys(names)
                  if not _under(n.rpartition(".")[0], tuple(names))]
    return found


STAGE_MODULES = tuple(f"mtdiff.stages.{s}" for s in STAGES)


def test_the_core_imports_no_pipeline_stage_or_flow():
    core = _core_files()
    assert {p.stem for p in core} >= {"config", "step", "loop", "sampler", "data", "checkpoint"}
    assert not any(p.relative_to(PKG).parts[0] in NOT_CORE for p in core)
    bad = _offences(core, ("mtdiff.pipeline", "mtdiff.stages", "flows"))
    assert not bad, "the core reaches outside itself:\n" + "\n".join(bad)


def test_the_pipeline_machinery_imports_no_stage_and_no_flow():
    bad = _offences(_files("mtdiff/pipeline"), (*STAGE_MODULES, "flows"))
    assert not bad, "the pipeline machinery imports a stage or a flow:\n" + "\n".join(bad)


def test_no_module_imports_a_stage_module():
    assert len(STAGES) >= 6
    bad = _offences(_files("mtdiff", "flows"), STAGE_MODULES)
    assert not bad, "a stage module imported statically (reach a stage by name instead):\n" + "\n".join(bad)


def _by_name_imports(path: Path) -> list[ast.Call]:
    """``import_module(f"mtdiff.stages.{...}")`` calls in ``path``."""
    def stage_fstring(arg: ast.expr) -> bool:
        return (isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant)
                and arg.values[0].value == "mtdiff.stages.")

    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) == "import_module"
            and n.args and stage_fstring(n.args[0])]


@pytest.mark.parametrize("runner", IN_PROCESS_RUNNERS)
def test_in_process_runners_reach_a_stage_by_the_name_dvc_yaml_runs(runner):
    assert _by_name_imports(REPO / runner), f"{runner}: no import_module(f'mtdiff.stages.{{name}}')"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(stages) == STAGES
    for name, stage in stages.items():  # so the name is the module dvc.yaml's cmd runs
        assert stage["cmd"] == f"python -m mtdiff.stages.{name}", name


def test_the_rule_sees_every_import_form(tmp_path):
    """The checker itself: absolute, from-, relative and function-local imports of a stage all count."""
    pkg = tmp_path / "mtdiff" / "pipeline"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("import mtdiff.stages.train\nfrom mtdiff.stages import sample, stage_main\n"
                              "from ..stages.evaluate import run\n"
                              "def f():\n    from mtdiff.stages import prepare\n")
    assert _offences([pkg / "x.py"], STAGE_MODULES, root=tmp_path) == [
        "mtdiff/pipeline/x.py imports mtdiff.stages.train", "mtdiff/pipeline/x.py imports mtdiff.stages.sample",
        "mtdiff/pipeline/x.py imports mtdiff.stages.evaluate", "mtdiff/pipeline/x.py imports mtdiff.stages.prepare"]
