"""Generative metrics (FID, KID, precision/recall, IS) through torch-fidelity.

Two feature spaces:

- **Inception** (``inception-v3-compat``, torch-fidelity's port of the TF Inception that the ADM
  evaluator uses). Offline clusters pass a local weights file (``evaluate.feature_extractor_weights_path``);
  without one the file from torch's hub cache is used; a download is tried only when asked
  (``evaluate.download_weights: true`` or ``MTDIFF_ALLOW_DOWNLOAD=1``), else Inception is skipped.
  When none of that works the Inception metrics are skipped and the reason is returned.
- **Domain** features: any module with ``features(x)`` / ``forward(x) -> logits`` on float
  ``(B, 1, H, W)`` in ``[-1, 1]`` (the project's Fashion-MNIST encoder) is registered as a
  torch-fidelity feature extractor with :func:`register_module_extractor`, so the same
  ``calculate_metrics`` computes FID/KID/PR in its feature space.

Features are computed here through torch-fidelity's extractor and batching, and the metrics by
its functions on features (``fid_statistics_to_metric``, ``kid_features_to_metric``,
``prc_features_to_metric``, ``isc_featuresdict_to_metric``): the values are ``calculate_metrics``'s
(FID of fewer images than feature dimensions: the same value by an exact low-rank route,
:func:`fid_from_features`).
torch-fidelity's own cache is off (it unpickles ``.pt`` files, which can run code). The reference
features and FID statistics are cached under ``cache_root`` as ``.npz`` read with
``allow_pickle=False``, named by a SHA-1 of the reference pixels and of the extractor weights
(:func:`ref_cache_path`), so a changed test split or encoder never reuses stale statistics. A weights
file is checked with ``torch.load(weights_only=True)`` before torch-fidelity loads it
(:func:`check_weights_file`). ADM reference batches (``.npz`` with ``mu``, ``sigma``) are compared
with :func:`fid_from_features`.

Metric names carry no sample count (``fid``, ``kid_fmnist_cnn``): runs with different counts share
one column in MLflow's compare view; the evaluate stage records the counts as values of their own.
"""
from __future__ import annotations

import copy
import hashlib
import os
import socket
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset
from torch_fidelity import (KEY_METRIC_F_SCORE, KEY_METRIC_FID, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD,
                            KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                            FeatureExtractorBase, register_feature_extractor)
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import (create_feature_extractor, get_featuresdict_from_dataset,
                                  resolve_feature_layer_for_metric)

from mtdiff.config import ConfigError
from mtdiff.io import save_npz
from mtdiff.utils import get_logger

log = get_logger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_FID_LAYER = "2048"
REF_CACHE_TAG = "features"  # reference cache file suffix (.npz; older torch-fidelity .pt files are never read)
_WEIGHTS_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_SAFE_WEIGHTS_MEMO: set[tuple[str, int, int]] = set()


# -- names ---------------------------------------------------------------------------------------
def metric_name(metric: str, space: str = "") -> str:
    """``metric_name('fid')`` -> 'fid'; ``metric_name('fid', 'fmnist_cnn')`` -> 'fid_fmnist_cnn'."""
    return "_".join(p for p in (metric, space) if p)


# -- inputs --------------------------------------------------------------------------------------
def as_nhwc_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Validate an image set: uint8 (N,H,W) or (N,H,W,C) with C in {1,3}; returns (N,H,W,C)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{what}: expected shape (N,H,W) or (N,H,W,C) with C in 1|3, got {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{what}: empty image set")
    return images


class UInt8Images(Dataset):
    """An image set as torch-fidelity wants it: uint8 (3,H,W) tensors; grayscale repeated to RGB.

    Holds the array as given (a read-only ``np.load(mmap_mode="r")`` slice stays on disk) and
    converts one image per item, so 50k ImageNet images are never copied as a whole.
    """

    def __init__(self, images: np.ndarray):
        self.images = as_nhwc_uint8(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i], copy=True)).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x.contiguous()


def images_sha1(images: np.ndarray, chunk: int = 1024) -> str:
    """SHA-1 over shape and pixels (chunked: no whole-set copy): the identity of a reference set in cache names."""
    images = np.asarray(images)
    h = hashlib.sha1(f"{images.shape}{images.dtype}".encode())
    for start in range(0, len(images), chunk):
        h.update(np.ascontiguousarray(images[start:start + chunk]).tobytes())
    return h.hexdigest()


