"""Replay of the MLflow records a stage kept while the tracking store could not take them.

:class:`mtdiff.pipeline.tracking.StageRun` appends every call it could not send to
``.mtdiff/mlflow_pending/<stage>.jsonl`` (one JSON record a line: what, args, time, the run's group
key). ``replay_pending`` sends them to a store later, idempotently; ``mtdiff replay FILE...`` is its
command line. A local sqlite store rarely refuses a write, but a full disk or a corrupt database
does (tests/test_train.py), and a remote tracking server goes down.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from mtdiff.pipeline.tracking import client_ops, experiment_id, redact_uri, tracking_uri

log = logging.getLogger(__name__)


def read_pending(path: str | os.PathLike) -> list[dict]:
    """The records of a pending file (unreadable lines are skipped with a warning)."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                log.warning("%s:%d: not JSON, skipped", path, n)
                continue
            if isinstance(rec, dict) and "what" in rec:
                rec["_line"] = line.strip()
                records.append(rec)
    return records


def _done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def _record_id(uri: str, rec: dict) -> str:
    return hashlib.sha1(f"{redact_uri(uri)}\n{rec.get('_line', '')}".encode()).hexdigest()


def _read_done(path: Path) -> set[str]:
    done = _done_path(path)
    return set(done.read_text().split()) if done.exists() else set()


def _group_target(client, uri: str, path: Path, key: str, recs: list[dict], mark: str,
                  experiment: str | None) -> str | None:
    """The run the records of group ``key`` go to (created when it never started); None when the
    group was replayed completely before (its run carries ``mark``)."""
    run_id = next((r["run_id"] for r in recs if r.get("run_id")), None)
    if run_id is not None:
        try:
            tags = client.get_run(run_id).data.tags
        except Exception as exc:  # e.g. replaying into another store: the run is not there
            raise RuntimeError(f"{path}: run {run_id} of kept records not found at {redact_uri(uri)}: {exc}") from exc
        return None if mark in tags else run_id
    start = next((r for r in recs if r["what"] == "start_run"), None)
    kw = start["kwargs"] if start else {}
    exp_id = experiment_id(client, experiment or kw.get("experiment") or "mtdiff", uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`mtdiff.pending_key` = '{key}'", max_results=1)
    if found:  # created by an earlier replay: done, or to be completed
        return None if mark in found[0].data.tags else found[0].info.run_id
    tags = {**kw.get("tags", {}), "mtdiff.pending_key": key, "mtdiff.replayed_from": str(path)}
    name = kw.get("run_name") or recs[0].get("stage") or "replayed"
    return client.create_run(exp_id, start_time=int(recs[0]["time"] * 1000), tags=tags,
                             run_name=name).info.run_id


def _send_record(ops: dict[str, Any], rec: dict) -> None:
    """Send one kept record through ``ops`` (see :func:`client_ops`); raises when it cannot."""
    what, args, kwargs = rec["what"], rec.get("args", []), dict(rec.get("kwargs") or {})
    if what == "log_metrics":
        ops["log_metrics"](*args, step=kwargs.get("step"), timestamp=rec.get("time"), model_id=kwargs.get("model_id"))
    elif what == "log_image":
        image_path = kwargs.get("image_path")
        if not image_path or not Path(image_path).exists():
            raise FileNotFoundError(f"kept image {image_path!r} for {args[0]!r} is gone")
        if kwargs.get("key"):  # a step-tagged image: sent as one again
            from PIL import Image

            with Image.open(image_path) as img:
                ops["log_image"](img.copy(), key=kwargs["key"], step=kwargs.get("step"))
        else:
            ops["log_artifact"](image_path, artifact_path=os.path.dirname(args[0]) or None)
    elif what == "log_artifact":
        if not Path(args[0]).exists():
            raise FileNotFoundError(f"artifact {args[0]} is gone")
        ops["log_artifact"](*args, **kwargs)
    elif what in ops:
        ops[what](*args, **kwargs)
    else:
        raise ValueError(f"unknown record kind {what!r}")


def _replay_group(client, uri: str, path: Path, run_id: str, recs: list[dict], mark: str,
                  done: set[str], summary: dict[str, Any]) -> None:
    """Send the not-yet-sent records of one group; the run is marked replayed only when all went."""
    ops = client_ops(client, run_id)
    end_status, failed = None, 0
    with open(_done_path(path), "a") as done_file:
        for rec in recs:
            if rec["what"] == "start_run":
                continue
            if rec["what"] == "end_run":
                end_status = (rec.get("kwargs") or {}).get("status", "FINISHED")
                continue
            rid = _record_id(uri, rec)
            if rid in done:
                continue
            try:
                _send_record(ops, rec)
            except Exception as exc:  # one bad record must not lose the others; retried next time
                failed += 1
                log.warning("replay of %s into run %s failed (kept for the next replay): %s", rec["what"], run_id, exc)
                continue
            done_file.write(rid + "\n")
            done_file.flush()
            done.add(rid)
            summary["replayed"] += 1
    summary["failed"] += failed
    if failed:
        return
    if end_status:
        client.set_terminated(run_id, status=end_status, end_time=int(max(r["time"] for r in recs) * 1000))
    client.set_tag(run_id, mark, "1")


def replay_pending(path: str | os.PathLike, uri: str | None = None,
                   experiment: str | None = None) -> dict[str, Any]:
    """Send the records kept in a pending file to the tracking store at ``uri`` (default: tracking_uri()).

    Records of a run that never started become a new run (its kept name, tags and parent); records
    of a run that existed go to that run. Safe to repeat: each sent record is listed in
    ``<file>.done``, and a group whose records all went is marked (tag ``mtdiff.replayed.<key>``) and
    skipped next time; a group with failed records is not marked, and only its unsent records are
    retried on the next replay.
    Returns ``{"runs": [run ids], "replayed": n_records, "skipped_groups": n, "failed": n}``.
    Raises when the store cannot be reached.
    """
    from mlflow import MlflowClient

    path = Path(path)
    uri = uri or tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    groups: dict[str, list[dict]] = {}
    for rec in read_pending(path):
        groups.setdefault(rec.get("key") or rec.get("run_id") or f"legacy:{path}", []).append(rec)
    summary: dict[str, Any] = {"runs": [], "replayed": 0, "skipped_groups": 0, "failed": 0}
    done = _read_done(path)
    for key, recs in groups.items():
        mark = "mtdiff.replayed." + hashlib.sha1(key.encode()).hexdigest()[:12]
        run_id = _group_target(client, uri, path, key, recs, mark, experiment)
        if run_id is None:
            summary["skipped_groups"] += 1
            continue
        _replay_group(client, uri, path, run_id, recs, mark, done, summary)
        summary["runs"].append(run_id)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m mtdiff.pipeline.mlflow_replay FILE... [--uri URI]`` (``mtdiff replay``): send kept records to MLflow."""
    import argparse

    parser = argparse.ArgumentParser(prog="mtdiff replay", description="send kept MLflow records "
                                     "(.mtdiff/mlflow_pending/<stage>.jsonl) to the tracking store")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or repo sqlite)")
    args = parser.parse_args(argv)
    for file in args.files:
        if not file.exists():
            print(f"error: {file}: no such pending file")
            return 2
        print(file, json.dumps(replay_pending(file, uri=args.uri)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
