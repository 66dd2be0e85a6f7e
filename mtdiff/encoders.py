"""Pretrained / trained encoders used by the data stages.

- :class:`FashionCNN`: a small conv net trained by the ``representations`` stage on Fashion-MNIST;
  its ``features`` are the representation modality ``x_i`` of the joint image-representation task.
- :func:`load_vae` / :func:`encode_images_vae` / :func:`decode_latents_vae`: the SD-VAE
  (diffusers ``AutoencoderKL``) that maps images to ``z_0`` in latent mode.
- :func:`load_image_encoder`: DINOv2 / CLIP image encoders via timm (ImageNet representations).
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_IMAGE_ENCODERS = {"dinov2": "vit_base_patch14_dinov2.lvd142m",
                          "clip": "vit_base_patch16_clip_224.openai"}
# stabilityai/sd-vae-ft-ema's config.json (the SD v1 VAE: 8x downsampling, 4 latent channels): the
# architecture that random-weight benchmarks and tests build (AutoencoderKL(**SD_VAE_CONFIG))
SD_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 256,
}


# --------------------------------------------------------------------------------------------
# Fashion-MNIST encoder
# --------------------------------------------------------------------------------------------
def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _FeatureClassifier(nn.Module):
    """``body`` -> ``proj`` = ``features`` (B, dim) -> ``head`` = logits: the interface of both
    Fashion-MNIST networks (FID reads ``features``, accuracy ``forward``)."""

    body: nn.Module
    proj: nn.Module
    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FashionCNN(_FeatureClassifier):
    """Three conv blocks (BN, ReLU, pooling) -> ``features`` (B, dim) -> linear classifier.

    Input: float (B, C, H, W) in [-1, 1]. ``features`` end in a BatchNorm1d, so in eval mode each
    feature is roughly zero-mean unit-variance over the data: a well-scaled regression target for
    the representation head (M5's MSE term).
    """

    def __init__(self, in_channels: int = 1, dim: int = 128, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.config = {"in_channels": in_channels, "dim": dim, "num_classes": num_classes, "width": width}
        w = width
        self.body = nn.Sequential(
            _conv_block(in_channels, w), nn.MaxPool2d(2),          # 28 -> 14
            _conv_block(w, 2 * w), nn.MaxPool2d(2),                # 14 -> 7
            _conv_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(3),    # 7 -> 3 (any input size)
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 9, dim), nn.BatchNorm1d(dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(dim, num_classes))


class FashionEvalNet(_FeatureClassifier):
    """The evaluation network: a second feature space for FID that no task trains on.

    The representation task regresses FashionCNN's features, so FID in those features could be won
    by fitting them. This net differs in architecture (LeNet-style 5x5 convolutions, no BatchNorm
    in the body, a wider 256-d LayerNorm'd feature) and is trained from another seed; it only ever
    scores samples. Same interface as FashionCNN: ``features`` (B, dim) and ``forward`` -> logits.
    """

    def __init__(self, in_channels: int = 1, dim: int = 256, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.config = {"in_channels": in_channels, "dim": dim, "num_classes": num_classes, "width": width}
        w = width  # 16, not 32: the representations stage is inside make run's time budget
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),   # 28 -> 14
            nn.Conv2d(w, 2 * w, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),         # 14 -> 7
            nn.AdaptiveAvgPool2d(4),                                                           # 7 -> 4
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, dim), nn.LayerNorm(dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(dim, num_classes))


FMNIST_NETS = {"FashionCNN": FashionCNN, "FashionEvalNet": FashionEvalNet}  # checkpoint "arch" -> class
EVAL_NET_FILE = "eval_net.pt"  # the representations stage's evaluation network (evaluate's second FID space)


def images_to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the input convention of FashionCNN and the VAE)."""
    # np.array copies: memmapped inputs are read-only, which torch warns about.
    x = torch.from_numpy(np.array(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_fmnist_encoder(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Atomic checkpoint: {"state_dict", "config", "arch", **extra} (plain types only, so weights_only loads it)."""
    from mtdiff.io import save_torch

    return save_torch(path, {"state_dict": model.state_dict(), "config": dict(model.config),
                             "arch": type(model).__name__, **extra})


def load_fmnist_encoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load ``encoder.pt`` / ``eval_net.pt`` of the representations stage (weights_only), in eval mode
    (a checkpoint without ``arch`` is a FashionCNN)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Fashion-MNIST encoder checkpoint (run `dvc repro representations` first)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a FashionCNN checkpoint (want keys state_dict, config)")
    arch = ckpt.get("arch", "FashionCNN")
    if arch not in FMNIST_NETS:
        raise ValueError(f"{path}: unknown network {arch!r} (known: {', '.join(FMNIST_NETS)})")
    model = FMNIST_NETS[arch](**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


# --------------------------------------------------------------------------------------------
# SD-VAE (latent mode)
# --------------------------------------------------------------------------------------------
def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hub host does not answer within ``timeout`` seconds.

    Without this probe a machine with no route to the Hub waits out the HTTP client's retries
    (close to a minute) before falling back to the local cache or failing.
    """
    if _offline():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; a direct probe would say nothing
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(force: bool) -> Iterator[None]:
    """Put huggingface_hub in offline mode (cache only, fail fast) for the duration, when ``force``."""
    if not force:
        yield
        return
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def load_vae(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """diffusers ``AutoencoderKL`` from a hub name or a local folder (``config.json`` + weights,
    or a pipeline folder with a ``vae/`` subfolder), frozen, in eval mode on ``device``."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path).expanduser()
    kwargs: dict[str, Any] = {}
    if local.exists():
        if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
            kwargs["subfolder"] = "vae"
        source, local_only = str(local), True
    else:
        source, local_only = name_or_path, not _hub_reachable()  # unreachable: the local cache or a fast error
    try:
        vae = AutoencoderKL.from_pretrained(source, local_files_only=local_only, torch_dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, file and format errors all need the same advice
        where = "offline (Hub unreachable or HF_HUB_OFFLINE=1; local cache only)" if local_only and not local.exists() \
            else "from the hub"
        raise RuntimeError(
            f"latents.vae: cannot load AutoencoderKL '{name_or_path}' {where}: {type(exc).__name__}: {exc}. "
            f"On a machine with network run `huggingface-cli download {name_or_path} --local-dir <dir>` "
            f"and set latents.vae=<dir>") from exc
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_images_vae(vae, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC batch -> (posterior mean, posterior std), float32 CPU, unscaled.

    Pixels go to [-1, 1]; grayscale is repeated to the 3 channels the SD-VAE expects.
    """
    x = images_to_unit_range(images)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    param = next(vae.parameters())
    dist = vae.encode(x.to(param.device, param.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


@torch.no_grad()
def decode_latents_vae(vae, latents: torch.Tensor, scale: float, channels: int = 3) -> np.ndarray:
    """Scaled latents (as stored by the latents stage) -> uint8 NHWC images (``channels`` 1 averages RGB)."""
    param = next(vae.parameters())
    x = vae.decode(latents.to(param.device, param.dtype) / scale).sample.float()
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------------------
# DINOv2 / CLIP via timm
# --------------------------------------------------------------------------------------------
def _create_timm_model(kind: str, name: str | None, weights_path: str | None, model_kwargs: dict) -> nn.Module:
    import timm

    if weights_path:
        path = Path(weights_path).expanduser()
        if path.is_dir():
            # A timm Hub-format folder (config.json + model.safetensors), e.g. from
            # `huggingface-cli download timm/vit_base_patch14_dinov2.lvd142m --local-dir <dir>`.
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"representations.weights_path {path}: folder without config.json "
                                        f"(want a timm Hub-format folder, or a weights file)")
            return timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0, **model_kwargs)
        if not path.is_file():
            raise FileNotFoundError(f"representations.weights_path {path}: no such file or folder")
        # pretrained=True with a file overlay runs timm's checkpoint filter (original DINOv2 / OpenAI
        # key layouts, pos-embed resampling) and a strict load, which a bare load_state_dict would not.
        return timm.create_model(name, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(path)}, **model_kwargs)
    try:
        with _hub_offline(not _hub_reachable()):  # unreachable: the local HF cache or a fast error
            return timm.create_model(name, pretrained=True, num_classes=0, **model_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            f"representations: cannot fetch {kind} weights '{name}' ({type(exc).__name__}: {exc}); offline, set "
            f"representations.weights_path to a weights file or a timm Hub-format folder "
            f"(`huggingface-cli download timm/{name} --local-dir <dir>` on a machine with network)") from exc


def _input_size(model: nn.Module, cfg: dict[str, Any]) -> tuple[int, int]:
    """The (H, W) the model was built for (an ``img_size`` override included); a ViT's must be whole
    patches: at 256 px a patch-14 model would silently drop the last 4 pixel rows and columns."""
    size = tuple(cfg["input_size"][1:])
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not getattr(patch_embed, "img_size", None):
        return size
    size, patch = tuple(patch_embed.img_size), tuple(patch_embed.patch_size)
    if any(s % p for s, p in zip(size, patch)):
        raise ValueError(f"representations.image_size {size[0]} is not a multiple of the encoder's patch size "
                         f"{patch[0]} (for patch 14: 224 as REPA, or 252)")
    return size


def load_image_encoder(kind: str, name: str | None = None, weights_path: str | None = None,
                       device: str | torch.device = "cpu", image_size: int | None = None, **model_kwargs: Any
                       ) -> tuple[nn.Module, Callable[[np.ndarray | torch.Tensor], torch.Tensor], int]:
    """A frozen timm DINOv2 / CLIP image encoder -> (model, preprocess, dim).

    ``image_size`` (None: the model's own, 518 for timm's DINOv2) builds the ViT for that input; timm
    resamples the loaded position embeddings to it. ``preprocess`` is :func:`image_preprocess` (the
    model's own mean/std: ImageNet's for DINOv2, OpenAI's for CLIP); ``model(preprocess(x))`` gives
    pooled features (B, dim) (``num_classes=0``: CLS / pooled token, before any projection).
    """
    if kind not in DEFAULT_IMAGE_ENCODERS:
        raise ValueError(f"image encoder kind '{kind}': allowed {', '.join(DEFAULT_IMAGE_ENCODERS)}")
    name = name or DEFAULT_IMAGE_ENCODERS[kind]
    if image_size is not None:
        model_kwargs = {**model_kwargs, "img_size": image_size}
    model = _create_timm_model(kind, name, weights_path, model_kwargs)
    model = model.to(device).eval().requires_grad_(False)
    return model, image_preprocess(model), int(model.num_features)


def image_preprocess(model: nn.Module) -> Callable[[np.ndarray | torch.Tensor], torch.Tensor]:
    """uint8 NHWC -> the timm ``model``'s input: resized (bicubic, antialiased) to its input size, gray
    repeated to RGB, normalised with its own mean/std, on its device and in its dtype."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    size = _input_size(model, cfg)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    param = next(model.parameters())

    def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        x = x.to(param.device).permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return ((x - mean.to(x.device)) / std.to(x.device)).to(param.dtype)

    return preprocess
