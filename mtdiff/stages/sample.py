"""Stage ``sample``: generate images with the EMA weights (MT-Diffusion reverse process, M4).

``sample.condition``:
- ``uncond``: nothing given; every task enters through its head's prediction. The label head's
  prediction is saved as ``labels``.
- ``label``: labels cycle ``0..K-1`` (sample i gets ``i % K``), so classes are balanced.
- ``masked``: inpainting of test-split images (sample i uses test image ``i % N``) with a random
  patch mask (``tasks.masked.mask_ratio``, patch = ``model.patch_size`` in the diffusion space);
  saves ``reference`` (uint8 NHWC originals) and ``mask`` (uint8 (N, H, W) in pixel space,
  1 = visible to the model, 0 = hidden).
- ``transition``: paired translation on the test split. As trained (``mtdiff.data``), the task
  input is the paired image ``pair_images(x)`` (rot90 / edges) and ``z0`` the image ``x``, so the
  sampler is given ``pair_mean`` and generates ``x``; saves ``source`` (uint8 NHWC
  ``pair_images(x)``, the condition) and ``reference`` (uint8 NHWC ``x``, the true target).

Writes ``params.samples_dir`` atomically as one folder: ``samples.npz`` (``arr_0`` uint8 NHWC,
ADM's format, plus ``labels`` and the per-condition arrays), ``grid.png``, ``png/000000.png ...``
and ``meta.json``. Batch b (samples ``b * batch_size ...``) draws its noise from a generator seeded
by ``(params.seed, b)`` (``derive_seed``), its masks from another: same seed and params, same images,
whichever process draws the batch. Under ``torchrun`` each rank draws a contiguous run of batches
(``mtdiff.sharding``) and rank 0 writes the gathered folder, identical to one process's.

    torchrun --standalone --nproc_per_node 8 -m mtdiff.stages.sample [sample.num_samples=50000 ...]
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch

from mtdiff.checkpoint import load_for_inference
from mtdiff.config import Params
from mtdiff.distributed import DistInfo, distributed
from mtdiff.io import atomic_dir, save_npz, write_json
from mtdiff.pipeline.tracking import stage_run
from mtdiff.sampling import generate
from mtdiff.sampling_io import sample_grid, save_png, to_pil
from mtdiff.sharding import gather_arrays, load_arrays, rank_dir, save_arrays, shard_range, shard_scratch
from mtdiff.stages import stage_main
from mtdiff.utils import get_logger

log = get_logger("mtdiff.sample")
AGREEMENT = "label_head_agreement"  # the per-sample agreement ranks hand over beside the npz arrays


def _generate_sharded(params: Params, model: torch.nn.Module, diffusion: Any, meta: dict[str, Any],
                      info: DistInfo) -> Optional[dict[str, np.ndarray]]:
    """Every rank draws its run of batches; rank 0 gets all the arrays in sample order (with the
    per-sample ``AGREEMENT``, when there is one), the other ranks None."""
    items = shard_range(params.sample.num_samples, info, block=params.sample.batch_size)
    with shard_scratch(params.samples_dir, info) as scratch:
        npz, agree = generate(params, model, diffusion, meta, info.device, items=items)
        save_arrays(rank_dir(scratch, info), {**npz, **({AGREEMENT: agree} if agree is not None else {})})
        names = gather_arrays(scratch, scratch / "gathered", info)
        if not info.is_main:
            return None
        arrays = load_arrays(scratch / "gathered", names)
    # samples.npz's order: images, labels, then the per-condition arrays
    return {k: arrays[k] for k in sorted(arrays, key=lambda k: (k != "arr_0", k != "labels", k))}


def run(params: Params) -> dict[str, Any]:
    """Generate ``sample.num_samples`` images (over the torchrun ranks, when launched so); returns a
    summary with the output paths (rank 0; the other ranks return ``{"rank": r}``)."""
    with distributed(params.train.device) as info:
        return _run(params, info)


def _run(params: Params, info: DistInfo) -> dict[str, Any]:
    sc, out_dir = params.sample, params.samples_dir
    t0 = time.time()
    model, diffusion, meta = load_for_inference(params, device=info.device)
    device = next(model.parameters()).device
    if info.is_main:
        log.info("sampling %d images (%s, %s, %d steps, eta %s) from %s step %s on %s x %d", sc.num_samples,
                 sc.condition, sc.sampler, sc.steps, sc.eta, meta.get("path"), meta.get("step"), device,
                 info.world_size)
    t_sample = time.perf_counter()
    npz = _generate_sharded(params, model, diffusion, meta, info)
    if npz is None:
        return {"rank": info.rank}
    sample_time = time.perf_counter() - t_sample
    agree = npz.pop(AGREEMENT, None)
    arr = npz["arr_0"]
    summary: dict[str, Any] = {
        "num_samples": int(len(arr)), "shape": list(arr.shape), "condition": sc.condition, "sampler": sc.sampler,
        "steps": sc.steps, "eta": sc.eta, "seed": params.seed, "mode": params.diffusion.mode,
        "checkpoint": meta.get("path"), "checkpoint_step": meta.get("step"), "params_hash": meta.get("params_hash"),
        "labels": ("given" if sc.condition == "label" else "predicted") if "labels" in npz else None,
        "label_head_agreement": float(agree.mean()) if agree is not None else None,
        "sample_time_s": sample_time, "img_per_s": len(arr) / max(sample_time, 1e-9),
        "wall_time_s": None, "device": str(device), "world_size": info.world_size,
        "samples_npz": str(out_dir / "samples.npz"), "grid": str(out_dir / "grid.png"),
        "png_dir": str(out_dir / "png"),
    }
    grid = sample_grid(arr, npz, sc.condition, int(meta["num_classes"]))
    with atomic_dir(out_dir) as tmp:
        save_npz(tmp / "samples.npz", **npz)
        to_pil(grid).save(tmp / "grid.png", format="PNG")
        (tmp / "png").mkdir()
        for i, img in enumerate(arr):
            save_png(tmp / "png" / f"{i:06d}.png", img)
        summary["wall_time_s"] = time.time() - t0
        write_json(tmp / "meta.json", summary)
    # MLflow after the folder swap, so a pending-log file (tracking down) lands in the new folder
    _log_to_mlflow(params, summary, grid)
    log.info("wrote %d samples to %s (%.1f img/s, wall %.1f s)", len(arr), out_dir, summary["img_per_s"],
             summary["wall_time_s"])
    return summary


def _log_to_mlflow(params: Params, summary: dict[str, Any], grid: np.ndarray) -> None:
    agreement = summary["label_head_agreement"]
    with stage_run(params, "sample", params.samples_dir) as mlrun:
        mlrun.log_metrics({"sample/img_per_s": summary["img_per_s"], "sample/wall_time_s": summary["wall_time_s"],
                           **({"sample/label_head_agreement": agreement} if agreement is not None else {})})
        mlrun.set_tags({"samples_dir": str(params.samples_dir), "checkpoint": str(summary["checkpoint"])})
        mlrun.log_image(to_pil(grid), "grid.png")


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
