"""Generation as the sample stage runs it: the ``sample.condition`` inputs of each batch (test-split
images for ``masked`` / ``transition``), seeded noise and masks per batch, decoding to uint8 images,
and the train stage's preview grid drawn the same way.

Batch b (samples ``b * batch_size ...``) draws its noise from a generator seeded by
``(params.seed, b)`` (``derive_seed``), its masks from another: same seed and params, same images,
whichever process draws the batch.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mtdiff.config import Params, TasksConfig
from mtdiff.data import pair_images, random_patch_mask
from mtdiff.diffusion import MTDiffusion, Sampler
from mtdiff.encoders import decode_latents_vae, load_vae
from mtdiff.sampling_io import sample_grid, to_uint8_nhwc
from mtdiff.precision import autocast, autocast_dtype
from mtdiff.train.schedule import final_tasks
from mtdiff.utils import ProgressLog, derive_seed, get_logger

log = get_logger("mtdiff.sample")
PREVIEW_IMAGES = 16  # the train stage's grid every train.grid_every steps (4 x 4)


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


def generate(params: Params, model: torch.nn.Module, diffusion: MTDiffusion, meta: dict[str, Any], device: torch.device,
             tasks: Optional[TasksConfig] = None, items: Optional[range] = None
             ) -> tuple[dict[str, np.ndarray], Optional[np.ndarray]]:
    """The samples.npz arrays of the samples ``items`` (default: all ``sample.num_samples``; it starts at
    a batch boundary) in batches of ``sample.batch_size``, and per sample whether the label head agreed
    with the given label (condition ``label``; None otherwise). ``tasks``: those aggregated (default:
    what the finished model was last trained with, ``final_tasks(params)``)."""
    sc = params.sample
    items = range(sc.num_samples) if items is None else items
    if items.start % sc.batch_size:
        raise ValueError(f"generate: items start at {items.start}, not a multiple of sample.batch_size {sc.batch_size}")
    amp = autocast_dtype(device, params.train.precision)
    decode = _decoder(params, device)
    conditions = _Conditions(params, meta, device)
    sampler = Sampler.from_params(params, diffusion)
    tasks_cfg = tasks or final_tasks(params)
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
            out = sampler(model, (count, *conditions.shape), given, tasks=tasks_cfg, generator=noise_gen,
                          mask_generator=mask_gen)
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


def preview_grid(params: Params, model: torch.nn.Module, diffusion: MTDiffusion, meta: dict[str, Any],
                 device: torch.device, count: int = PREVIEW_IMAGES, tasks: Optional[TasksConfig] = None) -> np.ndarray:
    """A small grid of ``count`` samples drawn as the sample stage draws them (``sample.*`` settings, seeded
    noise: the same noise at every call, so successive grids show the model, not the draw)."""
    sc = params.sample.model_copy(update={"num_samples": count, "batch_size": count})
    npz, _ = generate(params.model_copy(update={"sample": sc}), model, diffusion, meta, device, tasks)
    # too few samples for one row per class: plain sample order (labels cycle 0..K-1)
    layout = params.sample.condition if params.sample.condition in ("masked", "transition") else "uncond"
    return sample_grid(npz["arr_0"], npz, layout, int(meta["num_classes"]), side=math.isqrt(count))
