"""Running DVC stages and experiments from Python: the repo and its stages, the command and environment
a stage runs with, its streamed output, what its exit code means, params overrides written into
params.yaml, and the metrics files read back afterwards.

No orchestration here: ``flows.pipeline`` / ``flows.sweep`` wrap these in Prefect tasks (retries,
logging) and MLflow parent runs. A failed command raises :class:`StageFailed`, or
:class:`StageConfigError` when retrying cannot help (bad params, a broken dvc.yaml).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from mtdiff.config import REPO_ROOT, Params, load_params_written
from mtdiff.io import atomic_path
from mtdiff.train.preemption import PREEMPTED_EXIT_CODE
from mtdiff.pipeline.tracking import file_metrics, redact_uri

SUMMARY_METRICS = 20  # metrics printed at the end of a run
CONFIG_EXIT_CODE = 2  # stage_main exits 2 on a bad parameter: retrying cannot help
_EXITED_RE = re.compile(r"exited with (-?\d+)")
# DVC errors about the pipeline definition itself: as hopeless to retry as a bad param
_DVC_DEFINITION_ERRORS = ("failed to parse", "is not a valid", "does not exist", "is not a stage",
                          "unknown stage", "'dvc.yaml' validation failed")


class StageFailed(RuntimeError):
    """A DVC stage failed; may be transient (retried)."""

    def __init__(self, stage: str, returncode: int, stage_exit: int | None, tail: Sequence[str]):
        self.stage, self.returncode, self.stage_exit, self.tail = stage, returncode, stage_exit, list(tail)
        code = f"stage command exited with {stage_exit}" if stage_exit is not None else f"dvc exited {returncode}"
        last = "\n".join(self.tail[-15:])
        super().__init__(f"DVC stage '{stage}' failed ({code}); last output:\n{last}")


class StageConfigError(StageFailed):
    """A stage failed on bad params, bad data, a full disk or a bad pipeline definition: not retried.
    Its message is one line: the stage's own ``error: ...`` line (or DVC's), not the output's tail."""

    def __str__(self) -> str:
        lines = [line.strip() for line in reversed(self.tail)]
        said = next((ln for ln in lines if ln.startswith("error:")), None)  # the stage's own line
        said = said or next((ln for ln in lines if ln.startswith("ERROR:")), None)  # else DVC's
        said = said.split(":", 1)[1].strip() if said else "see the stage's output above"
        return f"DVC stage '{self.stage}' failed: {said}"


class StagePreempted(StageFailed):
    """A stage stopped on SIGTERM / SIGINT / SIGUSR1 after saving its state: not retried (the
    scheduler is taking the machine back); running it again resumes."""

    def __str__(self) -> str:
        said = next((line.strip() for line in reversed(self.tail) if "preempted:" in line), "")
        return f"DVC stage '{self.stage}' was preempted; run the pipeline again to resume" + (f" ({said})" if said else "")


# -- the DVC project ------------------------------------------------------------------------
def find_repo(repo: str | os.PathLike | None = None, default_root: Path | None = None) -> Path:
    """The DVC project to run in: ``repo``, else the working directory if it has dvc.yaml, else
    ``default_root`` (default: this checkout)."""
    if repo is None:
        root = Path.cwd() if (Path.cwd() / "dvc.yaml").exists() else (default_root or REPO_ROOT)
    else:
        root = Path(repo).expanduser().resolve()
    if not (root / "dvc.yaml").exists():
        raise ValueError(f"repo {root}: no dvc.yaml there (pass repo= the DVC project root)")
    return root


def dvc_stage_names(root: Path) -> list[str]:
    """Stage names of ``root/dvc.yaml`` in file order (the file lists them in pipeline order)."""
    with open(root / "dvc.yaml") as f:
        spec = yaml.safe_load(f) or {}
    stages = spec.get("stages") or {}
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{root / 'dvc.yaml'}: no stages defined")
    return list(stages)


