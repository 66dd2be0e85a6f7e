"""Raw data readers for the prepare stage: Fashion-MNIST IDX files and an ImageNet ImageFolder.

Both readers write one split's images straight into an ``.npy`` file (uint8 NHWC) and return the
labels, the manifest rows and the decode counts, so ``mtdiff.stages.prepare`` has one code path.

ImageNet images go through ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``):
BOX-halve while the short side is >= 2x the target, BICUBIC-resize the short side to the target,
center-crop. Unreadable files are skipped and counted by reason, never fatal.
"""
from __future__ import annotations

import gzip
import io
import logging
import multiprocessing as mp
import os
import socket
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from mtdiff.config import ConfigError, Params, resolve_path
from mtdiff.io import sha1_bytes

# Plain logging, not mtdiff.utils (that imports torch): decode workers import this module.
log = logging.getLogger(__name__)

SPLITS = ("train", "test")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# IDX file stems per split (Zalando's names; torchvision and Debian's package use the same).
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# ImageNet's held-out split lives in val/; the pipeline calls it "test" (one code path for both sources).
_IMAGENET_DIRS = {"train": "train", "test": "val"}
# What a file's extension claims, to count files whose content is another format.
_EXT_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".gif": "GIF",
                ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
# torchvision's FashionMNIST mirror, probed before importing torchvision for the download.
FMNIST_MIRROR_HOST = "fashion-mnist.s3-website.eu-central-1.amazonaws.com"
MAX_LISTED_SKIPS = 1000  # report.json lists at most this many skipped files per split (counts are exact)
# Refuse files above this size before reading them: ImageNet's largest JPEG is ~15 MB; a 64 MiB cap
# leaves room for PNG/TIFF sources while bounding one worker's memory on a hostile or broken tree.
MAX_FILE_BYTES = 64 * 2**20
# PIL's decompression-bomb limit, set explicitly (a library may have lifted it): ~89.5M pixels is
# PIL's default; images above it are refused as "too_large" (ImageNet's largest is ~ 60M pixels).
MAX_IMAGE_PIXELS = 89_478_485
MANIFEST_HEX_PREFIX = "hex:"  # a source path that is not valid UTF-8, as the hex of its raw bytes


class DataSourceError(ConfigError):
    """The raw data set is missing or malformed; the message says how to get it. A ConfigError: the
    user must fix the input, a retry cannot help (stage_main: one line, exit 2; the flow does not retry)."""


