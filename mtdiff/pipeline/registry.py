"""MLflow models and data sets of a training run: the EMA model in the model registry, the data set as
the run's input.

Called by the train stage (rank 0) inside its MLflow run, after ``ema.pt`` is written:

- :func:`log_dataset`: ``mlflow.log_input`` of ``data/prepared/manifest.parquet`` (one row per image:
  split, index, class, source, sha1) with its file digest, context ``training``;
- :func:`log_model`: ``mlflow.pytorch.log_model`` of :class:`MTDiffSampler` (the EMA weights of
  ``ema.pt`` + the diffusion schedule + the sampling settings of ``params.sample``) with a signature
  and an input example, with the ``mtdiff`` package as its ``code_paths`` (it loads wherever MLflow
  and torch are installed, no checkout needed), registered as model ``mtdiff`` (:data:`MODEL_NAME`): one
  version per training run outside a sweep (a sweep registers only when asked: ``flows.sweep
  --register``), tagged with the params hash, steps, final loss, the pipeline's parent run and the
  digest of ``ema.pt`` (:data:`EMA_DIGEST_TAG`);
- :func:`evaluated_version` / :func:`promote` (the evaluate stage): the evaluation's numbers logged
  against that model (``model_id``: MLflow's Models view ranks versions by them), then the alias moved.

The alias rule (``mlflow.model_alias``, ``champion``): it names the **newest evaluated** version, i.e.
it moves when the evaluate stage outside a sweep finishes on samples of the version's ``ema.pt`` (found
by digest, so a run-cache restore of an older checkpoint moves it back to that checkpoint's version).
Training alone never moves it: ``@champion`` is always a model whose numbers were measured.

Load and sample (pixel mode: images in [-1, 1]; latent mode: SD-VAE latents)::

    sampler = mlflow.pytorch.load_model("models:/mtdiff@champion")  # the newest evaluated
    images = sampler(torch.tensor([0, 1, 2]))               # one image per class label
    images = sampler(torch.tensor([0, 1]), steps=20, seed=1)

Both never fail the stage: a registry or store error is a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from mtdiff.config import Params

log = logging.getLogger(__name__)

MODEL_NAME = "mtdiff"
ARTIFACT_NAME = "model"
EMA_DIGEST_TAG = "ema_digest"  # the version's ema.pt, how evaluate finds the model it measured
MANIFEST = "manifest.parquet"


class MTDiffSampler(nn.Module):
    """The trained network and its sampler as one module: ``forward(labels)`` samples one image per
    entry of ``labels`` (int64 class labels, used as the label condition when the label task is on,
    or the class label of a class-conditional baseline; otherwise they only set the batch size:
    unconditional samples). ``sampler``: ``Sampler.from_params``, as the sample stage builds it."""

    def __init__(self, model: nn.Module, sampler: Any, shape: list[int], label_conditioned: bool,
                 tasks_cfg: Any = None, num_classes: int = 1):
        super().__init__()
        self.model = model
        self.sampler = sampler
        self.num_classes = int(num_classes)
        self.shape = [int(s) for s in shape]
        self.label_conditioned = bool(label_conditioned)
        self.tasks_cfg = tasks_cfg

    @torch.no_grad()
    def forward(self, labels: torch.Tensor, steps: Optional[int] = None, seed: int = 0) -> torch.Tensor:
        labels = torch.as_tensor(labels).reshape(-1).long()
        device = next(self.model.parameters()).device
        given = {"label": labels.to(device)} if self.label_conditioned else {}
        sampler = self.sampler if steps is None else dataclasses.replace(self.sampler, steps=int(steps))
        out = sampler(self.model, (labels.shape[0], *self.shape), given, tasks=self.tasks_cfg,
                      generator=torch.Generator(device=device).manual_seed(int(seed)),
                      mask_generator=torch.Generator().manual_seed(int(seed)))
        return out["z0"].float()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def log_dataset(params: Params) -> Optional[str]:
    """``mlflow.log_input`` of the prepared data's manifest (digest: sha256 of the file); its digest."""
    path = params.prepared_dir / MANIFEST
    try:
        import mlflow
        import pandas as pd

        if not path.exists():
            log.warning("no %s: the run's data set is not recorded", path)
            return None
        digest = file_digest(path)
        name = f"{params.data.source}-{params.data.resolution}px"
        if params.data.max_per_split:
            name += f"-max{params.data.max_per_split}"
        dataset = mlflow.data.from_pandas(pd.read_parquet(path), source=str(path), targets="class_index",
                                          name=name, digest=digest)
        mlflow.log_input(dataset, context="training")
        return digest
    except Exception as exc:  # noqa: BLE001 - recording the data set must never fail training
        log.warning("MLflow log_input of %s failed: %s", path, exc)
        return None