def resolve_stages(root: Path, stages: Sequence[str] | str | None) -> list[str]:
    """``None`` -> every stage of dvc.yaml in order; else the given ones (checked against dvc.yaml)."""
    available = dvc_stage_names(root)
    if stages is None:
        return available
    wanted = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
    wanted = [s for s in wanted if s]
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"unknown DVC stage(s) {unknown}; dvc.yaml has: {', '.join(available)}")
    if not wanted:
        raise ValueError("stages: empty list")
    return wanted


def load_repo_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """The params the stages read once ``overrides`` are written into the repo's params.yaml (the flows
    write them, or ``dvc exp run -S`` does), validated: what the flows log is what runs."""
    return load_params_written(root / "params.yaml", overrides)


def write_params_overrides(path: Path, overrides: dict[str, Any]) -> None:
    """Write ``key.sub: value`` overrides into params.yaml in place (comments kept), as ``dvc exp run -S``
    does, so dvc.lock records the values the stages ran with."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    ry = YAML()
    ry.preserve_quotes = True
    data = ry.load(path.read_text()) or CommentedMap()
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = CommentedMap()
            node = node[k]
        node[keys[-1]] = value
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            ry.dump(data, f)


class PipelineBusy(RuntimeError):
    """Another pipeline run holds the project's lock."""


LOCK_FILE = Path(".mtdiff") / "pipeline.lock"