@dataclass
class SplitResult:
    """One split written by a reader: labels and manifest columns aligned with the image rows."""

    split: str
    labels: np.ndarray
    source_paths: list[str]
    sha1s: list[str]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def num(self) -> int:
        return int(len(self.labels))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): uint8 array shaped by its header."""
    path = Path(path)
    hint = "re-install the data (`apt-get install --reinstall dataset-fashion-mnist`) or fix data.fashion_mnist_dir"
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataSourceError(f"{path}: unreadable IDX file ({type(exc).__name__}: {exc}; truncated or not "
                              f"gzip?); {hint}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataSourceError(f"{path}: not an IDX file (bad magic); {hint}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataSourceError(f"{path}: IDX dtype 0x{dtype_code:02x} unsupported (want 0x08 = uint8)")
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataSourceError(f"{path}: IDX header too short ({len(data)} bytes for {ndim} dimensions); {hint}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataSourceError(f"{path}: header says {shape} but holds {arr.size} bytes (truncated file?)")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _network_reachable(host: str, port: int = 80, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def fashion_mnist_dir(params: Params) -> Path:
    """The folder holding the four IDX files: data.fashion_mnist_dir, else a torchvision download.

    The download is only tried when the mirror answers; offline the error says how to install
    Debian's ``dataset-fashion-mnist`` package or where to point ``data.fashion_mnist_dir``.
    """
    configured = Path(params.data.fashion_mnist_dir).expanduser()
    stems = [s for pair in _FMNIST_FILES.values() for s in pair]
    if all(_find_idx(configured, s) for s in stems):
        return configured
    download_root = resolve_path(params.data.out_dir) / "downloads"
    downloaded = download_root / "FashionMNIST" / "raw"
    if all(_find_idx(downloaded, s) for s in stems):
        return downloaded
    host = FMNIST_MIRROR_HOST
    if not _network_reachable(host):
        raise DataSourceError(
            f"Fashion-MNIST IDX files not found in {configured} (data.fashion_mnist_dir) and {host} is "
            f"unreachable: `apt-get install dataset-fashion-mnist` (files land in "
            f"/usr/share/datasets/fashion-mnist) or set data.fashion_mnist_dir to a folder holding "
            f"{', '.join(s + '.gz' for s in stems)}")
    log.info("Fashion-MNIST not in %s; downloading it with torchvision into %s", configured, download_root)
    from torchvision.datasets import FashionMNIST  # only needed for this fallback

    try:
        FashionMNIST(str(download_root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
        raise DataSourceError(f"Fashion-MNIST download into {download_root} failed ({exc}); "
                              f"`apt-get install dataset-fashion-mnist` or set data.fashion_mnist_dir") from exc
    return downloaded


def _resize_gray_stack(images: np.ndarray, resolution: int) -> np.ndarray:
    """Bicubic resize of (N,H,W) uint8 images to (N,res,res); only used when data.resolution != 28."""
    out = np.empty((len(images), resolution, resolution), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img, mode="L").resize((resolution, resolution), Image.BICUBIC))
    return out


def write_fashion_mnist_split(params: Params, split: str, images_path: Path) -> SplitResult:
    """Write ``split`` of Fashion-MNIST to ``images_path`` (uint8 NHWC); sha1 per image of its raw bytes."""
    folder = fashion_mnist_dir(params)
    img_stem, lab_stem = _FMNIST_FILES[split]
    img_file, lab_file = _find_idx(folder, img_stem), _find_idx(folder, lab_stem)
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataSourceError(f"{img_file}: images {images.shape} and labels {labels.shape} do not match")
    listed = len(images)
    if params.data.max_per_split is not None:
        images, labels = images[:params.data.max_per_split], labels[:params.data.max_per_split]
    # Manifest: sha1 of each image's raw IDX bytes (the file holds no per-image source files).
    sha1s = [sha1_bytes(img.tobytes()) for img in images]
    paths = [f"{img_file}#{i}" for i in range(len(images))]
    res, channels = params.data.resolution, params.data.channels
    resized = images.shape[1:] != (res, res)
    if resized:
        images = _resize_gray_stack(images, res)
    out = images[..., None]
    if channels == 3:
        # Gray -> RGB by replication (e.g. for the SD-VAE in latent mode).
        out = np.repeat(out, 3, axis=-1)
    with open(images_path, "wb") as f:
        np.save(f, np.ascontiguousarray(out))
    report = {"listed": listed, "selected": len(out), "decoded": len(out),
              "converted": len(out) if channels == 3 else 0, "converted_by_mode": {"L": len(out)} if channels == 3 else {},
              "extension_mismatch": 0, "skipped": {}, "skipped_files": [],
              "resized": resized}
    return SplitResult(split, labels.astype(np.int64), paths, sha1s, report)


# --------------------------------------------------------------------------------------------
# ImageNet (ImageFolder layout)
# --------------------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's preprocessing (guided_diffusion/image_datasets.py), unchanged: BOX halving, BICUBIC, center crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@dataclass
class Decoded:
    """What a worker sends back for one file: the image or the reason it was skipped."""

    image: np.ndarray | None
    sha1: str | None
    reason: str | None = None           # skip reason; None when decoded
    error: str | None = None
    converted_from: str | None = None   # source PIL mode when it was not RGB
    true_format: str | None = None      # set when the extension lies about the content


def decode_image_bytes(data: bytes, name: str, resolution: int, channels: int) -> Decoded:
    """Decode one file's bytes by content (not extension) into a (res,res,C) uint8 array, or a skip reason."""
    sha1 = sha1_bytes(data)
    if not data:
        return Decoded(None, sha1, "empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Above the limit is refused; PIL only raises past 2x it, so its warning is made an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            img = Image.open(io.BytesIO(data))
            img.load()  # forces the full decode, so truncation surfaces here and not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Decoded(None, sha1, "too_large", str(exc))
    except Image.UnidentifiedImageError as exc:
        return Decoded(None, sha1, "not_an_image", str(exc))
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg.lower() or isinstance(exc, EOFError) else "corrupt"
        return Decoded(None, sha1, reason, f"{type(exc).__name__}: {msg}")
    except Exception as exc:  # noqa: BLE001 - a bad file must never end the stage
        return Decoded(None, sha1, "corrupt", f"{type(exc).__name__}: {exc}")
    claimed = _EXT_FORMATS.get(Path(name).suffix.lower())
    true_format = img.format if claimed and img.format and img.format != claimed else None
    converted_from = None if img.mode == "RGB" else img.mode
    try:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency must go through RGBA (PIL warns otherwise)
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = center_crop_arr(img, resolution)
    except Exception as exc:  # noqa: BLE001
        return Decoded(None, sha1, "corrupt", f"{type(exc).__name__}: {exc}")
    if arr.shape != (resolution, resolution, 3):
        return Decoded(None, sha1, "corrupt", f"unexpected decoded shape {arr.shape}")
    if channels == 1:
        arr = np.asarray(Image.fromarray(arr).convert("L"))[..., None]
    return Decoded(np.ascontiguousarray(arr, dtype=np.uint8), sha1, None, None, converted_from, true_format)


_WORKER_CFG: tuple[int, int] = (64, 3)


def _init_worker(resolution: int, channels: int) -> None:
    global _WORKER_CFG
    _WORKER_CFG = (resolution, channels)


def _decode_file(path: str) -> Decoded:
    resolution, channels = _WORKER_CFG
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            return Decoded(None, None, "file_too_large", f"{size} bytes > {MAX_FILE_BYTES} (sources.MAX_FILE_BYTES)")
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:  # grew since the stat
            return Decoded(None, None, "file_too_large", f"> {MAX_FILE_BYTES} bytes (sources.MAX_FILE_BYTES)")
    except OSError as exc:
        return Decoded(None, None, "unreadable", f"{type(exc).__name__}: {exc}")
    return decode_image_bytes(data, path, resolution, channels)


def imagenet_classes(root: str | os.PathLike) -> list[str]:
    """Class folder names (wnids) under ``root/train``, sorted as torchvision's ImageFolder does."""
    train = Path(root).expanduser() / "train"
    # the whole layout is checked before any decoding (a missing val/ must not wait for train's decode)
    for split_dir in _IMAGENET_DIRS.values():
        if not (Path(root).expanduser() / split_dir).is_dir():
            raise DataSourceError(f"data.imagenet_dir {root}: no {split_dir}/ folder (expected ImageFolder layout "
                                  f"train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataSourceError(f"{train}: no class folders")
    return classes


def list_imagenet_split(root: str | os.PathLike, split: str, classes: list[str],
                        refused: list[str] | None = None) -> tuple[list[tuple[str, int]], int]:
    """(path, class_index) for every non-hidden file of a split in ImageFolder order; also the count of
    files in class folders unknown to train/ (they are skipped).

    Symlinks (files or class folders) that lead outside the split's folder are not followed: their paths are
    appended to ``refused`` (counted as ``symlink_outside`` in report.json).
    """
    folder = Path(root).expanduser() / _IMAGENET_DIRS[split]
    if not folder.is_dir():
        raise DataSourceError(f"data.imagenet_dir {root}: no {_IMAGENET_DIRS[split]}/ folder for split '{split}'")
    tree = folder.resolve()  # the split's real folder (it may itself be a link to another disk)
    refused = [] if refused is None else refused

    def inside(p: Path, parent: Path) -> bool:
        if not p.is_symlink() and p.parent == parent:
            return True  # a plain entry of a folder already checked: no resolve() per file
        real = p.resolve()
        ok = real == tree or tree in real.parents
        if not ok:
            refused.append(str(p))
        return ok

    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, int]] = []
    unknown = 0
    for cdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not inside(cdir, folder):
            continue
        files = sorted(f for f in cdir.rglob("*") if f.is_file() and not f.name.startswith(".") and inside(f, cdir))
        if cdir.name not in index:
            unknown += len(files)
            continue
        items.extend((str(f), index[cdir.name]) for f in files)
    return items, unknown


