"""MLflow logging for every stage run.

``stage_run(params, stage)`` opens one MLflow run for a stage, nested under the pipeline's
parent run when ``MTDIFF_PARENT_RUN_ID`` (or ``MLFLOW_PARENT_RUN_ID``) is set, logs the flattened
params and tags, and yields a :class:`StageRun` whose ``log_*`` methods never raise: when the
tracking server is down the stage warns and goes on, and what it could not send is appended to
``<project>/.mtdiff/mlflow_pending/<stage>.jsonl`` (outside every DVC output, gitignored) so nothing is
lost (``mtdiff replay``, :mod:`mtdiff.pipeline.mlflow_replay`, sends it later).

An unreachable server costs seconds, not minutes: before a run starts, a TCP probe of an http(s)
tracking URI (:func:`server_reachable`, :data:`PROBE_TIMEOUT_S`) decides whether MLflow is used at all,
and MLflow's own HTTP retries are bounded for this project's calls (:data:`HTTP_DEFAULTS`, unless the
environment sets them). A server that dies mid-run costs one bounded failed call: the run then keeps
every later record locally (``StageRun.online`` turns False) instead of retrying each one.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from mtdiff.config import REPO_ROOT, Params, flatten, project_root

# plain logging (not mtdiff.utils) so importing tracking does not pull in torch
log = logging.getLogger(__name__)
PARENT_ENV_VARS = ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID")
PENDING_FILE = "mlflow_pending.jsonl"
PENDING_IMAGES = "mlflow_pending_images"
PENDING_DIR = Path(".mtdiff") / "mlflow_pending"  # under the project root: never inside a DVC output
OVERRIDES_TAG = "mtdiff.overrides"  # the overrides (JSON) behind a run's full params
REGISTER_TAG = "mtdiff.register"  # "1" on a sweep's points: their trainings register (flows.sweep --register)


def pending_file(stage: str, root: str | os.PathLike | None = None) -> Path:
    """Where a stage keeps what it could not send: ``<project>/.mtdiff/mlflow_pending/<stage>.jsonl``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stage) or "stage"
    return Path(root or project_root()) / PENDING_DIR / f"{safe}.jsonl"


_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")
_SECRET_QUERY_RE = re.compile(r"(?i)([?&](?:password|passwd|token|access_token|api_key|apikey|secret)=)[^&#\s]*")


def redact_uri(uri: Any) -> Any:
    """``https://user:secret@host/x`` -> ``https://***@host/x`` (also ``?token=...``): tracking URIs can carry
    credentials, so they are never printed, logged or stored as params in the clear. Non-strings pass."""
    if not isinstance(uri, str):
        return uri
    return _SECRET_QUERY_RE.sub(r"\1***", _USERINFO_RE.sub(lambda m: f"{m['scheme']}***@", uri))


def _brief(exc: BaseException) -> str:
    """An exception as one short line, credentials redacted (a store's error can quote SQL, a URI)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return redact_uri(first[:300])


def numeric_leaves(obj: Any) -> dict[str, float]:
    """Finite numbers of a (nested) JSON object as dotted keys (bools and strings dropped)."""
    flat = flatten(obj) if isinstance(obj, dict) else {}
    return {k: float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def file_metrics(path: str | os.PathLike, data: Any) -> dict[str, float]:
    """The numbers of metrics file ``path`` (holding ``data``) under the one MLflow key each has:
    ``<file stem>/<dotted key>`` (``metrics/evaluate.json {"fid": 9.1}`` -> ``evaluate/fid``). The
    stage run, the pipeline's parent run and the sweep-point runs all log these keys, the sweep table's
    columns (``mtdiff.pipeline.report.flatten_metrics``), so MLflow's compare view shows each number once."""
    return {f"{Path(path).stem}/{k}": v for k, v in numeric_leaves(data).items()}


