"""``mtdiff bench data``: is the data pipeline ever the bottleneck?

1. prepare decoding: Fashion-MNIST IDX (``sources.read_idx`` and the whole ``write_fashion_mnist_split``)
   and ImageNet-style JPEG decode + ADM ``center_crop_arr`` (``sources.decode_image_bytes``) on JPEGs
   generated here at a typical ImageNet size;
2. reading the training shards: ``TrainDataset`` + ``DataLoader`` (batched ``__getitems__``,
   ``collate_batch``) vs indexing tensors held in memory;
3. training fed by each (the same train step, interleaved step by step so machine noise hits both
   alike): ratio shards / in-memory (>= 0.9 means reading is not the bottleneck);
4. training from stored latents (``mean + std * eps``, as the latents stage stores them) vs encoding
   every batch with a VAE on the fly (diffusers ``AutoencoderKL`` of the SD-VAE architecture; random
   weights unless ``latents.vae`` is a local folder, in which case those weights are used).

When ``params.latents_dir`` holds no training split, a slice (``--max-per-split``) is prepared into a
temp folder by the prepare and latents stages' own ``run()``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mtdiff.bench import common as C
from mtdiff.bench.train import device_name

# SD-VAE (stabilityai/sd-vae-ft-ema) architecture; "tiny" keeps every block and the 8x downsampling
# but narrows the channels, so it runs on a laptop (its cost then understates the real encoder's).
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     block_out_channels=(128, 256, 512, 512), act_fn="silu")
TINY_VAE_CHANNELS = (32, 32, 64, 64)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--config", default="default", choices=C.CONFIGS,
                    help="model/shape of the latents-vs-VAE comparison (default: a 64x64 RGB latent-mode "
                         "variant of the default profile)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default train.batch_size; quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per feed (quick 3)")
    ap.add_argument("--jpegs", type=int, default=None, help="generated JPEGs to decode (quick 16, else 64)")
    ap.add_argument("--max-per-split", type=int, default=None,
                    help="size of the temp data slice when none is prepared (quick 512, else 4096)")
    ap.add_argument("--vae", default="auto", choices=("auto", "tiny", "full"),
                    help="auto: latents.vae weights when it is a local folder, else tiny random")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", default=None)
    ap.add_argument("overrides", nargs="*", help="params overrides key.sub=value")


# -- 1. prepare decoding --------------------------------------------------------------------------
def bench_fmnist_decode(params, reps: int = 2, max_per_split: int | None = None) -> dict[str, Any]:
    """IDX decode of the Fashion-MNIST training images, and the prepare stage's split writer (on
    ``max_per_split`` images when given, else on all 60000)."""
    from mtdiff import sources

    try:
        folder = Path(params.data.fashion_mnist_dir)
        path = sources._find_idx(folder, "train-images-idx3-ubyte")
        if path is None:
            raise FileNotFoundError(folder)
    except (FileNotFoundError, OSError) as exc:
        return {"skipped": f"Fashion-MNIST IDX files not found ({exc})"}
    best, n = float("inf"), 0
    for _ in range(reps):
        t0 = time.perf_counter()
        arr = sources.read_idx(path)
        best = min(best, time.perf_counter() - t0)
        n = len(arr)
    if max_per_split is not None:
        params = C.derive(params, {"data.max_per_split": max_per_split})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = sources.write_fashion_mnist_split(params, "train", Path(tmp) / "train_images.npy")
        split_s = time.perf_counter() - t0
    return {"idx_file": str(path), "idx_images": n, "idx_img_per_s": n / best,
            "split_images": res.num, "split_img_per_s": res.num / split_s,
            "split_note": "write_fashion_mnist_split: decode + per-image sha1 + np.save"}


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90) of ImageNet's typical size: smooth colour fields plus noise, so the
    entropy (and decode cost) is closer to photos than flat images would be."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        ph = rng.uniform(0, 2 * np.pi, size=3)
        img = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 12, size=img.shape)
        p = folder / f"n{i // 10:08d}_{i}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def bench_jpeg_decode(n: int, resolution: int = 256) -> dict[str, Any]:
    """Single-process rate of the prepare stage's per-file work: read, decode, RGB, center_crop_arr."""
    from mtdiff import sources

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), n)
        blobs = [(p.read_bytes(), p.name) for p in paths]
        sources.decode_image_bytes(blobs[0][0], blobs[0][1], resolution, 3)  # warm PIL's codecs
        t0 = time.perf_counter()
        for data, name in blobs:
            d = sources.decode_image_bytes(data, name, resolution, 3)
            if d.image is None:
                raise RuntimeError(f"bench data: generated JPEG {name} failed to decode ({d.reason}: {d.error})")
        secs = time.perf_counter() - t0
        mean_kb = sum(len(b) for b, _ in blobs) / len(blobs) / 1024
    return {"jpegs": n, "jpeg_size": "500x375", "jpeg_mean_kb": mean_kb, "resolution": resolution,
            "img_per_s": n / secs, "note": "one process; the prepare stage runs prepare.num_workers of them"}