def manifest_path(path: str) -> str:
    """A source path as stored in manifest.parquet: itself when it is valid UTF-8, else
    ``hex:<its raw bytes>`` (lossless; :func:`manifest_path_to_fs` turns it back into the file name)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as surrogates
        return MANIFEST_HEX_PREFIX + os.fsencode(path).hex()


def manifest_path_to_fs(stored: str) -> str | bytes:
    """Inverse of :func:`manifest_path`: the path, or the raw bytes of a non-UTF-8 one."""
    return bytes.fromhex(stored[len(MANIFEST_HEX_PREFIX):]) if stored.startswith(MANIFEST_HEX_PREFIX) else stored


def stratified_head(items: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """The first ``n`` items taken round-robin over classes, back in ImageFolder order.

    A plain ``items[:n]`` would hold one or two classes only, since ImageFolder order is by class.
    """
    if n >= len(items):
        return items
    by_class: dict[int, list[int]] = {}
    for i, (_, c) in enumerate(items):
        by_class.setdefault(c, []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                if len(chosen) == n:
                    break
        depth += 1
    return [items[i] for i in sorted(chosen)]


def _decoded_stream(paths: list[str], resolution: int, channels: int, num_workers: int,
                    chunk: int) -> Iterator[Decoded]:
    if num_workers <= 0 or len(paths) < 2:
        _init_worker(resolution, channels)
        yield from map(_decode_file, paths)
        return
    # fork (as torch's DataLoader does): workers start at once. spawn would re-run the stage's
    # __main__ module (torch, pandas imports) in every worker: seconds each. Workers touch only
    # PIL / numpy / hashlib, none of the parent's threads' state.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(resolution, channels)) as pool:
        yield from pool.imap(_decode_file, paths, chunksize=chunk)


def _shrink_npy(path: Path, n_rows: int, shape_tail: tuple[int, ...]) -> None:
    """Make an ``open_memmap`` file hold only its first ``n_rows`` (skipped files leave the tail unused)."""
    full = np.load(path, mmap_mode="r")
    if full.shape[0] == n_rows:
        return
    dtype = full.dtype
    old_header = _npy_header_len(full.shape, dtype)
    new_header = _npy_header_len((n_rows, *shape_tail), dtype)
    del full
    if old_header == new_header:
        # Same header size: rewrite it in place and cut the file, no copy of the data.
        with open(path, "r+b") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": (n_rows, *shape_tail)})
            f.truncate(new_header + n_rows * int(np.prod(shape_tail)) * dtype.itemsize)
        return
    src = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".shrink.npy")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n_rows, *shape_tail))
    step = 4096
    for i in range(0, n_rows, step):
        dst[i:i + step] = src[i:i + step]
    dst.flush()
    del src, dst
    os.replace(tmp, path)


def _npy_header_len(shape: tuple[int, ...], dtype: np.dtype) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.tell()


def write_imagenet_split(params: Params, split: str, images_path: Path, classes: list[str]) -> SplitResult:
    """Decode a split of the ImageFolder with a process pool into ``images_path`` (a memmapped .npy)."""
    root = params.data.imagenet_dir
    refused: list[str] = []
    items, unknown = list_imagenet_split(root, split, classes, refused)
    listed = len(items) + unknown + len(refused)
    if params.data.max_per_split is not None:
        items = stratified_head(items, params.data.max_per_split)
    res, channels = params.data.resolution, params.data.channels
    paths = [p for p, _ in items]
    # Written row by row into a memmap, so memory stays bounded for the 1.28M-image train split.
    out = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8,
                                    shape=(max(len(items), 1), res, res, channels))
    labels: list[int] = []
    src_paths: list[str] = []
    sha1s: list[str] = []
    skipped: dict[str, int] = {"unknown_class": unknown} if unknown else {}
    if refused:
        skipped["symlink_outside"] = len(refused)
        log.warning("%s: %d symlink(s) leading outside %s not followed", split, len(refused), root)
    skipped_files: list[dict[str, str]] = [{"path": manifest_path(p), "reason": "symlink_outside", "error": ""}
                                           for p in refused[:MAX_LISTED_SKIPS]]
    non_utf8: list[str] = []
    converted: dict[str, int] = {}
    mismatched: dict[str, int] = {}
    workers = min(params.prepare.num_workers, os.cpu_count() or 1)
    chunk = max(1, min(64, len(paths) // max(1, 4 * max(workers, 1))))
    n = 0
    stream = _decoded_stream(paths, res, channels, workers, chunk)
    for (path, cls), dec in tqdm(zip(items, stream), total=len(items), desc=f"decode {split}",
                                 unit="img", disable=None):
        if dec.image is None:
            skipped[dec.reason] = skipped.get(dec.reason, 0) + 1
            if len(skipped_files) < MAX_LISTED_SKIPS:
                skipped_files.append({"path": manifest_path(path), "reason": dec.reason, "error": dec.error or ""})
            continue
        out[n] = dec.image
        n += 1
        if n % params.prepare.shard_size == 0:
            out.flush()  # bound dirty pages held in memory
        labels.append(cls)
        stored = manifest_path(path)
        if stored != path:
            non_utf8.append(stored)
        src_paths.append(stored)
        sha1s.append(dec.sha1)
        if dec.converted_from:
            converted[dec.converted_from] = converted.get(dec.converted_from, 0) + 1
        if dec.true_format:
            mismatched[dec.true_format] = mismatched.get(dec.true_format, 0) + 1
    out.flush()
    del out
    _shrink_npy(images_path, n, (res, res, channels))
    if skipped:
        log.warning("%s: skipped %d file(s): %s", split, sum(skipped.values()), skipped)
    if non_utf8:
        log.warning("%s: %d file name(s) are not UTF-8; kept, stored in manifest.parquet as %s<hex bytes>",
                    split, len(non_utf8), MANIFEST_HEX_PREFIX)
    report = {"listed": listed, "selected": len(items), "decoded": n,
              "converted": sum(converted.values()), "converted_by_mode": converted,
              "extension_mismatch": sum(mismatched.values()), "extension_mismatch_by_format": mismatched,
              "skipped": skipped, "skipped_files": skipped_files,
              "non_utf8_names": len(non_utf8), "non_utf8_files": non_utf8[:MAX_LISTED_SKIPS]}
    return SplitResult(split, np.asarray(labels, dtype=np.int64), src_paths, sha1s, report)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def source_classes(params: Params) -> list[str]:
    if params.data.source == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    return imagenet_classes(params.data.imagenet_dir)


def write_split(params: Params, split: str, images_path: Path, classes: list[str]) -> SplitResult:
    """Write one split of the configured source to ``images_path``."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}': allowed {', '.join(SPLITS)}")
    if params.data.source == "fashion_mnist":
        return write_fashion_mnist_split(params, split, images_path)
    return write_imagenet_split(params, split, images_path, classes)
