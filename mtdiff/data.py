"""Training data: the prepared contract, paired-image targets, the memory-mapped training set, masks.

- :func:`load_prepared`: one split of ``data/prepared/`` (images memmap, labels, classes).
- :func:`pair_images`: the deterministic source -> target pairing of the image-transition task.
- :class:`TrainDataset`: map-style dataset over ``data/latents/<split>/`` (+ representations),
  with a vectorised ``__getitems__`` that torch's DataLoader calls for a whole batch at once;
  use it with ``collate_fn=collate_batch``.
- :func:`random_patch_mask`: the patch-aligned keep/mask map of the masked-image task.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mtdiff.config import Params
from mtdiff.utils import derive_seed

SPLITS = ("train", "test")  # the prepared splits (ImageNet val is "test"), as in mtdiff.sources
PAIRINGS = ("rot90", "edges")
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_prepared(params: Params, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images memmap uint8 NHWC, labels int64, classes) of a prepared split, or a clear error."""
    d = params.prepared_dir
    img_path = d / f"{split}_images.npy"
    if not img_path.is_file():
        raise FileNotFoundError(f"{img_path} missing (run `dvc repro prepare` first)")
    images = np.load(img_path, mmap_mode="r")
    labels = np.load(d / f"{split}_labels.npy")
    classes = json.loads((d / "classes.json").read_text())
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"{img_path}: expected uint8 NHWC aligned with labels, got {images.dtype} "
                         f"{images.shape} vs {labels.shape}")
    return images, labels, classes


def _sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    """(N,H,W) float32 -> Sobel gradient magnitude, borders replicated."""
    p = np.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = gray.shape[1:]
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    for dy in range(3):
        for dx in range(3):
            win = p[:, dy:dy + h, dx:dx + w]
            if _SOBEL_X[dy, dx]:
                gx += _SOBEL_X[dy, dx] * win
            if _SOBEL_X[dx, dy]:
                gy += _SOBEL_X[dx, dy] * win
    return np.sqrt(gx * gx + gy * gy)


def pair_images(images_uint8_nhwc: np.ndarray, pairing: str, chunk: int = 4096) -> np.ndarray:
    """Target image of the image-transition task, same shape and dtype as the source batch.

    - ``rot90``: the source rotated by 90 degrees counter-clockwise (``np.rot90`` over H, W);
      needs square images.
    - ``edges``: the Sobel gradient magnitude of the luminance, scaled per image so its maximum is
      255 (an all-flat image maps to zeros), repeated over the channels.
    """
    x = np.asarray(images_uint8_nhwc)
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"pair_images: expected uint8 NHWC images, got {x.dtype} {x.shape}")
    if pairing == "rot90":
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"pair_images: rot90 needs square images, got {x.shape[1]}x{x.shape[2]}")
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(1, 2)))
    if pairing != "edges":
        raise ValueError(f"pair_images: unknown pairing '{pairing}'; allowed: {', '.join(PAIRINGS)}")
    out = np.empty_like(x)
    for i in range(0, len(x), chunk):
        block = x[i:i + chunk].astype(np.float32)
        gray = block[..., 0] if block.shape[-1] == 1 else block[..., :3] @ _LUMA
        mag = _sobel_magnitude(gray)
        peak = mag.reshape(len(mag), -1).max(axis=1)
        scale = np.where(peak > 0, 255.0 / np.maximum(peak, 1e-12), 0.0).astype(np.float32)
        edges = np.clip(np.rint(mag * scale[:, None, None]), 0, 255).astype(np.uint8)
        out[i:i + chunk] = edges[..., None]
    return out