# -- data for 2./3. -------------------------------------------------------------------------------
@contextlib.contextmanager
def training_data(params, max_per_split: int) -> Iterator[tuple[Any, str]]:
    """Params whose ``latents_dir`` holds a train split: the configured one, else a temp slice."""
    if (params.latents_dir / "train" / "meta.json").is_file():
        yield params, f"existing {params.latents_dir}"
        return
    from mtdiff.stages import latents as latents_stage
    from mtdiff.stages import prepare as prepare_stage

    with tempfile.TemporaryDirectory(prefix="mtdiff-bench-") as tmp:
        slice_params = C.derive(params, {"data.out_dir": str(Path(tmp) / "data"), "data.max_per_split": max_per_split})
        old = os.environ.get("MTDIFF_MLFLOW")
        os.environ["MTDIFF_MLFLOW"] = "0"  # a benchmark's scratch data is no experiment
        try:
            prepare_stage.run(slice_params)
            latents_stage.run(slice_params)
        finally:
            if old is None:
                os.environ.pop("MTDIFF_MLFLOW", None)
            else:
                os.environ["MTDIFF_MLFLOW"] = old
        yield slice_params, f"temp slice of {max_per_split} images/split (prepare + latents run())"


def _loader(dataset, batch_size: int, num_workers: int, device: torch.device, seed: int):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from mtdiff.data import collate_batch

    sampler = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
                           batch_size, drop_last=True)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)


def _cycle(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


class InMemory:
    """The training split as tensors in RAM, batches by random index (the zero-I/O reference)."""

    def __init__(self, dataset, seed: int = 0):
        everything = dataset.__getitems__(list(range(len(dataset))))
        self.tensors = {k: v.clone() for k, v in everything.items()}
        self.n = len(dataset)
        self.gen = torch.Generator().manual_seed(seed)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            idx = torch.randint(0, self.n, (batch_size,), generator=self.gen)
            yield {k: v[idx] for k, v in self.tensors.items()}


def bench_reading(dataset, batch_size: int, num_workers: int, device: torch.device, batches: int) -> dict[str, Any]:
    """Pure reading rate (no training): DataLoader over the shards vs in-memory indexing."""
    from mtdiff.training import to_device

    loader_it = _cycle(_loader(dataset, batch_size, num_workers, device, 0))
    mem = InMemory(dataset)
    mem_it = mem.batches(batch_size)
    rates = {}
    for name, it in (("shards", loader_it), ("in_memory", mem_it)):
        to_device(next(it), device)  # first batch: worker start-up, page cache
        C.sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            to_device(next(it), device)
        C.sync(device)
        rates[name] = batches * batch_size / (time.perf_counter() - t0)
    return {"shards_img_per_s": rates["shards"], "in_memory_img_per_s": rates["in_memory"],
            "batch_size": batch_size, "num_workers": num_workers, "batches": batches}


def interleaved_training(step, feeds: dict[str, Any], steps: int, warmup: int, device: torch.device,
                         batch_size: int) -> dict[str, float]:
    """img/s of ``step`` fed by each feed (a callable returning a batch on the device, data time
    included), alternating feeds every step so load changes on the machine hit all of them alike.
    Uses the median step time (robust to a stray slow step)."""
    for _ in range(warmup):
        for feed in feeds.values():
            step(feed())
    C.sync(device)
    times: dict[str, list[float]] = {k: [] for k in feeds}
    for _ in range(steps):
        for name, feed in feeds.items():
            t0 = time.perf_counter()
            step(feed())
            C.sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: batch_size / statistics.median(ts) for name, ts in times.items()}


