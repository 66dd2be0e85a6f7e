"""Stage ``latents``: prepared images -> ``z_0`` arrays in ``data/latents/<split>/``.

Pixel mode: ``mean.npy`` = image / 127.5 - 1 (float16 NCHW), no ``std``. Latent mode: the SD-VAE
posterior mean and std (diffusers ``AutoencoderKL``), both times ``latents.scale``, float16, on the GPU
when there is one; training then samples ``z_0 = mean + std * eps`` (fast-DiT). ``latents.flip`` also
stores the encodings of horizontally flipped images (``*_flip.npy``); ``tasks.transition.enabled``
stores the encoded paired target (``pair_mean.npy``, and ``pair_mean_flip.npy`` = pair of the flipped
image). ``meta.json``: {mode, scale, shape, num, flip, pair, classes, ...}. Written atomically.
Under ``torchrun`` each rank encodes a contiguous slice of each split (whole ``latents.batch_size``
batches) and rank 0 gathers them into the same files (``mtdiff.sharding``).

    python -m mtdiff.stages.latents [diffusion.mode=latent latents.vae=<dir> ...]
    torchrun --standalone --nproc_per_node 8 -m mtdiff.stages.latents diffusion.mode=latent ...
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from mtdiff.config import Params
from mtdiff.data import SPLITS, load_prepared, pair_images
from mtdiff.encoders import encode_images_vae, load_vae
from mtdiff.pipeline.tracking import main_stage_run
from mtdiff.sharding import gather_arrays, main_atomic_dir, rank_dir, shard_range, shard_scratch
from mtdiff.stages import stage_main
from mtdiff.distributed import DistInfo, distributed
from mtdiff.utils import get_logger

log = get_logger("mtdiff.latents")
PIXEL_CHUNK = 4096  # pixel mode is a cheap elementwise map: big chunks


def _hflip(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[:, :, ::-1])


def _variants(flip: bool, pairing: str | None) -> list[tuple[str, str | None, Callable[[np.ndarray], np.ndarray]]]:
    """(mean file, std file, image transform) for every array the stage stores."""
    out: list[tuple[str, str | None, Callable]] = [("mean", "std", lambda x: x)]
    if flip:
        out.append(("mean_flip", "std_flip", _hflip))
    if pairing:
        out.append(("pair_mean", None, lambda x: pair_images(x, pairing)))
        if flip:
            out.append(("pair_mean_flip", None, lambda x: pair_images(_hflip(x), pairing)))
    return out


def _pixel_encoder(batch: np.ndarray) -> tuple[np.ndarray, None]:
    # [0, 255] -> [-1, 1], NHWC -> NCHW; float16 holds k/127.5 - 1 to within 2e-4 (lossless at 8 bits).
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return x, None


def _make_vae_encoder(params: Params, device: torch.device) -> tuple[Callable, Any]:
    vae = load_vae(params.latents.vae, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    res = params.data.resolution
    if res % factor:
        raise ValueError(f"latent mode: data.resolution {res} is not divisible by the VAE's downsampling factor "
                         f"{factor}; set data.resolution to a multiple of {factor} (e.g. {factor * -(-res // factor)}) "
                         f"and re-run prepare")
    scale = params.latents.scale

    def encode(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = encode_images_vae(vae, batch)
        return (mean * scale).numpy(), (std * scale).numpy()

    return encode, vae


def _encode_split(images: np.ndarray, out_dir: Path, encode: Callable, variants: list, batch_size: int,
                  desc: str) -> None:
    """Encode every variant of every image into float16 memmaps under ``out_dir`` (none when no images)."""
    n = len(images)
    files: dict[str, np.ndarray] = {}
    shape: tuple[int, int, int] | None = None
    with tqdm(total=n * len(variants), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, n, batch_size):
            batch = np.asarray(images[start:start + batch_size])
            for mean_name, std_name, transform in variants:
                mean, std = encode(transform(batch))
                if shape is None:
                    shape = tuple(int(s) for s in mean.shape[1:])
                for name, arr in ((mean_name, mean), (std_name, std)):
                    if name is None or arr is None:
                        continue
                    if name not in files:
                        files[name] = np.lib.format.open_memmap(out_dir / f"{name}.npy", mode="w+",
                                                                dtype=np.float16, shape=(n, *shape))
                    files[name][start:start + len(arr)] = arr.astype(np.float16)
                bar.update(len(batch))
    for mm in files.values():
        mm.flush()


def run(params: Params) -> dict[str, Any]:
    """Encode both prepared splits (over the torchrun ranks, when launched so); returns {out_dir, mode,
    shape, per-split counts, seconds} (rank 0; the other ranks return ``{"rank": r}``)."""
    for split in SPLITS:  # fail before any work when an input is missing
        load_prepared(params, split)
    with distributed() as info:
        return _run(params, info)


def _run(params: Params, info: DistInfo) -> dict[str, Any]:
    mode = params.diffusion.mode
    pairing = params.tasks.transition.pairing if params.tasks.transition.enabled else None
    flip = params.latents.flip
    out = params.latents_dir
    start = time.time()
    with main_stage_run(params, "latents", out.parent, info) as tracker:
        if mode == "latent":
            encode, _vae = _make_vae_encoder(params, info.device)
            batch_size, scale, block = params.latents.batch_size, params.latents.scale, params.latents.batch_size
            if info.is_main:
                log.info("latent mode: VAE %s on %s x %d, scale %g", params.latents.vae, info.device, info.world_size,
                         scale)
        else:  # elementwise: any cut between ranks gives the same values
            encode, batch_size, scale, block = _pixel_encoder, PIXEL_CHUNK, 1.0, 1
        variants = _variants(flip, pairing)
        summary: dict[str, Any] = {"mode": mode, "flip": flip, "pair": pairing, "splits": {}}
        with main_atomic_dir(out, info) as tmp, shard_scratch(out, info) as scratch:
            for split in SPLITS:
                t0 = time.time()
                images, labels, classes = load_prepared(params, split)
                mine = shard_range(len(images), info, block=block)
                with torch.inference_mode():
                    _encode_split(images[mine.start:mine.stop], rank_dir(scratch / split, info), encode, variants,
                                  batch_size, f"latents {split}")
                names = gather_arrays(scratch / split, tmp / split if tmp else None, info)
                if tmp is None:
                    continue
                if "mean" not in names:
                    raise ValueError(f"latents {split}: no images to encode")
                secs = time.time() - t0
                _write_split_meta(params, tmp / split, labels, classes, summary, scale, secs)
                log.info("%s: %d images -> %s %s (%s) in %.1fs (%.2f img/s)", split, len(images), mode,
                         tuple(summary["shape"]), ", ".join(f"{n}.npy" for n in names), secs,
                         len(images) * len(variants) / max(secs, 1e-9))
        if not info.is_main:
            return {"rank": info.rank}
        summary["seconds"] = round(time.time() - start, 2)
        tracker.log_metrics({"latents/seconds": summary["seconds"],
                             **{f"latents/{s}_images": v["num"] for s, v in summary["splits"].items()}})
    log.info("latents (%s, shape %s) -> %s in %.1fs", mode, tuple(summary["shape"]), out, summary["seconds"])
    return {**summary, "out_dir": str(out)}


def _write_split_meta(params: Params, d: Path, labels: np.ndarray, classes: list, summary: dict[str, Any],
                      scale: float, secs: float) -> None:
    """``labels.npy`` and ``meta.json`` beside a split's gathered arrays; its entry in ``summary``."""
    mode, num = params.diffusion.mode, len(labels)
    shape = [int(s) for s in np.load(d / "mean.npy", mmap_mode="r").shape[1:]]
    np.save(d / "labels.npy", labels.astype(np.int64))
    meta = {"mode": mode, "scale": scale, "shape": shape, "num": num,
            "flip": params.latents.flip, "pair": summary["pair"], "classes": classes, "num_classes": len(classes),
            "dtype": "float16", "vae": params.latents.vae if mode == "latent" else None,
            "source": params.data.source, "resolution": params.data.resolution,
            "files": sorted(p.name for p in d.glob("*.npy"))}
    (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    summary["splits"][d.name] = {"num": num, "shape": shape, "seconds": round(secs, 2)}
    summary["shape"] = shape


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