@functools.lru_cache(maxsize=None)
def _value_limits() -> tuple[int, int]:
    """MLflow's (param, tag) value length limits: 6000 / 8000 now, 500 / 5000 in older versions."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        return int(MAX_PARAM_VAL_LENGTH), int(MAX_TAG_VAL_LENGTH)
    except Exception:  # noqa: BLE001 - an MLflow without these names: its oldest limits
        return 500, 5000


def fit_value(value: Any, tag: bool = False) -> str:
    """``value`` as MLflow may store it: credentials redacted, and cut to MLflow's length limit with a
    marker saying how long it was (a longer value makes MLflow reject the whole batch)."""
    text = str(redact_uri(value))
    limit = _value_limits()[1 if tag else 0]
    if len(text) <= limit:
        return text
    marker = f"...[{len(text)} chars]"
    return text[:limit - len(marker)] + marker


def log_run_params(run: "StageRun", params: Params, overrides: dict[str, Any] | None = None) -> None:
    """The full resolved params as dotted keys (what every stage run logs) and, in the ``mtdiff.overrides``
    tag, the overrides (JSON) that gave them: parent and sweep-point runs compare like stage runs."""
    run.log_params(params.flat())
    shown = {k: redact_uri(v) for k, v in (overrides or {}).items()}
    run.set_tags({OVERRIDES_TAG: json.dumps(shown, sort_keys=True, default=str)})


# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) spend ~4 minutes per call on a
# server that is down; these bound a failed call to seconds. Set only where the environment is silent.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TIMEOUT_S = 3.0


def bound_http_retries() -> None:
    """Apply :data:`HTTP_DEFAULTS` to this process (and the stages it starts) where not set."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def server_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an http(s) tracking server accepts a TCP connection within ``timeout`` seconds; other
    stores (sqlite, file, databricks) are not probed (True)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return True
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class TrackingUnavailable(ConnectionError):
    """The tracking server did not answer the probe."""


def require_server(uri: str) -> None:
    """Bound MLflow's retries, then raise :class:`TrackingUnavailable` when ``uri``'s server is down."""
    bound_http_retries()
    if not server_reachable(uri):
        raise TrackingUnavailable(f"no answer within {PROBE_TIMEOUT_S:g} s")


def tracking_uri(params: Params | None = None) -> str:
    """params.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the repo."""
    if params is not None and params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def absolute_tracking_uri(uri: str, base: str | os.PathLike) -> str:
    """Make a relative local store (``sqlite:///mlflow.db``, ``mlruns``, ``file:mlruns``) absolute from
    ``base``, so subprocesses running elsewhere (``dvc exp run --temp`` dirs) share the same store."""
    base = Path(base)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return f"sqlite:///{(base / path).resolve()}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file://"):
        path = uri[len("file:"):]
        return uri if path.startswith("/") else f"file:{(base / path).resolve()}"
    if "://" not in uri and not uri.startswith("file:"):
        return str((base / uri).resolve())
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (``<db dir>/mlartifacts/<experiment>``); MLflow's
    default, ``./mlruns`` of whatever directory first creates the experiment, would land inside a
    ``dvc exp run --temp`` copy and vanish with it."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_absolute():
            return str(db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment))
    return None