def module_sha1(module: nn.Module) -> str:
    """SHA-1 over the class name and every state-dict tensor (names, shapes, bytes)."""
    h = hashlib.sha1(type(module).__qualname__.encode())
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BN counters) too
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha1(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHTS_SHA_MEMO:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _WEIGHTS_SHA_MEMO[key] = h.hexdigest()
    return _WEIGHTS_SHA_MEMO[key]


# -- domain feature extractor -------------------------------------------------------------------
class ModuleFeatureExtractor(FeatureExtractorBase):
    """Wraps ``source_module`` (set on the registered subclass) for torch-fidelity.

    Input: uint8 (B,3,H,W) (grayscale repeated) -> channel 0 scaled to [-1,1] -> module.
    Features: 'features' (``module.features``: FID/KID/PR) and 'logits' (``module.forward``: IS).
    """

    source_module: nn.Module

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        # A private copy: torch-fidelity moves it to CUDA and freezes it; the caller's module stays as it was.
        self.net = copy.deepcopy(type(self).source_module).float().eval()

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError(f"expected uint8 (B,3,H,W) images, got {getattr(x, 'shape', x)}")
        z = x[:, :1].float() / 127.5 - 1.0
        out = {}
        if "features" in self.features_list:
            out["features"] = self.net.features(z).float().flatten(1)
        if "logits" in self.features_list:
            out["logits"] = self.net(z).float()
        return tuple(out[k] for k in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)


def register_module_extractor(module: nn.Module, prefix: str = "fmnist_cnn") -> str:
    """Register ``module`` as a torch-fidelity feature extractor; returns the registry name.

    The name embeds a hash of the module's weights, so torch-fidelity's feature cache (keyed by the
    extractor name) never mixes two encoders; registering the same weights twice is a no-op.
    """
    if not (callable(getattr(module, "features", None)) and callable(module)):
        raise TypeError(f"{type(module).__name__}: a domain extractor needs .features(x) and forward(x)")
    name = f"mtdiff-{prefix}-{module_sha1(module)[:12]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        cls = type(f"FeatureExtractor_{prefix}", (ModuleFeatureExtractor,), {"source_module": module})
        register_feature_extractor(name, cls)
    return name


# -- Inception weights --------------------------------------------------------------------------
ALLOW_DOWNLOAD_ENV = "MTDIFF_ALLOW_DOWNLOAD"


def downloads_allowed(allow_download: bool = False) -> bool:
    """Offline by default: a download only when asked (``evaluate.download_weights`` or
    ``MTDIFF_ALLOW_DOWNLOAD=1``), and never under ``MTDIFF_OFFLINE=1``."""
    if os.environ.get("MTDIFF_OFFLINE") == "1":
        return False
    return allow_download or os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"


def inception_weights(path: Optional[str], allow_download: bool = False,
                      timeout_s: float = 20.0) -> tuple[Optional[Path], Optional[str]]:
    """Find the Inception weights: ``(path, None)``, or ``(None, reason)`` when they are unavailable.

    Order: the explicit ``path`` (missing file -> FileNotFoundError: an explicit setting that is wrong
    must not pass silently), torch hub's cache, one download attempt only when :func:`downloads_allowed`.
    ``reason`` is one line saying how to get the weights; a failed download's error goes to the log, not
    into it (it ends up in metrics/evaluate.json).
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"evaluate.feature_extractor_weights_path: no such file {p}")
        return p, None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if cached.is_file():
        return cached, None
    if not downloads_allowed(allow_download):
        return None, (f"Inception weights not local ({cached}); to enable: set "
                      f"evaluate.feature_extractor_weights_path, or allow the download with "
                      f"evaluate.download_weights=true or {ALLOW_DOWNLOAD_ENV}=1")
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout_s)
        cached.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading Inception weights %s -> %s", URL_INCEPTION_V3, cached)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
        return cached, None
    except Exception as exc:  # no network: say so in the log, go on without Inception
        log.warning("Inception weights download from %s failed: %s: %s", URL_INCEPTION_V3, type(exc).__name__, exc)
        return None, (f"Inception weights download failed (see the log); put the file at {cached} or set "
                      f"evaluate.feature_extractor_weights_path")
    finally:
        socket.setdefaulttimeout(old)


# -- metrics ------------------------------------------------------------------------------------
def load_ref_stats(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """ADM reference batch: ``mu`` (D,), ``sigma`` (D,D) as float64."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluate.ref_stats_npz: no such file {path}")
    with np.load(path) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise ValueError(f"evaluate.ref_stats_npz {path}: missing keys {sorted(missing)} (has {z.files})")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"evaluate.ref_stats_npz {path}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D,D)")
    return {"mu": mu, "sigma": sigma}