def random_patch_mask(batch_size: int, shape_chw: Sequence[int], ratio: float, patch: int,
                      generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B,1,H,W) float mask, 1 = keep, 0 = masked, constant on ``patch`` x ``patch`` tiles.

    Exactly ``round(ratio * num_patches)`` tiles are masked in every sample (MaskDiT-style), so the
    masked-image task input is ``z0 * mask``.
    """
    _, h, w = (int(s) for s in shape_chw)
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"random_patch_mask: {h}x{w} is not divisible by patch {patch} (model.patch_size)")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"random_patch_mask: ratio {ratio} must be in [0, 1)")
    gh, gw = h // patch, w // patch
    n = gh * gw
    n_mask = int(round(ratio * n))
    noise = torch.rand(batch_size, n, generator=generator, device=generator.device if generator else device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # a random permutation rank per tile
    keep = (ranks >= n_mask).float().view(batch_size, 1, gh, gw)
    mask = keep.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return mask.to(device)


def keep_rows(batch_size: int, p: float, generator: torch.Generator | None = None,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """(B,) bool, False with probability ``p``: which examples keep a task input (M2 dropout)."""
    noise = torch.rand(batch_size, generator=generator, device=generator.device if generator else device)
    return noise.to(device) >= p


def collate_batch(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """DataLoader collate: passes through a batch from ``__getitems__``, stacks a list of items."""
    if isinstance(batch, dict):
        return batch
    if not batch:
        raise ValueError("collate_batch: empty batch")
    return {k: torch.stack([item[k] for item in batch]) for k in batch[0]}


class TrainDataset(Dataset):
    """Memory-mapped training set: ``z0`` (+ ``label``, ``representation``, ``transition``).

    Latent mode draws ``z0 = mean + std * randn`` from the stored VAE posterior (as fast-DiT does)
    and, with flipped copies stored, picks the flipped or unflipped encoding at random per sample.
    Each sample's randomness comes from its own generator seeded by ``(seed, epoch, index)``
    (:meth:`set_epoch`; call it before creating the epoch's DataLoader), never from a global or
    per-worker RNG stream: a batch is the same whichever process reads it and whatever was read
    before, so resuming mid-epoch is exact with DataLoader workers too. The memmaps are opened
    lazily per process, so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, params: Params, split: str = "train"):
        self.split = split
        self.seed = int(params.seed)
        self.epoch = 0
        self.dir = Path(params.latents_dir) / split
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} missing: no latents for split '{split}' "
                                    f"(run `dvc repro latents` first)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta["mode"] != params.diffusion.mode:
            raise ValueError(f"{self.dir}: latents were built in mode '{self.meta['mode']}' but diffusion.mode is "
                             f"'{params.diffusion.mode}' (run `dvc repro latents`)")
        self.mode: str = self.meta["mode"]
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self.meta["shape"])
        self.num: int = int(self.meta["num"])
        self.flip: bool = bool(self.meta.get("flip"))
        classes = self.meta.get("classes")
        self.num_classes: int = len(classes) if classes else int(np.load(self.dir / "labels.npy").max()) + 1
        self.use_transition = params.tasks.transition.enabled
        if self.use_transition and not self.meta.get("pair"):
            raise ValueError(f"{self.dir}: tasks.transition.enabled but the latents hold no pair_mean.npy "
                             f"(run `dvc repro latents` with tasks.transition.enabled: true)")
        if self.use_transition and self.flip and not (self.dir / "pair_mean_flip.npy").is_file():
            raise ValueError(f"{self.dir}: flipped latents without pair_mean_flip.npy (run `dvc repro latents`)")
        self.use_repr = params.tasks.representation.enabled
        self.repr_path = Path(params.representations_dir) / f"{split}.npy"
        self.repr_dim: int | None = None
        if self.use_repr:
            if not self.repr_path.is_file():
                raise FileNotFoundError(f"{self.repr_path} missing: tasks.representation.enabled needs "
                                        f"representations (run `dvc repro representations` first)")
            rep = np.load(self.repr_path, mmap_mode="r")
            if rep.ndim != 2 or rep.shape[0] != self.num:
                raise ValueError(f"{self.repr_path}: shape {rep.shape} does not match {self.num} latents of "
                                 f"split '{split}' (re-run `dvc repro representations`)")
            self.repr_dim = int(rep.shape[1])
        self._arrays: dict[str, np.ndarray] | None = None

    # -- memmaps, opened per process ------------------------------------------------------------
    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            names = ["mean", "labels"]
            if self.mode == "latent":
                names.append("std")
            if self.flip:
                names += ["mean_flip"] + (["std_flip"] if self.mode == "latent" else [])
            if self.use_transition:
                names += ["pair_mean"] + (["pair_mean_flip"] if self.flip else [])
            arrays = {n: np.load(self.dir / f"{n}.npy", mmap_mode="r") for n in names}
            if self.use_repr:
                arrays["representation"] = np.load(self.repr_path, mmap_mode="r")
            self._arrays = arrays
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # never pickle memmaps (that would copy the data into the worker)
        return state

    def __len__(self) -> int:
        return self.num

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose random draws (posterior sample, flip) the next reads make."""
        self.epoch = int(epoch)

    def _generators(self, idx: np.ndarray) -> list[torch.Generator]:
        """One CPU generator per sample, seeded by ``derive_seed(seed, "data/{epoch}/{index}")``."""
        return [torch.Generator().manual_seed(derive_seed(self.seed, f"data/{self.epoch}/{int(i)}")) for i in idx]

    # -- access ---------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([int(i)])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A whole batch with one sorted fancy-index read per array; rows come back in request order."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or len(idx) == 0:
            raise IndexError("__getitems__ needs a non-empty list of indices")
        if idx.min() < -self.num or idx.max() >= self.num:
            raise IndexError(f"index out of range for {self.num} samples")
        idx = idx % self.num
        a = self._open()
        b = len(idx)
        random = self.flip or self.mode == "latent"
        gens = self._generators(idx) if random else []
        # per sample: the flip first, then the posterior noise, from that sample's generator
        flipped = (np.array([torch.rand((), generator=g).item() < 0.5 for g in gens], dtype=bool) if self.flip
                   else np.zeros(b, dtype=bool))

        def gather(name: str, flip_name: str | None) -> np.ndarray:
            # Sorted reads are sequential on disk; the flipped subset reads from the *_flip copy.
            out = None
            for sel, arr_name in ((~flipped, name), (flipped, flip_name)):
                if not sel.any():
                    continue
                pos = np.nonzero(sel)[0]
                order = np.argsort(idx[pos], kind="stable")
                rows = a[arr_name][idx[pos][order]]
                if out is None:
                    out = np.empty((b, *rows.shape[1:]), dtype=rows.dtype)
                out[pos[order]] = rows
            return out

        mean = torch.from_numpy(gather("mean", "mean_flip").astype(np.float32))
        if self.mode == "latent":
            std = torch.from_numpy(gather("std", "std_flip").astype(np.float32))
            z0 = mean + std * torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
        else:
            z0 = mean
        order = np.argsort(idx, kind="stable")
        labels = np.empty(b, dtype=np.int64)
        labels[order] = a["labels"][idx[order]]
        out = {"z0": z0, "label": torch.from_numpy(labels)}
        if self.use_repr:
            rep = np.empty((b, self.repr_dim), dtype=np.float32)
            rep[order] = a["representation"][idx[order]]
            out["representation"] = torch.from_numpy(rep)
        if self.use_transition:
            # The target of a flipped source is the pair of the flipped image, stored as pair_mean_flip.
            out["transition"] = torch.from_numpy(gather("pair_mean", "pair_mean_flip").astype(np.float32))
        return out
