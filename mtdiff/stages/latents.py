"""Stage ``latents``: prepared images -> ``z_0`` arrays in ``data/latents/<split>/``.

Pixel mode: ``mean.npy`` = image / 127.5 - 1 (float16 NCHW), no ``std``. Latent mode: the SD-VAE
posterior mean and std (diffusers ``AutoencoderKL``), both times ``latents.scale``, float16, on the GPU
when there is one; training then samples ``z_0 = mean + std * eps`` (fast-DiT). ``latents.flip`` also
stores the encodings of horizontally flipped images (``*_flip.npy``); ``tasks.transition.enabled``
stores the encoded paired target (``pair_mean.npy``, and ``pair_mean_flip.npy`` = pair of the flipped
image). ``meta.json``: {mode, scale, shape, num, flip, pair, classes, ...}. Written atomically.

    python -m mtdiff.stages.latents [diffusion.mode=latent latents.vae=<dir> ...]
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
from mtdiff.io import atomic_dir
from mtdiff.stages import stage_main
from mtdiff.tracking import stage_run
from mtdiff.utils import get_logger, pick_device

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
                  desc: str) -> tuple[int, int, int]:
    """Encode every variant of every image into float16 memmaps under ``out_dir``; returns (C,H,W)."""
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
    if shape is None:
        raise ValueError(f"{desc}: no images to encode")
    return shape


def run(params: Params) -> dict[str, Any]:
    """Encode both prepared splits; returns {out_dir, mode, shape, per-split counts, seconds}."""
    mode = params.diffusion.mode
    pairing = params.tasks.transition.pairing if params.tasks.transition.enabled else None
    flip = params.latents.flip
    out = params.latents_dir
    start = time.time()
    for split in SPLITS:  # fail before any work when an input is missing
        load_prepared(params, split)
    device = pick_device("auto")
    with stage_run(params, "latents", out.parent) as tracker:
        if mode == "latent":
            encode, _vae = _make_vae_encoder(params, device)
            batch_size, scale = params.latents.batch_size, params.latents.scale
            log.info("latent mode: VAE %s on %s, scale %g", params.latents.vae, device, scale)
        else:
            encode, batch_size, scale = _pixel_encoder, PIXEL_CHUNK, 1.0
        variants = _variants(flip, pairing)
        summary: dict[str, Any] = {"mode": mode, "flip": flip, "pair": pairing, "splits": {}}
        with atomic_dir(out) as tmp:
            for split in SPLITS:
                t0 = time.time()
                images, labels, classes = load_prepared(params, split)
                d = tmp / split
                d.mkdir()
                with torch.inference_mode():
                    shape = _encode_split(images, d, encode, variants, batch_size, f"latents {split}")
                np.save(d / "labels.npy", labels.astype(np.int64))
                meta = {"mode": mode, "scale": scale, "shape": list(shape), "num": int(len(images)),
                        "flip": flip, "pair": pairing, "classes": classes, "num_classes": len(classes),
                        "dtype": "float16", "vae": params.latents.vae if mode == "latent" else None,
                        "source": params.data.source, "resolution": params.data.resolution,
                        "files": sorted(p.name for p in d.glob("*.npy"))}
                (d / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                secs = time.time() - t0
                summary["splits"][split] = {"num": len(images), "shape": list(shape), "seconds": round(secs, 2)}
                summary["shape"] = list(shape)
                log.info("%s: %d images -> %s %s (%s) in %.1fs (%.2f img/s)", split, len(images), mode,
                         tuple(shape), ", ".join(meta["files"]), secs, len(images) * len(variants) / max(secs, 1e-9))
        summary["seconds"] = round(time.time() - start, 2)
        tracker.log_metrics({"latents/seconds": summary["seconds"],
                             **{f"latents/{s}_images": v["num"] for s, v in summary["splits"].items()}})
    log.info("latents (%s, shape %s) -> %s in %.1fs", mode, tuple(summary["shape"]), out, summary["seconds"])
    return {**summary, "out_dir": str(out)}


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
