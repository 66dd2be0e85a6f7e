"""MT-Diffusion's network: one DiT backbone, a noise head and one head + encoder per enabled task.

``model(z_t, t)`` runs the reverse-process network (shared ``h_t`` and heads ``D_i``, M5);
``model.aggregate(task_inputs)`` is the encoder side ``A(X) = sum_i E_i(x_i)`` (M2) that the
diffusion code feeds into the forward process (M1/M3) and the posterior (M4).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from mtdiff.models.dit import TIME_FREQ_DIM, DiTBackbone
from mtdiff.models.tasks import (IdentityEncoder, ImageHead, LabelEncoder, PooledHead,
                                 RepresentationEncoder)

TASKS = ("label", "representation", "masked", "transition")
LATENT_CHANNELS = 4  # SD-VAE latent channels
LATENT_DOWNSAMPLE = 8  # SD-VAE spatial downsampling


class MTDiT(nn.Module):
    """DiT backbone + eps head + per-task heads (``D_i``) and encoders (``E_i``).

    ``input_shape`` is (C, H, W) of the diffusion space; ``tasks`` a subset of
    ``("label", "representation", "masked", "transition")``.
    """

    def __init__(self, input_shape: Sequence[int], *, patch_size: int, depth: int, hidden_size: int,
                 num_heads: int, mlp_ratio: float = 4.0, head_hidden: int = 256,
                 tasks: Sequence[str] = (), num_classes: Optional[int] = None,
                 repr_dim: Optional[int] = None):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
        c, h, w = (int(v) for v in input_shape)
        self.input_shape = (c, h, w)
        self.in_channels = c
        self.input_size = h if h == w else (h, w)
        # Fixed order (the config's), so outputs and state_dict keys never depend on input order.
        self.task_names: list[str] = [t for t in TASKS if t in tasks]
        self.num_classes = num_classes
        self.repr_dim = repr_dim
        self.head_hidden = head_hidden

        self.backbone = DiTBackbone((h, w), c, patch_size, depth, hidden_size, num_heads, mlp_ratio)
        grid = self.backbone.grid
        self.eps_head = ImageHead(hidden_size, patch_size, c, grid)
        self.heads = nn.ModuleDict()
        self.encoders = nn.ModuleDict()
        for name in self.task_names:
            if name == "label":
                if not num_classes:
                    raise ValueError("tasks.label is enabled but num_classes was not given")
                self.encoders[name] = LabelEncoder(num_classes, self.input_shape)
                self.heads[name] = PooledHead(hidden_size, head_hidden, num_classes, zero_init_out=True)
            elif name == "representation":
                if not repr_dim:
                    raise ValueError("tasks.representation is enabled but repr_dim was not given "
                                     "(read it from representations/meta.json 'dim')")
                self.encoders[name] = RepresentationEncoder(repr_dim, self.input_shape)
                self.heads[name] = PooledHead(hidden_size, head_hidden, repr_dim)
            else:  # masked / transition: image-valued task data already in the diffusion space
                self.encoders[name] = IdentityEncoder(name, self.input_shape)
                self.heads[name] = ImageHead(hidden_size, patch_size, c, grid)

    # -- reverse-process network ---------------------------------------------------------------
    def features(self, z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared ``h_t`` (B, N, D) and conditioning vector ``c`` (B, D)."""
        if z_t.ndim != 4 or tuple(z_t.shape[1:]) != self.input_shape:
            raise ValueError(f"z_t: expected shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(z_t.shape)}")
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        elif t.ndim != 1 or t.shape[0] != z_t.shape[0]:
            raise ValueError(f"t: expected shape ({z_t.shape[0]},) or a scalar, got {tuple(t.shape)}")
        # t is 1-based int64 in [1, T]; the sinusoidal embedding takes it as a float.
        return self.backbone(z_t, t)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"eps": (B,C,H,W), <task>: prediction}`` for every enabled task (M5's heads)."""
        h, c = self.features(z_t, t)
        out = {"eps": self.eps_head(h, c)}
        for name in self.task_names:
            out[name] = self.heads[name](h, c)
        return out

    # -- forward-process encoders ----------------------------------------------------------------
    def encode(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``E_name(x)`` -> (B, C, H, W)."""
        if name not in self.encoders:
            raise KeyError(f"task '{name}' is not enabled in this model (enabled: {self.task_names})")
        return self.encoders[name](x)

    def aggregate(self, task_inputs: Mapping[str, Optional[torch.Tensor]], *,
                  batch_size: Optional[int] = None, like: Optional[torch.Tensor] = None,
                  strict: bool = False) -> torch.Tensor:
        """(M2) ``A = sum_i E_i(x_i)`` over the enabled tasks present in ``task_inputs``.

        Keys that are not enabled tasks (or map to ``None``) are skipped, so a training batch dict
        can be passed as is; ``strict=True`` makes a key that is not an enabled task an error.
        With nothing to aggregate returns zeros (B, C, H, W): B from ``batch_size``, ``like`` or any
        tensor in ``task_inputs``; dtype/device from ``like``, else the model's parameters.
        """
        if strict:
            extra = [k for k in task_inputs if k not in self.encoders]
            if extra:
                raise KeyError(f"aggregate: {extra} are not enabled tasks (enabled: {self.task_names})")
        total: Optional[torch.Tensor] = None
        for name in self.task_names:
            x = task_inputs.get(name)
            if x is None:
                continue
            e = self.encoders[name](x)
            total = e if total is None else total + e
        if total is not None:
            if batch_size is not None and total.shape[0] != batch_size:
                raise ValueError(f"aggregate: task inputs have batch size {total.shape[0]}, "
                                 f"batch_size={batch_size} was asked for")
            if like is not None:
                total = total.to(like.dtype)
            return total
        if batch_size is None:
            if like is not None:
                batch_size = like.shape[0]
            else:
                tensors = [v for v in task_inputs.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
                if not tensors:
                    raise ValueError("aggregate: no task inputs to infer the batch size from; "
                                     "pass batch_size= or like=")
                batch_size = tensors[0].shape[0]
        ref = like if like is not None else next(self.parameters())
        return torch.zeros(batch_size, *self.input_shape, dtype=ref.dtype, device=ref.device)


def input_shape_from_params(params) -> tuple[int, int, int]:
    """(C, H, W) of the diffusion space: the image (pixel mode) or its SD-VAE latent (latent mode)."""
    res, ch = params.data.resolution, params.data.channels
    if params.diffusion.mode == "pixel":
        return (ch, res, res)
    if res % LATENT_DOWNSAMPLE:
        raise ValueError(f"data.resolution {res} must be divisible by {LATENT_DOWNSAMPLE} in latent mode")
    return (LATENT_CHANNELS, res // LATENT_DOWNSAMPLE, res // LATENT_DOWNSAMPLE)


def build_model(params, repr_dim: Optional[int], num_classes: int, *,
                input_shape: Optional[Sequence[int]] = None) -> MTDiT:
    """MTDiT from ``params.model`` (sizes), ``params.tasks.enabled`` and the data shape.

    ``input_shape`` overrides the (C, H, W) derived from params (e.g. from latents ``meta.json``).
    """
    depth, hidden, heads = params.model.dims
    shape = tuple(input_shape) if input_shape is not None else input_shape_from_params(params)
    if shape[1] % params.model.patch_size or shape[2] % params.model.patch_size:
        raise ValueError(f"model.patch_size {params.model.patch_size} must divide the input size "
                         f"{shape[1]}x{shape[2]}")
    return MTDiT(shape, patch_size=params.model.patch_size, depth=depth, hidden_size=hidden,
                 num_heads=heads, mlp_ratio=params.model.mlp_ratio, head_hidden=params.model.head_hidden,
                 tasks=params.tasks.enabled, num_classes=num_classes, repr_dim=repr_dim)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: MTDiT) -> float:
    """Analytic forward FLOPs per image (multiply-add = 2 FLOPs) of backbone + all heads.

    Counts the matmul/conv work (patch embed, t-MLP, per block: adaLN, qkv, attention scores and
    A@V, proj, MLP; each image head's adaLN + linear; the pooled heads' MLPs). Norms, activations,
    softmax and elementwise ops are ignored, as in DiT's Gflops and FlopCounterMode. Encoders
    (``aggregate``) are not part of the forward pass and are not counted.
    """
    bb = model.backbone
    c = model.in_channels
    p = bb.patch_size
    n = bb.num_tokens
    d = bb.hidden_size
    mlp_hidden = int(d * bb.mlp_ratio)

    flops = 2 * n * (c * p * p) * d  # patch embed conv
    flops += 2 * (TIME_FREQ_DIM * d + d * d)  # timestep MLP
    per_block = (2 * d * 6 * d  # adaLN modulation
                 + 2 * n * d * 3 * d  # qkv
                 + 2 * n * n * d  # attention scores Q K^T
                 + 2 * n * n * d  # attention A V
                 + 2 * n * d * d  # output projection
                 + 2 * 2 * n * d * mlp_hidden)  # MLP fc1 + fc2
    flops += bb.depth * per_block
    image_head = 2 * d * 2 * d + 2 * n * d * (p * p * c)  # adaLN + linear to patch pixels
    flops += image_head  # eps head
    for name in model.task_names:
        head = model.heads[name]
        if isinstance(head, ImageHead):
            flops += image_head
        else:
            flops += 2 * (d * head.fc1.out_features + head.fc1.out_features * head.fc2.out_features)
    return float(flops)
