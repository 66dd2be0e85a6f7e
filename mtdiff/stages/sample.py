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

import math
import time
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mtdiff.checkpoint import load_for_inference
from mtdiff.config import Params, TasksConfig
from mtdiff.data import pair_images, random_patch_mask
from mtdiff.encoders import decode_latents_vae, load_vae
from mtdiff.io import atomic_dir, save_npz, write_json
from mtdiff.pipeline.tracking import stage_run
from mtdiff.sampling_io import sample_grid, save_png, to_pil, to_uint8_nhwc
from mtdiff.sharding import gather_arrays, load_arrays, rank_dir, save_arrays, shard_range, shard_scratch
from mtdiff.stages import stage_main
from mtdiff.training import DistInfo, autocast, autocast_dtype, distributed
from mtdiff.utils import ProgressLog, derive_seed, get_logger

log = get_logger("mtdiff.sample")
PREVIEW_IMAGES = 16  # the train stage's grid every train.grid_every steps (4 x 4)
AGREEMENT = "label_head_agreement"  # the per-sample agreement ranks hand over beside the npz arrays


class _TestSplit:
    """The held-out split as the sampler needs it: diffusion-space arrays and uint8 images."""

    def __init__(self, params: Params, need_pair: bool):
        lat = params.latents_dir / "test"
        if not (lat / "mean.npy").exists():
            raise FileNotFoundError(f"{lat / 'mean.npy'} is missing: sample.condition "
                                    f"'{params.sample.condition}' needs the test split; run the latents stage")
        self.z = np.load(lat / "mean.npy", mmap_mode="r")
        self.images = np.load(params.prepared_dir / "test_images.npy", mmap_mode="r")
        if len(self.images) != len(self.z):
            raise ValueError(f"prepared test images ({len(self.images)}) and test latents ({len(self.z)}) "
                             "differ in count; re-run the latents stage")
        self.pair = None
        if need_pair:
            if not (lat / "pair_mean.npy").exists():
                raise FileNotFoundError(f"{lat / 'pair_mean.npy'} is missing: tasks.transition needs paired "
                                        "latents; re-run the latents stage with tasks.transition.enabled")
            self.pair = np.load(lat / "pair_mean.npy", mmap_mode="r")
        self.n = len(self.z)

    def indices(self, start: int, count: int) -> np.ndarray:
        return (np.arange(start, start + count) % self.n).astype(np.int64)


def _decoder(params: Params, device: torch.device):
    """diffusion-space z0 -> uint8 NHWC images: [-1, 1] pixels (pixel mode) or the SD-VAE decoder
    applied to ``z0 / latents.scale`` (latent mode; grayscale data gets the RGB mean)."""
    if params.diffusion.mode == "pixel":
        return to_uint8_nhwc
    vae = load_vae(params.latents.vae, device=device)
    return lambda z: decode_latents_vae(vae, z, params.latents.scale, channels=params.data.channels)