def kid_subset_size(n: int, m: int) -> int:
    """torch-fidelity's 1000 (ADM, StyleGAN) when both sets have >= 2000 images, else half the smaller set:
    subsets as large as the set would all be the whole set (KID's std over subsets 0, meaningless)."""
    return max(2, min(1000, min(n, m) // 2))


def _tf_kwargs(extractor: str, weights_path: Optional[Path], device: torch.device, batch_size: int) -> dict:
    # torch-fidelity's own cache stays off (it unpickles its .pt files); in-memory sets: no DataLoader
    # workers, PR in memory-bounded chunks
    kw = dict(feature_extractor=extractor, cuda=device.type == "cuda", batch_size=batch_size, cache=False,
              verbose=False, save_cpu_ram=True)
    if weights_path is not None:
        kw["feature_extractor_weights_path"] = str(weights_path)
    return kw


def check_weights_file(path: Path) -> Path:
    """Refuse a weights file that is not a plain tensor state dict.

    torch-fidelity loads ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``,
    which runs any code a pickle carries. Loading it first with ``weights_only=True`` runs none and
    fails on anything but tensors and plain containers; only then is the file handed on.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _SAFE_WEIGHTS_MEMO:
        return path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: not a plain tensor state dict, refusing to load it "
                          f"({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path}: not a plain tensor state dict (got {type(state).__name__}), refusing to load it")
    _SAFE_WEIGHTS_MEMO.add(key)
    return path


def _resolve_weights(extractor: str, weights_path: Optional[str | os.PathLike]) -> Optional[Path]:
    """The weights file torch-fidelity will load, checked. Inception without a path: the hub-cached file
    (:func:`inception_weights`), so that torch-fidelity never unpickles a file unchecked either."""
    if weights_path is None and extractor == INCEPTION:
        weights_path, reason = inception_weights(None)
        if weights_path is None:
            raise FileNotFoundError(reason)
    return check_weights_file(Path(weights_path)) if weights_path is not None else None


def _layer(extractor: str, metric: str) -> str:
    return resolve_feature_layer_for_metric(metric, feature_extractor=extractor)


def _fid_layer(extractor: str) -> str:
    return _layer(extractor, "fid")


def _extract(images: np.ndarray, layers: list[str], kw: dict) -> dict[str, torch.Tensor]:
    """Features of an image set at ``layers`` through torch-fidelity's extractor and batching
    (what ``calculate_metrics`` does, without its pickle cache)."""
    fe = create_feature_extractor(kw["feature_extractor"], sorted(set(layers)), **kw)
    feats = get_featuresdict_from_dataset(UInt8Images(images), fe, kw["batch_size"], kw["cuda"], True, False)
    return {k: feats[k] for k in layers}


def _stats(features: torch.Tensor) -> dict[str, np.ndarray]:
    return fid_features_to_statistics(features)


def fid_from_features(features: torch.Tensor, ref_stats: dict[str, np.ndarray]) -> float:
    """FID of a feature set against reference statistics: torch-fidelity's ``fid_statistics_to_metric``,
    except when the set has fewer images than feature dimensions. Its covariance S1 = A^T A / (n-1)
    (A: the centred features) then has rank < n, and the nonzero eigenvalues of S1 S2 are those of the
    symmetric n x n matrix A S2 A^T / (n-1): the same trace term, without the general eigensolver on
    the D x D product (2048: 10-30 s on 2 CPU cores, for every few-sample evaluation)."""
    mine = _stats(features)
    n, dim = features.shape
    if n > dim:  # torch-fidelity asserts equal dtypes (an ADM batch is float64, its own mu float32)
        mine = {k: np.asarray(v, np.asarray(ref_stats[k]).dtype) for k, v in mine.items()}
        return float(fid_statistics_to_metric(mine, ref_stats, False)[KEY_METRIC_FID])
    mu1, sigma1 = np.asarray(mine["mu"], np.float64), np.asarray(mine["sigma"], np.float64)
    mu2, sigma2 = np.asarray(ref_stats["mu"], np.float64), np.asarray(ref_stats["sigma"], np.float64)
    a = features.double().numpy()
    a = a - a.mean(axis=0)
    small = a @ sigma2 @ a.T / max(n - 1, 1)
    # PSD up to round-off: torch-fidelity's sqrt of a tiny negative eigenvalue is imaginary, real part 0
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def ref_cache_path(cache_root: str | os.PathLike, reference: np.ndarray, extractor: str,
                   weights_path: Optional[Path]) -> Path:
    """``ref-{sha1(pixels)[:12]}[-w{sha1(weights)[:8]}]-{extractor}-features.npz`` under ``cache_root``.

    Registered module extractors carry their weight hash in their name; Inception's name does not,
    so the weights file's hash goes in too (a different weights file never reuses cached features).
    """
    weights = f"-w{_file_sha1(weights_path)[:8]}" if weights_path is not None else ""
    return Path(cache_root) / f"ref-{images_sha1(reference)[:12]}{weights}-{extractor}-{REF_CACHE_TAG}.npz"


def _load_ref_cache(path: Path, layers: list[str], n: int) -> Optional[dict[str, Any]]:
    """Cached reference features (and FID statistics) or None. ``allow_pickle=False``: a file that holds
    anything but plain arrays is not read (and is then replaced), so loading it can run no code."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats = {k: np.array(z[f"features_{k}"]) for k in layers}
            mu, sigma = np.array(z["mu"]), np.array(z["sigma"])
    except Exception as exc:
        log.warning("%s: unusable reference cache (%s: %s); recomputing it", path, type(exc).__name__, exc)
        return None
    dim = feats[layers[0]].shape[-1]  # layers[0] is the FID layer
    if not all(f.ndim == 2 and len(f) == n and f.dtype.kind == "f" for f in feats.values()) \
            or mu.shape != (dim,) or sigma.shape != (dim, dim):
        log.warning("%s: reference cache does not fit %d images; recomputing it", path, n)
        return None
    return {"features": {k: torch.from_numpy(v) for k, v in feats.items()}, "stats": {"mu": mu, "sigma": sigma}}


def reference_features(reference: np.ndarray, extractor: str, weights_path: Optional[Path],
                       cache_root: str | os.PathLike, kw: dict) -> dict[str, Any]:
    """``{"features": {layer: (m, D) tensor}, "stats": {"mu", "sigma"}}`` of the reference set for
    FID (first layer), KID and PR, from ``cache_root`` (``.npz``, see :func:`ref_cache_path`) or
    computed and stored there. The statistics are torch-fidelity's (mu float32, sigma float64)."""
    fid_layer = _layer(extractor, "fid")
    layers = [fid_layer] + sorted({_layer(extractor, m) for m in ("kid", "prc")} - {fid_layer})
    path = ref_cache_path(cache_root, reference, extractor, weights_path)
    cached = _load_ref_cache(path, layers, len(reference))
    if cached is not None:
        return cached
    feats = _extract(reference, layers, kw)
    stats = _stats(feats[fid_layer])
    save_npz(path, mu=stats["mu"], sigma=stats["sigma"],
             **{f"features_{k}": v.numpy() for k, v in feats.items()})
    return {"features": feats, "stats": stats}


def reference_stats(reference: np.ndarray, extractor: str = INCEPTION, *,
                    weights_path: Optional[str | os.PathLike] = None,
                    cache_root: str | os.PathLike, device: torch.device = torch.device("cpu"),
                    batch_size: int = 64) -> dict[str, np.ndarray]:
    """FID statistics (mu, sigma) of an image set in ``extractor``'s space, through the reference cache."""
    reference = as_nhwc_uint8(reference, "reference")
    weights = _resolve_weights(extractor, weights_path)
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    stats = reference_features(reference, extractor, weights, cache_root,
                               _tf_kwargs(extractor, weights, device, batch_size))["stats"]
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}


def write_ref_stats_npz(path: str | os.PathLike, reference: np.ndarray, extractor: str = INCEPTION,
                        **kwargs) -> Path:
    """Write an ADM-style reference ``.npz`` (mu, sigma) for ``reference``; kwargs as :func:`reference_stats`."""
    stats = reference_stats(reference, extractor, **kwargs)
    return save_npz(path, mu=stats["mu"], sigma=stats["sigma"])


def fidelity_metrics(samples: np.ndarray, reference: Optional[np.ndarray], *, extractor: str = INCEPTION,
                     space: str = "", weights_path: Optional[str | os.PathLike] = None,
                     cache_root: str | os.PathLike, device: torch.device = torch.device("cpu"),
                     batch_size: int = 64, isc: bool = False, ref_stats_npz: Optional[str | os.PathLike] = None,
                     kid_subsets: int = 100, seed: int = 2020) -> dict[str, float]:
    """FID / KID / precision / recall (vs ``reference``), IS (``isc``) and FID vs an ADM ``ref_stats_npz``.

    ``samples`` and ``reference`` are uint8 (N,H,W[,C]) sets. Names: ``{metric}[_{space}]``,
    e.g. ``fid``, ``kid_std_fmnist_cnn``, ``fid_adm_ref``.
    The values are torch-fidelity's ``calculate_metrics`` ones: the same extractor, batching and
    metric functions, on features computed here; the samples' features are computed once, in memory.
    """
    samples = as_nhwc_uint8(samples, "samples")
    n = len(samples)
    if reference is not None:
        reference = as_nhwc_uint8(reference, "reference")
        if reference.shape[1:3] != samples.shape[1:3]:
            raise ValueError(f"samples {samples.shape[1:3]} and reference {reference.shape[1:3]} differ in size")
    ref_adm = load_ref_stats(ref_stats_npz) if ref_stats_npz else None
    metrics = ([*("fid", "kid", "prc")] if reference is not None else []) + (["isc"] if isc else []) \
        + (["fid"] if ref_adm is not None else [])
    if not metrics:
        return {}
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    weights = _resolve_weights(extractor, weights_path)
    kw = _tf_kwargs(extractor, weights, device, batch_size)
    kw["rng_seed"] = seed
    layer = {m: _layer(extractor, m) for m in metrics}
    feats = _extract(samples, sorted(set(layer.values())), kw)
    out: dict[str, float] = {}
    name = lambda m: metric_name(m, space)  # noqa: E731

    if reference is not None:
        m = len(reference)
        ref = reference_features(reference, extractor, weights, cache_root, kw)
        res = {KEY_METRIC_FID: fid_from_features(feats[layer["fid"]], ref["stats"])}
        res.update(kid_features_to_metric(feats[layer["kid"]], ref["features"][layer["kid"]], **kw,
                                          kid_subsets=kid_subsets, kid_subset_size=kid_subset_size(n, m)))
        res.update(prc_features_to_metric(feats[layer["prc"]], ref["features"][layer["prc"]], **kw,
                                          prc_neighborhood=min(3, n - 1, m - 1)))
        out[name("fid")] = float(res[KEY_METRIC_FID])
        out[name("kid")] = float(res[KEY_METRIC_KID_MEAN])
        out[name("kid_std")] = float(res[KEY_METRIC_KID_STD])
        out[name("precision")] = float(res[KEY_METRIC_PRECISION])
        out[name("recall")] = float(res[KEY_METRIC_RECALL])
        out[name("f_score")] = float(res[KEY_METRIC_F_SCORE])
    if isc:
        res = isc_featuresdict_to_metric(feats, layer["isc"], **kw, isc_splits=min(10, n))
        out[name("isc")] = float(res[KEY_METRIC_ISC_MEAN])
        out[name("isc_std")] = float(res[KEY_METRIC_ISC_STD])
    if ref_adm is not None:
        dim = feats[layer["fid"]].shape[1]
        if (dim,) != ref_adm["mu"].shape:
            raise ValueError(f"evaluate.ref_stats_npz {ref_stats_npz}: dimension {ref_adm['mu'].shape[0]} does not "
                             f"match the {extractor} feature layer {layer['fid']} ({dim})")
        out[name("fid_adm_ref")] = fid_from_features(feats[layer["fid"]], ref_adm)
    for k, v in out.items():
        log.info("%s = %.6g", k, v)
    return out
