"""Stage ``train``: MT-Diffusion training (M5) on the pre-extracted latents/representations.

Single process or DDP under ``torchrun`` (NCCL on GPU, gloo on CPU). The training itself is
``mtdiff.train`` (setup -> resume -> loop -> summary; its docstrings say what is saved and how a
killed run resumes). This stage adds what a pipeline run records, on rank 0: the MLflow run (the
per-window curves and preview grids the loop logs to it, train.json's metrics, the data set as its
input, the EMA model in the registry) and ``params.metrics_dir/train.json``.

Outputs (DVC caches them, so the run-cache reuses an identical run): ``params.checkpoints_dir/ema.pt``,
``params.metrics_dir/train.json`` and ``params.metrics_dir/train_log.csv`` (one row per
``train.log_every`` steps).

    torchrun --standalone --nproc_per_node 8 -m mtdiff.stages.train [train.steps=400000 ...]
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from mtdiff.config import Params
from mtdiff.distributed import barrier, distributed
from mtdiff.io import write_json
from mtdiff.pipeline import registry
from mtdiff.pipeline.tracking import file_metrics, main_stage_run, parent_run_id
from mtdiff.stages import stage_main
from mtdiff.train.loop import TrainResult, fit, start
from mtdiff.train.state import Session
from mtdiff.utils import get_logger

log = get_logger("mtdiff.train")


def train(params: Params, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train (or resume) per ``params.train`` inside the stage's MLflow run; ``on_step(step)`` after
    every completed step (tests, bench)."""
    with distributed(params.train.device) as info:
        session, progress = start(params, info)
        with main_stage_run(params, "train", session.ckpt_dir, info, system_metrics=True) as tracker:
            summary = fit(session, progress, tracker, on_step)
            if info.is_main:
                _report(session, summary, tracker)
                _log_model_and_data(session, summary, tracker)
            barrier(info)
        return TrainResult(model=session.step.model, ema=session.step.ema, summary=summary)


def _report(session: Session, summary: dict[str, Any], tracker: Any) -> None:
    """train.json, the run's final MLflow metrics/tags and one log line (rank 0)."""
    metrics_path = write_json(session.params.metrics_dir / "train.json", summary)
    resumed = summary["resumed_from_step"]
    tracker.set_tags({"checkpoint": str(session.last_path), "params_hash": session.params_hash,
                      "device_name": summary["device_name"],
                      "resumed_from_step": resumed if resumed is not None else "none"})
    # train/<key> of train.json, the keys the parent and sweep runs log them under
    tracker.log_metrics(file_metrics(metrics_path, summary), step=summary["steps"])
    tracker.log_artifact(metrics_path)
    final = summary["final_loss"]
    log.info("done: %d steps, final loss %s, %.1f img/s, wall %.1f s -> %s", summary["steps"],
             f"{final:.4f}" if final is not None else "n/a", summary["img_per_s"] or float("nan"),
             summary["wall_time_s"], session.last_path)


def _log_model_and_data(session: Session, summary: dict[str, Any], tracker: Any) -> None:
    """The data set as the run's input and the EMA model in the registry (rank 0, MLflow on)."""
    if getattr(tracker, "online", False) is not True:  # no run, or its server went away mid-run
        return
    digest = registry.log_dataset(session.params)
    if digest:
        tracker.set_tags({"data_digest": digest})
    registry.log_model(session.params, session.ema_path, summary, parent_run_id=parent_run_id())


def run(params: Params) -> dict[str, Any]:
    """DVC stage entry point: train (or resume) and return the summary written to train.json."""
    return train(params).summary


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