# -- 4. stored latents vs VAE on the fly ------------------------------------------------------------------
def latent_params(config: str, base_params_path: str | None, overrides: list[str] | None):
    """Latent-mode params of the comparison: the imagenet256 DiT-B/2 setting, or for ``default`` the
    default model on 64x64 RGB images (4x8x8 latents, patch 2)."""
    if config == "imagenet256-dit-b2":
        return C.bench_params(config, base_params_path, overrides)
    extra = ["data.resolution=64", "data.channels=3", "diffusion.mode=latent", "model.patch_size=2"]
    return C.bench_params("default", base_params_path, extra + list(overrides or []))


def make_vae(params, kind: str, device: torch.device):
    """(AutoencoderKL, description): local weights, or random init of the SD-VAE architecture."""
    from diffusers import AutoencoderKL

    local = Path(params.latents.vae).expanduser()
    if kind == "auto" and local.exists():
        from mtdiff.encoders import load_vae

        return load_vae(str(local), device), f"pretrained weights from {local}"
    cfg = dict(SD_VAE_CONFIG)
    if kind in ("auto", "tiny"):
        cfg["block_out_channels"] = TINY_VAE_CHANNELS
        desc = (f"TINY RANDOM AutoencoderKL (SD-VAE blocks, channels {TINY_VAE_CHANNELS} instead of "
                f"{SD_VAE_CONFIG['block_out_channels']}; no weights at latents.vae): understates the real "
                f"encoder's cost, use --vae full for it")
    else:
        desc = "random-init AutoencoderKL at full SD-VAE width (real encoder cost, no weights needed)"
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg).to(device).eval().requires_grad_(False)
    return vae, desc


def vae_flops_per_image(vae, resolution: int, device: torch.device) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, resolution, resolution, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            vae.encode(x)
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - a counter gap must not fail the benchmark
        return None