def experiment_id(client, name: str, uri: str) -> str:
    """Id of experiment ``name``, created (with :func:`artifact_location`) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:  # another process created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD of the git repo at ``cwd`` (default: the mtdiff checkout), or None."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or REPO_ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class StageRun:
    """Thin, failure-tolerant wrapper around the active MLflow run (or none).

    What cannot be sent is appended to ``pending_dir/mlflow_pending.jsonl``, one JSON record a line:
    ``{what, args, kwargs, time, key, stage, run_id}``; ``key`` groups the records of one run so
    :func:`replay_pending` can rebuild it.
    """

    def __init__(self, run_id: str | None, pending_dir: Path | None, *, key: str | None = None,
                 stage: str | None = None, pending_path: Path | None = None, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri  # probed again when a call fails
        self.pending_path = pending_path or (None if pending_dir is None else Path(pending_dir) / PENDING_FILE)
        self.key = key or uuid.uuid4().hex
        self.stage = stage
        self.server_down = False  # set when a call failed and the server no longer answers

    @property
    def online(self) -> bool:
        """Whether calls still go to MLflow (a run exists and its server has not gone away)."""
        return self.run_id is not None and not self.server_down

    def _note_failure(self, what: str, exc: Exception) -> None:
        """A failed call: if the server no longer answers, keep every later record locally at once
        (each would otherwise pay MLflow's retries); another error (a rejected value) stays per call."""
        if self.uri is not None and not server_reachable(self.uri):
            self.server_down = True
            log.warning("MLflow server %s went away (%s); this run's later records are kept in %s",
                        redact_uri(self.uri), _brief(exc), self.pending_path)
        else:
            log.warning("MLflow %s failed (%s); kept in %s", what, _brief(exc), self.pending_path)

    # the callable that does ``what`` on this run; StageRun uses MLflow's fluent (active-run) API
    def _op(self, what: str):
        import mlflow

        return {"log_metrics": mlflow.log_metrics, "log_params": mlflow.log_params,
                "set_tags": mlflow.set_tags, "log_artifact": mlflow.log_artifact,
                "log_image": mlflow.log_image}[what]

    def _call(self, what: str, *args, **kwargs) -> None:
        if self.online:
            try:
                self._op(what)(*args, **kwargs)
                return
            except Exception as exc:  # tracking must never kill a stage
                self._note_failure(what, exc)
        self._keep(what, args, kwargs)

    def _keep(self, what: str, args, kwargs) -> None:
        if self.pending_path is None:
            return
        record = {"what": what, "args": [str(a) if isinstance(a, Path) else a for a in args],
                  "kwargs": kwargs, "time": time.time(), "key": self.key, "stage": self.stage,
                  "run_id": self.run_id}
        try:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.pending_path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:
            log.warning("could not keep MLflow %s in %s: %s", what, self.pending_path, exc)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """``model_id``: also link them to that logged model (MLflow 3; the Models view ranks by them)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._call("log_metrics", clean, step=step, **({"model_id": model_id} if model_id else {}))

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", {k: fit_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", {k: fit_value(v, tag=True) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def log_image(self, image, artifact_file: str | None = None, *, key: str | None = None,
                  step: int | None = None) -> None:
        """``image``: a PIL image or HWC uint8 array, logged as ``artifact_file``, or under ``key`` at
        ``step`` (MLflow's step-tagged images: the UI shows them as a sequence). Kept as a PNG beside
        the pending file when unsent."""
        if (artifact_file is None) == (key is None):
            raise ValueError("log_image: give artifact_file or key")
        if self.online:
            try:
                self._op("log_image")(image, **({"artifact_file": artifact_file} if key is None
                                                 else {"key": key, "step": step}))
                return
            except Exception as exc:
                self._note_failure("log_image", exc)
        name = artifact_file or f"{key}/step_{int(step or 0):08d}.png"
        extra = {} if key is None else {"key": key, "step": step}
        self._keep("log_image", (name,), {"image_path": self._save_image(image, name), **extra})

    def _save_image(self, image, artifact_file: str) -> str | None:
        if self.pending_path is None or os.environ.get("MTDIFF_MLFLOW", "1") == "0":
            return None  # MLflow switched off on purpose: keep the record, skip the PNG
        try:
            import numpy as np
            from PIL import Image

            target = self.pending_path.parent / PENDING_IMAGES / self.key / artifact_file
            target.parent.mkdir(parents=True, exist_ok=True)
            pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            pil.save(target)
            return str(target)
        except Exception as exc:  # a kept image is a nicety; never fail the stage for it
            log.warning("could not keep image %s: %s", artifact_file, exc)
            return None


def client_ops(client, run_id: str) -> dict[str, Any]:
    """The StageRun operations (same signatures) done through ``MlflowClient`` on ``run_id``."""
    from mlflow.entities import Metric, Param, RunTag

    def log_metrics(metrics: dict, step: int | None = None, timestamp: float | None = None,
                    model_id: str | None = None) -> None:
        ts = int((timestamp or time.time()) * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), ts, int(step or 0), model_id=model_id)
                                          for k, v in metrics.items()])

    def log_params(params: dict) -> None:
        client.log_batch(run_id, params=[Param(k, fit_value(v)) for k, v in params.items()])

    def set_tags(tags: dict) -> None:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(path: str, artifact_path: str | None = None) -> None:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def log_image(image, artifact_file: str | None = None, key: str | None = None, step: int | None = None) -> None:
        if key is None:
            client.log_image(run_id, image, artifact_file=artifact_file)
        else:
            client.log_image(run_id, image, key=key, step=step)

    return {"log_metrics": log_metrics, "log_params": log_params, "set_tags": set_tags,
            "log_artifact": log_artifact, "log_image": log_image}


class ClientRun(StageRun):
    """A run driven through ``MlflowClient`` (no process-global active run): the flows' parent and
    sweep-point runs. Same failure-tolerant ``log_*`` API as :class:`StageRun`, plus :meth:`end`."""

    def __init__(self, client, run_id: str | None, pending_dir: Path | None = None, *,
                 key: str | None = None, stage: str | None = None, uri: str | None = None):
        super().__init__(run_id, pending_dir, key=key, stage=stage, uri=uri)
        self.client = client
        self._ops = client_ops(client, run_id) if (client is not None and run_id) else {}

    def _op(self, what: str):
        return self._ops[what]

    def end(self, status: str = "FINISHED") -> None:
        if not self.online or self.client is None:
            self._keep("end_run", (), {"status": status})
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("MLflow set_terminated failed: %s", exc)


def start_client_run(name: str, *, tags: dict[str, Any] | None = None, parent_run_id: str | None = None,
                     params: Params | None = None, uri: str | None = None, experiment: str | None = None,
                     pending_dir: str | os.PathLike | None = None) -> ClientRun:
    """Create a run (nested under ``parent_run_id`` if given); a down server gives a run-less ClientRun."""
    uri = uri or tracking_uri(params)
    experiment = experiment or (params.mlflow.experiment if params is not None else "mtdiff")
    all_tags = {"git_commit": git_commit() or "unknown", **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    pending = None if pending_dir is None else Path(pending_dir)
    if os.environ.get("MTDIFF_MLFLOW", "1") == "0":
        return ClientRun(None, None, pending, stage=name)
    try:
        from mlflow import MlflowClient

        require_server(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_id = experiment_id(client, experiment, uri)
        run = client.create_run(exp_id, tags=all_tags, run_name=name)
        return ClientRun(client, run.info.run_id, pending, stage=name, uri=uri)
    except Exception as exc:
        log.warning("MLflow unavailable at %s (%s); run '%s' is not tracked", redact_uri(uri), _brief(exc), name)
        out = ClientRun(None, None, pending, stage=name)
        out._keep("start_run", (), {"run_name": name, "tags": all_tags, "experiment": experiment})
        return out


@contextlib.contextmanager
def client_run(name: str, **kwargs) -> Iterator[ClientRun]:
    """``start_client_run`` as a context: the run ends FINISHED, or FAILED when the body raises."""
    run = start_client_run(name, **kwargs)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        run.end(status)


def parent_run_id() -> str | None:
    for var in PARENT_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def env_tags() -> dict[str, str]:
    """Tags the orchestrator passes down: ``dvc.stage`` ($MTDIFF_DVC_STAGE) and $MTDIFF_MLFLOW_TAGS (JSON)."""
    tags: dict[str, str] = {}
    if os.environ.get("MTDIFF_DVC_STAGE"):
        tags["dvc.stage"] = os.environ["MTDIFF_DVC_STAGE"]
    raw = os.environ.get("MTDIFF_MLFLOW_TAGS")
    if raw:
        try:
            tags.update({str(k): str(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError) as exc:
            log.warning("ignoring MTDIFF_MLFLOW_TAGS (not a JSON object): %s", exc)
    return tags


SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


@contextlib.contextmanager
def stage_run(params: Params, stage: str, out_dir: str | os.PathLike = ".",
              extra_tags: dict[str, Any] | None = None, system_metrics: bool = False) -> Iterator[StageRun]:
    """One MLflow run for ``stage``; yields a StageRun that logs, or keeps locally when it cannot
    (in :func:`pending_file`, never in ``out_dir``: that is a DVC output, and DVC replaces it).
    Nested under the pipeline's run (``parent_run_id``); ``system_metrics``: MLflow's CPU/memory/GPU
    monitor, unless $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING says otherwise."""
    pending = pending_file(stage)
    if os.environ.get("MTDIFF_MLFLOW", "1") == "0":
        yield StageRun(None, None, stage=stage, pending_path=pending)
        return
    run_id = None
    tags = {"mtdiff.stage": stage, "dvc.stage": stage, "git_commit": git_commit() or "unknown",
            "prefect.flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID", ""), **env_tags(),
            **(extra_tags or {})}
    parent = parent_run_id()
    monitor = True if system_metrics and SYSTEM_METRICS_ENV not in os.environ else None  # None: the env decides
    try:
        import mlflow

        uri = tracking_uri(params)
        require_server(uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri), params.mlflow.experiment, uri))
        active = mlflow.start_run(run_name=stage, tags=tags, parent_run_id=parent, log_system_metrics=monitor)
        run_id = active.info.run_id
    except Exception as exc:
        log.warning("MLflow unavailable at %s (%s); stage '%s' goes on and keeps its logs in %s",
                    redact_uri(tracking_uri(params)), _brief(exc), stage, pending)
    run = StageRun(run_id, None, stage=stage, pending_path=pending, uri=tracking_uri(params))
    if run_id is None:  # the replay nests it through the tag, as start_run(parent_run_id=...) does
        tags.update({"mlflow.parentRunId": parent} if parent else {})
        run._keep("start_run", (), {"run_name": stage, "tags": {k: str(v) for k, v in tags.items()},
                                    "experiment": params.mlflow.experiment})
    run.log_params(params.flat())
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if run.online:
            try:
                import mlflow

                mlflow.end_run(status=status)
            except Exception as exc:
                log.warning("MLflow end_run failed: %s", _brief(exc))
        else:
            _drop_active_run(run_id)
            run._keep("end_run", (), {"status": status})


def _drop_active_run(run_id: str | None) -> None:
    """``mlflow.end_run`` without its call to the (gone) server: pop the fluent active run and stop its
    system-metrics monitor, so neither the next run nor MLflow's atexit hook waits on the server; the
    kept ``end_run`` record terminates the run on replay."""
    if run_id is None:
        return
    try:
        from mlflow.tracking import fluent

        stack = fluent._active_run_stack.get()  # private names, but end_run() would call the server first
        if stack and stack[-1].info.run_id == run_id:
            stack.pop()
            fluent.MLFLOW_RUN_ID.unset()
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
    except Exception:  # noqa: BLE001 - an MLflow without them: the run stays active, no worse than before
        pass


class NullRun:
    """MLflow stand-in for ranks other than 0 (they log nothing)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


@contextlib.contextmanager
def main_stage_run(params: Params, stage: str, out_dir: Path, info: Any, **kwargs: Any) -> Iterator[Any]:
    """The stage's MLflow run (:func:`stage_run`) on rank 0, a :class:`NullRun` elsewhere."""
    if not info.is_main:
        yield NullRun()
        return
    with stage_run(params, stage, out_dir, **kwargs) as run:
        yield run