def build_sampler(params: Params, ema_path: str | Path) -> MTDiffSampler:
    """:class:`MTDiffSampler` on the CPU from ``ema.pt`` (the train stage's output)."""
    from mtdiff.checkpoint import load_for_inference
    from mtdiff.diffusion import Sampler
    from mtdiff.train.schedule import final_tasks

    model, diffusion, meta = load_for_inference(params, path=ema_path, device="cpu")
    tasks = final_tasks(params)
    label_conditioned = "label" in tasks.enabled or params.model.class_conditional
    return MTDiffSampler(model, Sampler.from_params(params, diffusion), meta["shape"],
                         label_conditioned=label_conditioned, tasks_cfg=tasks,
                         num_classes=int(meta.get("num_classes") or 1))


def in_sweep() -> bool:
    """Whether this training is a sweep point (the sweep flow passes its tags down)."""
    from mtdiff.pipeline.tracking import env_tags

    return "mtdiff.sweep" in env_tags()


def should_register() -> bool:
    """A training outside a sweep registers its model; a sweep point only when the sweep asks."""
    from mtdiff.pipeline.tracking import REGISTER_TAG, env_tags

    return not in_sweep() or env_tags().get(REGISTER_TAG) == "1"


def log_model(params: Params, ema_path: str | Path, summary: dict[str, Any],
              parent_run_id: Optional[str] = None, register: Optional[bool] = None) -> Optional[Any]:
    """Log the EMA model of the active run (signature, input example, the mtdiff package as code) and
    register it as :data:`MODEL_NAME` (``register``: default :func:`should_register`); returns MLflow's
    ``ModelInfo`` (None when it failed: a warning)."""
    import mtdiff

    register = should_register() if register is None else register
    try:
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        sampler = build_sampler(params, ema_path).eval()
        example = np.arange(2, dtype=np.int64) % max(sampler.num_classes, 1)  # two class labels
        example_out = sampler(torch.from_numpy(example), steps=2).numpy()
        signature = infer_signature(example, example_out, params={"steps": int(sampler.sampler.steps), "seed": 0})
        info = mlflow.pytorch.log_model(
            sampler, name=ARTIFACT_NAME, signature=signature, input_example=example,
            serialization_format="pickle",  # a sampling loop, not an exportable graph (torch.export)
            registered_model_name=MODEL_NAME if register else None,
            code_paths=[str(Path(mtdiff.__file__).parent)],  # the pickle needs mtdiff: ship it
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "numpy"],
            params={"params_hash": summary.get("params_hash"), "steps": summary.get("steps")})
        final = {k: summary[k] for k in ("final_loss",) if summary.get(k) is not None}
        if final and getattr(info, "model_id", None):
            mlflow.log_metrics(final, step=int(summary.get("steps") or 0), model_id=info.model_id)
        version = getattr(info, "registered_model_version", None)
        if register and version is not None:
            client = mlflow.MlflowClient()
            tags = {"params_hash": summary.get("params_hash"), "steps": summary.get("steps"),
                    "final_loss": summary.get("final_loss"), "run_id": mlflow.active_run().info.run_id,
                    "pipeline_run_id": parent_run_id or "", EMA_DIGEST_TAG: file_digest(ema_path),
                    "model_id": getattr(info, "model_id", "")}  # search_model_versions leaves model_id None
            for key, value in tags.items():
                client.set_model_version_tag(MODEL_NAME, str(version), key, str(value))
            log.info("registered model %s version %s (%s); the alias moves once it is evaluated",
                     MODEL_NAME, version, info.model_uri)
        return info
    except Exception as exc:  # noqa: BLE001 - the registry must never fail training
        log.warning("MLflow log_model / registration of %s failed: %s", ema_path, exc)
        return None


def evaluated_version(ema_path: str | Path) -> Optional[Any]:
    """The newest registered version whose ``ema.pt`` has the digest of ``ema_path``; None when there is
    none or the registry cannot say (a warning: the evaluation goes on unlinked)."""
    try:
        import mlflow

        if not Path(ema_path).is_file():
            return None
        digest = file_digest(ema_path)
        found = mlflow.MlflowClient().search_model_versions(
            f"name='{MODEL_NAME}' and tags.{EMA_DIGEST_TAG} = '{digest}'")
        if not found:
            log.info("no registered model for %s: evaluation not linked to a model version", ema_path)
        return max(found, key=lambda v: int(v.version), default=None)
    except Exception as exc:  # noqa: BLE001 - the registry must never fail the evaluation
        log.warning("MLflow: finding the registered model of %s failed: %s", ema_path, exc)
        return None


def model_id_of(version: Any) -> Optional[str]:
    """The logged model (MLflow 3 ``model_id``) of a registered ``version``, None when unknown."""
    if version is None:
        return None
    return getattr(version, "model_id", None) or (version.tags or {}).get("model_id") or None


def promote(params: Params, version: Any) -> None:
    """After its evaluation: move the alias to ``version`` (the rule: the newest evaluated version),
    unless this is a sweep point or ``mlflow.model_alias`` is null."""
    alias = params.mlflow.model_alias if not in_sweep() else None
    if version is None or not alias:
        return
    try:
        import mlflow

        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, alias, str(version.version))
        log.info("evaluated %s version %s: alias @%s moved to it", MODEL_NAME, version.version, alias)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow: moving alias @%s failed: %s", alias, exc)