def _pixel_mask(mask: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    """(B, 1|C, h, w) diffusion-space mask -> uint8 (B, H, W) pixel-space mask (nearest upsampling)."""
    m = mask[:, :1].float()
    if tuple(m.shape[-2:]) != image_hw:
        m = torch.nn.functional.interpolate(m, size=image_hw, mode="nearest")
    return (m[:, 0] > 0.5).to(torch.uint8).cpu().numpy()


class _Conditions:
    """The ``given`` task inputs of each batch for ``sample.condition``, and the arrays saved beside
    the samples (``reference``, ``mask``, ``source``)."""

    def __init__(self, params: Params, meta: dict[str, Any], device: torch.device):
        self.params, self.device = params, device
        self.condition = params.sample.condition
        self.shape = tuple(int(s) for s in meta["shape"])
        self.num_classes = int(meta["num_classes"])
        needs_test = self.condition in ("masked", "transition")
        self.test = _TestSplit(params, need_pair=self.condition == "transition") if needs_test else None
        self.extras: dict[str, list[np.ndarray]] = {}

    def predicted_mask(self, count: int, tasks: TasksConfig, mask_gen: torch.Generator) -> Optional[torch.Tensor]:
        """The patch masks a predicted masked input is multiplied by (``sample.predicted_masked``:
        masked), one per sample for its whole chain; all zero for ``absent``; None: its expectation."""
        mode = self.params.sample.predicted_masked
        if mode == "expected" or "masked" not in tasks.enabled or self.condition == "masked":
            return None
        if mode == "absent":
            return torch.zeros(count, 1, *self.shape[1:], device=self.device)
        return random_patch_mask(count, self.shape, tasks.masked.mask_ratio, self.params.model.patch_size,
                                 generator=mask_gen, device=self.device)

    def __call__(self, start: int, count: int, mask_gen: torch.Generator) -> dict[str, torch.Tensor]:
        if self.condition == "label":
            labels = torch.arange(start, start + count, device=self.device, dtype=torch.long)
            return {"label": labels % self.num_classes}
        if self.condition == "masked":
            return self._masked(start, count, mask_gen)
        if self.condition == "transition":
            return self._transition(start, count)
        return {}

    def _save(self, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            self.extras.setdefault(name, []).append(arr)

    def _masked(self, start: int, count: int, mask_gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = self.test.indices(start, count)
        z_test = torch.from_numpy(np.asarray(self.test.z[idx], dtype=np.float32)).to(self.device)
        mask = random_patch_mask(count, self.shape, self.params.tasks.masked.mask_ratio, self.params.model.patch_size,
                                 generator=mask_gen, device=self.device).to(z_test.dtype)
        ref = np.asarray(self.test.images[idx])
        self._save(reference=ref, mask=_pixel_mask(mask, ref.shape[1:3]))
        return {"masked": z_test * mask}

    def _transition(self, start: int, count: int) -> dict[str, torch.Tensor]:
        # Training pairs (mtdiff.data.TrainDataset): z0 = the image, task input "transition" = its
        # paired image (pair_images: rot90 / edges). So the paired image is the source that
        # conditions, and the test image is the target the sample should match.
        idx = self.test.indices(start, count)
        ref = np.asarray(self.test.images[idx])
        self._save(source=pair_images(ref, self.params.tasks.transition.pairing), reference=ref)
        return {"transition": torch.from_numpy(np.asarray(self.test.pair[idx], dtype=np.float32)).to(self.device)}


def _generate(params: Params, model: torch.nn.Module, diffusion: Any, meta: dict[str, Any], device: torch.device,
              tasks: Optional[TasksConfig] = None, items: Optional[range] = None) -> tuple[dict[str, np.ndarray], Optional[np.ndarray]]:
    """The samples.npz arrays of the samples ``items`` (default: all ``sample.num_samples``; it starts at
    a batch boundary) in batches of ``sample.batch_size``, and per sample whether the label head agreed
    with the given label (condition ``label``; None otherwise). ``tasks``: those aggregated (default:
    what the finished model was last trained with, ``params.final_tasks``)."""
    sc = params.sample
    items = range(sc.num_samples) if items is None else items
    if items.start % sc.batch_size:
        raise ValueError(f"_generate: items start at {items.start}, not a multiple of sample.batch_size {sc.batch_size}")
    amp = autocast_dtype(device, params.train.precision)
    decode = _decoder(params, device)
    conditions = _Conditions(params, meta, device)
    tasks_cfg = tasks or params.final_tasks
    samples, labels, agree = [], [], []
    progress = ProgressLog(log, "sample: images", len(items))
    for start in tqdm(range(items.start, items.stop, sc.batch_size), desc="sample", unit="batch", disable=None):
        count = min(sc.batch_size, items.stop - start)
        # seeded by the batch's global index alone (batch 0 by the seed one generator once had): a
        # batch draws the same noise and masks in whichever process, however many there are
        batch = start // sc.batch_size
        noise_gen = torch.Generator(device=device).manual_seed(derive_seed(params.seed, "sample/noise", batch))
        mask_gen = torch.Generator().manual_seed(derive_seed(params.seed, "sample/mask", batch))
        given = conditions(start, count, mask_gen)
        with autocast(device, amp):
            out = diffusion.sample(model, (count, *conditions.shape), given=given, steps=sc.steps,
                                   sampler=sc.sampler, eta=sc.eta, generator=noise_gen, tasks_cfg=tasks_cfg,
                                   device=device, predicted_mask=conditions.predicted_mask(count, tasks_cfg, mask_gen),
                                   **sc.guidance())
        samples.append(decode(out["z0"]))
        if "label" in out:
            labels.append(out["label"].long().cpu().numpy())
            if "label" in given and "label_probs" in out:
                agree.append((out["label_probs"].argmax(-1) == given["label"]).float().cpu().numpy())
        progress.update(start + count - items.start)
    if not samples:
        return {}, None  # a rank with no batch (fewer batches than ranks)
    npz = {"arr_0": np.concatenate(samples)}
    if labels:
        npz["labels"] = np.concatenate(labels).astype(np.int64)
    npz.update({k: np.concatenate(v) for k, v in conditions.extras.items()})
    return npz, np.concatenate(agree) if agree else None


def _generate_sharded(params: Params, model: torch.nn.Module, diffusion: Any, meta: dict[str, Any],
                      info: DistInfo) -> Optional[dict[str, np.ndarray]]:
    """Every rank draws its run of batches; rank 0 gets all the arrays in sample order (with the
    per-sample ``AGREEMENT``, when there is one), the other ranks None."""
    items = shard_range(params.sample.num_samples, info, block=params.sample.batch_size)
    with shard_scratch(params.samples_dir, info) as scratch:
        npz, agree = _generate(params, model, diffusion, meta, info.device, items=items)
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


def preview_grid(params: Params, model: torch.nn.Module, diffusion: Any, meta: dict[str, Any],
                 device: torch.device, count: int = PREVIEW_IMAGES, tasks: Optional[TasksConfig] = None) -> np.ndarray:
    """A small grid of ``count`` samples drawn as this stage draws them (``sample.*`` settings, seeded
    noise: the same noise at every call, so successive grids show the model, not the draw)."""
    sc = params.sample.model_copy(update={"num_samples": count, "batch_size": count})
    npz, _ = _generate(params.model_copy(update={"sample": sc}), model, diffusion, meta, device, tasks)
    # too few samples for one row per class: plain sample order (labels cycle 0..K-1)
    layout = params.sample.condition if params.sample.condition in ("masked", "transition") else "uncond"
    return sample_grid(npz["arr_0"], npz, layout, int(meta["num_classes"]), side=math.isqrt(count))


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