def bench_latents_vs_vae(params, *, vae_kind: str, batch_size: int, steps: int, warmup: int,
                         device: torch.device, dtype: str) -> dict[str, Any]:
    """Training img/s from stored latents vs with the VAE encoder run on every batch (no grad)."""
    res = params.data.resolution
    vae, vae_desc = make_vae(params, vae_kind, device)
    vae_flops = vae_flops_per_image(vae, res, device)
    scale = params.latents.scale
    amp = C.amp_dtype(device, dtype)
    g = torch.Generator().manual_seed(0)
    pool = max(2 * batch_size, 64)
    images = torch.randint(0, 256, (pool, 3, res, res), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, C.num_classes(params), (pool,), generator=g)

    @torch.no_grad()
    def encode(x_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_uint8.to(device).float().div_(127.5).sub_(1)
        with C.autocast(device, amp):
            dist = vae.encode(x).latent_dist
        return dist.mean.float() * scale, dist.std.float() * scale

    # The stored latents: what the latents stage writes (scaled posterior mean and std).
    means, stds = zip(*(encode(images[i:i + batch_size]) for i in range(0, pool, batch_size)))
    mean, std = torch.cat(means), torch.cat(stds)

    def stored() -> dict[str, torch.Tensor]:
        idx = torch.randint(0, pool, (batch_size,), generator=g)
        m, s = mean[idx], std[idx]
        return {"z0": m + s * torch.randn_like(m), "label": labels[idx].to(device)}

    def on_the_fly() -> dict[str, torch.Tensor]:
        idx = torch.randint(0, pool, (batch_size,), generator=g)
        m, s = encode(images[idx])
        return {"z0": m + s * torch.randn_like(m), "label": labels[idx].to(device)}

    torch.manual_seed(params.seed)
    model, diffusion = C.build(params, device)
    from mtdiff.models import flops_per_image

    step = C.TrainStep(model, diffusion, params, device, dtype, seed=params.seed)
    rates = interleaved_training(step, {"latents": stored, "vae": on_the_fly}, steps, warmup, device, batch_size)
    return {"vae": vae_desc, "vae_encoder_flops_per_img": vae_flops,
            "model_train_flops_per_img": 3 * float(flops_per_image(model)),
            "image_shape": [3, res, res], "latent_shape": list(C.data_shape(params)),
            "model_dims": list(params.model.dims), "patch_size": params.model.patch_size,
            "batch_size": batch_size, "steps": steps,
            "latents_img_per_s": rates["latents"], "vae_on_the_fly_img_per_s": rates["vae"],
            "ratio_latents_vs_vae": rates["latents"] / rates["vae"]}


# -- the command ----------------------------------------------------------------------------------
@C.keeps_threads
def run_data_bench(*, quick: bool = False, device: str = "auto", dtype: str = "auto", config: str = "default",
                   batch_size: int | None = None, steps: int | None = None, jpegs: int | None = None,
                   max_per_split: int | None = None, vae: str = "auto", threads: int | None = None,
                   params_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    machine, params, n_threads, dev, dt = C.setup_bench("default", params_path, overrides, threads, device, dtype)
    batch_size = batch_size or (32 if quick else params.train.batch_size)
    steps = steps or (3 if quick else 10)
    warmup = 1 if quick else 2
    jpegs = jpegs or (16 if quick else 64)
    max_per_split = max_per_split or (512 if quick else 4096)
    if min(batch_size, steps, jpegs, max_per_split) < 1:
        raise ValueError("--batch-size, --steps, --jpegs and --max-per-split must be >= 1")
    t_all = time.perf_counter()
    out: dict[str, Any] = {"bench": "data", "device": dev.type, "device_name": device_name(dev), "dtype": dt,
                           "threads": n_threads, "quick": quick}
    # the whole 60000-image split: on a slice the fixed cost of reading the .gz file dominates
    out["fmnist_decode"] = bench_fmnist_decode(params, reps=1 if quick else 3)
    out["jpeg_decode"] = bench_jpeg_decode(jpegs, resolution=256)

    from mtdiff.data import TrainDataset
    from mtdiff.training import to_device

    with training_data(params, max(max_per_split, batch_size)) as (dparams, where):
        dataset = TrainDataset(dparams, split="train")
        if len(dataset) < batch_size:
            raise ValueError(f"the training split has {len(dataset)} items, fewer than --batch-size {batch_size}")
        out["data_source"] = where
        out["num_workers"] = dparams.train.num_workers
        out["reading"] = bench_reading(dataset, batch_size, dparams.train.num_workers, dev,
                                       batches=max(3, min(50, len(dataset) // batch_size)) if quick else 50)
        torch.manual_seed(dparams.seed)
        model, diffusion = C.build(dparams, dev)
        step = C.TrainStep(model, diffusion, dparams, dev, dt, seed=dparams.seed)
        shard_it = _cycle(_loader(dataset, batch_size, dparams.train.num_workers, dev, 1))
        mem_it = InMemory(dataset, seed=1).batches(batch_size)
        rates = interleaved_training(step, {"shards": lambda: to_device(next(shard_it), dev),
                                            "in_memory": lambda: to_device(next(mem_it), dev)},
                                     steps, warmup, dev, batch_size)
        out["training"] = {"batch_size": batch_size, "steps": steps, "shards_img_per_s": rates["shards"],
                           "in_memory_img_per_s": rates["in_memory"],
                           "ratio_shards_vs_memory": rates["shards"] / rates["in_memory"]}
        del shard_it  # stop loader workers before the temp slice goes
    lparams = latent_params(config, params_path, overrides)
    out["latents_vs_vae"] = bench_latents_vs_vae(lparams, vae_kind=vae, batch_size=min(batch_size, 16) if quick
                                                 else batch_size, steps=steps, warmup=warmup, device=dev, dtype=dt)
    out["latents_vs_vae"]["config"] = config
    out["ratio_shards_vs_memory"] = out["training"]["ratio_shards_vs_memory"]
    out["ratio_latents_vs_vae"] = out["latents_vs_vae"]["ratio_latents_vs_vae"]
    out["seconds"] = time.perf_counter() - t_all
    out.update(load_avg_1m_before=machine["load_avg_1m"], omp_env=machine["omp_env"],
               warning=C.busy_warning(machine, n_threads))
    return out


def format_result(r: dict[str, Any]) -> str:
    fm, jp, rd, tr, lv = r["fmnist_decode"], r["jpeg_decode"], r["reading"], r["training"], r["latents_vs_vae"]
    buf = io.StringIO()
    p = lambda s="": print(s, file=buf)  # noqa: E731
    p(f"bench data  device={r['device']} ({r['device_name']})  dtype={r['dtype']}  threads={r['threads']}")
    p("  prepare decoding")
    if "skipped" in fm:
        p(f"    Fashion-MNIST IDX   skipped: {fm['skipped']}")
    else:
        p(f"    Fashion-MNIST IDX   {fm['idx_img_per_s']:,.0f} img/s (read_idx, {fm['idx_images']} images, gzip)")
        p(f"    Fashion-MNIST split {fm['split_img_per_s']:,.0f} img/s ({fm['split_note']})")
    p(f"    JPEG + center crop  {jp['img_per_s']:,.1f} img/s ({jp['jpegs']} generated {jp['jpeg_size']} JPEGs, "
      f"~{jp['jpeg_mean_kb']:.0f} KiB, -> {jp['resolution']}px; {jp['note']})")
    p(f"  training shards ({r['data_source']})")
    p(f"    reading             {rd['shards_img_per_s']:,.0f} img/s TrainDataset+DataLoader "
      f"(num_workers={rd['num_workers']}) vs {rd['in_memory_img_per_s']:,.0f} img/s in-memory tensors")
    p(f"    training            {tr['shards_img_per_s']:.1f} img/s fed from shards vs {tr['in_memory_img_per_s']:.1f} "
      f"img/s from memory (batch {tr['batch_size']}, {tr['steps']} interleaved steps, median)")
    ok = "OK (>= 0.9)" if tr["ratio_shards_vs_memory"] >= 0.9 else "BELOW 0.9: reading is a bottleneck"
    p(f"    ratio               {tr['ratio_shards_vs_memory']:.3f}  {ok}")
    p(f"  stored latents vs VAE on the fly (config {lv['config']}: image {tuple(lv['image_shape'])} -> latent "
      f"{tuple(lv['latent_shape'])}, DiT depth/width/heads {tuple(lv['model_dims'])} patch {lv['patch_size']})")
    p(f"    VAE                 {lv['vae']}")
    if lv.get("vae_encoder_flops_per_img"):
        p(f"    FLOPs/img           VAE encoder {C.fmt_si(lv['vae_encoder_flops_per_img'], 'FLOP')} vs "
          f"training step {C.fmt_si(lv['model_train_flops_per_img'], 'FLOP')} (3 x forward)")
    p(f"    training            {lv['latents_img_per_s']:.1f} img/s from latents vs {lv['vae_on_the_fly_img_per_s']:.1f} "
      f"img/s encoding on the fly (batch {lv['batch_size']})")
    p(f"    ratio               {lv['ratio_latents_vs_vae']:.2f}x faster from stored latents")
    p(f"  total {r['seconds']:.1f} s")
    if r.get("warning"):
        p(f"  {r['warning']}")
    return buf.getvalue().rstrip()


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_data_bench(quick=args.quick, device=args.device, dtype=args.dtype, config=args.config,
                          batch_size=args.batch_size, steps=args.steps, jpegs=args.jpegs,
                          max_per_split=args.max_per_split, vae=args.vae, threads=args.threads,
                          params_path=args.params, overrides=args.overrides)