@contextlib.contextmanager
def pipeline_lock(root: Path):
    """Hold ``<root>/.mtdiff/pipeline.lock`` (an flock, released when the process ends, even killed) while a
    pipeline runs; a second run in the same project fails at once with one line naming the holder."""
    import fcntl

    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PipelineBusy(f"another pipeline run ({holder}) is running in {root}; wait for it to end "
                               f"(the lock {path} is released when it exits)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


# -- running DVC ----------------------------------------------------------------------------
def dvc_command(*args: str) -> list[str]:
    """DVC of this interpreter's environment (the venv), not whatever `dvc` is on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def shown_command(cmd: list[str]) -> str:
    """A command as a user would type it: ``dvc repro ...`` for :func:`dvc_command`'s lists."""
    return " ".join(["dvc", *cmd[3:]] if cmd[1:3] == ["-m", "dvc"] else cmd)


def repro_command(stage: str, force: bool = False) -> list[str]:
    """``dvc repro --single-item [--force] <stage>``: DVC's lock decides whether it actually runs."""
    return dvc_command("repro", "--single-item", *(["--force"] if force else []), stage)


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """Our environment + ``extra`` (None removes the variable); the venv's bin first on PATH so the
    stages' ``python -m mtdiff.stages.<name>`` commands use this interpreter."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def tracked_env(parent_run_id: str | None, uri: str | None, stage: str | None = None,
                flow_run_id: str = "", tags: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for DVC commands whose stages' MLflow runs (mtdiff.pipeline.tracking.stage_run) nest under
    ``parent_run_id`` in ``uri``; ``tags`` (if given) are added to every stage run."""
    extra: dict[str, str | None] = {
        "MTDIFF_PARENT_RUN_ID": parent_run_id, "MLFLOW_PARENT_RUN_ID": None, "MLFLOW_TRACKING_URI": uri,
        "MTDIFF_DVC_STAGE": stage}
    if tags is not None:
        extra["MTDIFF_MLFLOW_TAGS"] = json.dumps(tags)
    extra["PREFECT__FLOW_RUN_ID"] = flow_run_id or None
    return subprocess_env(**extra)


def stream_command(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Callable[[str], Any],
                   prefix: str = "", keep: int = 200) -> tuple[int, list[str]]:
    """Run ``cmd``, sending each output line (stdout+stderr) to ``log``; return (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=keep)
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                log(prefix + line)
        return proc.wait(), list(tail)
    except BaseException:  # cancelled / interrupted: do not leave DVC running behind us
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def run_checked(cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Callable[[str], Any], what: str,
                prefix: str = "") -> tuple[list[str], float]:
    """:func:`stream_command`, raising :func:`failure_for` ``what`` on a non-zero exit;
    returns (last output lines, seconds)."""
    start = time.monotonic()
    rc, lines = stream_command(cmd, cwd, env, log, prefix=prefix)
    if rc != 0:
        raise failure_for(what, rc, lines)
    return lines, round(time.monotonic() - start, 2)


def stage_exit_code(lines: Sequence[str]) -> int | None:
    """The stage command's own exit code from DVC's 'failed to run: ..., exited with N' line."""
    for line in reversed(lines):
        m = _EXITED_RE.search(line)
        if m:
            return int(m.group(1))
    return None


def failure_for(stage: str, returncode: int, lines: Sequence[str]) -> StageFailed:
    """The exception for a failed DVC command: :class:`StageConfigError` when a retry cannot help."""
    code = stage_exit_code(lines)
    if code == PREEMPTED_EXIT_CODE:
        return StagePreempted(stage, returncode, code, lines)
    text = "\n".join(lines[-30:])
    hopeless = code == CONFIG_EXIT_CODE or (code is None and any(p in text for p in _DVC_DEFINITION_ERRORS))
    return (StageConfigError if hopeless else StageFailed)(stage, returncode, code, lines)


def stage_outcome(stage: str, lines: Sequence[str]) -> str:
    """What ``dvc repro`` did with ``stage``: ran, restored (run-cache), unchanged, or done."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if "is cached - skipping" in text:
        return "restored"
    if "didn't change, skipping" in text or "Data and pipelines are up to date" in text:
        return "unchanged"
    return "done"


# -- metrics --------------------------------------------------------------------------------
def metrics_files(root: Path, params: Params) -> list[Path]:
    """JSON files of ``root/metrics`` and of ``params.metrics_dir``."""
    dirs = {root / "metrics", (root / params.metrics_dir).resolve()}
    return sorted({p for d in dirs if d.is_dir() for p in d.glob("*.json")})


def read_metrics(files: Sequence[Path]) -> dict[str, float]:
    """``metrics/evaluate.json {"fid": 9.1}`` -> ``{"evaluate/fid": 9.1}``."""
    out: dict[str, float] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out.update(file_metrics(path, data))
    return out


def summary_text(root: Path, params: Params, results: list[dict], metrics: dict[str, float], uri: str,
                 run_id: str | None, flow_run_id: str) -> str:
    """End-of-run summary: stage outcomes, where the outputs are, the main metrics, MLflow/Prefect ids."""
    def where(p: Path) -> str:
        p = p if p.is_absolute() else root / p
        return f"{p}{'' if p.exists() else '  (not produced)'}"

    lines = ["", "mtdiff pipeline done: " + ", ".join(f"{r['stage']} {r['outcome']}" for r in results),
             f"  data:         {where(params.prepared_dir.parent)}",
             f"  checkpoints:  {where(params.checkpoints_dir)}",
             f"  samples:      {where(params.samples_dir)}",
             f"  metrics:      {where(params.metrics_dir)}"]
    # evaluate's figures first; the full list is in `dvc metrics show` and the MLflow parent run
    keys = sorted(metrics, key=lambda k: (not k.startswith("evaluate/"), k))
    for key in keys[:SUMMARY_METRICS]:
        lines.append(f"    {key} = {metrics[key]:.6g}")
    if len(keys) > SUMMARY_METRICS:
        lines.append(f"    ... {len(keys) - SUMMARY_METRICS} more: `dvc metrics show`, or the MLflow run below")
    shown = redact_uri(uri)
    lines.append(f"  MLflow:       {shown}  parent run {run_id or '(not tracked)'}"
                 f"  -> mlflow ui --backend-store-uri {shown}")
    if flow_run_id:
        lines.append(f"  Prefect:      flow run {flow_run_id}")
    return "\n".join(lines)
