"""Sample outputs: diffusion-space tensors -> uint8 NHWC images, image grids, PNG folders."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

GRID_SIDE = 10  # the sample stage's grid: 10 x 10 images, a row per class when labelled


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> uint8 (B, H, W, C), rounding as ADM does."""
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def image_grid(images: np.ndarray, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 NHWC ``images`` into rows of ``nrow`` with ``pad`` px separators -> (H', W', C)."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid: expected uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    """HWC uint8 -> PIL (grayscale for one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(path: str | os.PathLike, image: np.ndarray, scale: int = 1) -> Path:
    """Write one HWC uint8 image as PNG (``scale`` > 1 enlarges it, nearest neighbour)."""
    img = to_pil(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path, format="PNG")
    return Path(path)


def label_grid_indices(labels: np.ndarray, num_classes: int, rows: int = 10, cols: int = 10) -> list[int]:
    """Indices for a grid whose row k shows up to ``cols`` samples of class k (first ``rows`` classes)."""
    out: list[int] = []
    for k in range(min(rows, num_classes)):
        idx = np.flatnonzero(labels == k)[:cols]
        out.extend(int(i) for i in idx)
        out.extend([-1] * (cols - len(idx)))  # blank cells keep the rows aligned
    return out


def gather_with_blanks(images: np.ndarray, indices: Sequence[int], fill: int = 255) -> np.ndarray:
    """``images[indices]`` where index -1 gives a blank cell."""
    blank = np.full(images.shape[1:], fill, dtype=images.dtype)
    return np.stack([images[i] if i >= 0 else blank for i in indices])


def interleave_rows(groups: Sequence[np.ndarray], cols: int, max_blocks: int = 3) -> np.ndarray:
    """For paired outputs: rows of ``cols`` from each group in turn (input / sample / reference)."""
    n = min(len(g) for g in groups)
    out = []
    for b in range(min(max_blocks, (n + cols - 1) // cols)):
        sl = slice(b * cols, min(n, (b + 1) * cols))
        for g in groups:
            out.append(g[sl])
    return np.concatenate(out)


def sample_grid(arr: np.ndarray, npz: dict[str, np.ndarray], cond: str, num_classes: int,
               side: int = GRID_SIDE) -> np.ndarray:
    """side x side overview: rows = classes (label), or input/sample/reference row triplets (masked, transition)."""
    if cond == "label":
        cells = gather_with_blanks(arr, label_grid_indices(npz["labels"], num_classes, side, side))
    elif cond == "masked":
        ref = npz["reference"]
        masked = (ref.astype(np.float32) * npz["mask"][..., None] + 127.5 * (1 - npz["mask"][..., None]))
        cells = interleave_rows([np.round(masked).astype(np.uint8), arr, ref], side)
    elif cond == "transition":
        cells = interleave_rows([npz["source"], arr, npz["reference"]], side)
    else:
        cells = arr[:side * side]
    grid = image_grid(cells, nrow=side)
    scale = max(1, 64 // arr.shape[1])  # small images (Fashion-MNIST 28 px) enlarged for viewing
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return grid
