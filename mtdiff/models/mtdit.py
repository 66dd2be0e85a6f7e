"""MT-Diffusion's network: one DiT backbone, a noise head and one head + encoder per enabled task.

``model(z_t, t)`` runs the reverse-process network (shared ``h_t`` and heads ``D_i``, M5);
``model.aggregate(task_inputs)`` is the encoder side ``A(X) = sum_i E_i(x_i)`` (M2) that the
diffusion code feeds into the forward process (M1/M3) and the posterior (M4).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtdiff.models.dit import TIME_FREQ_DIM, DiTBackbone
from mtdiff.config import TASKS
from mtdiff.models.tasks import ImageHead, PooledHead, TaskModel, class_embedding
from mtdiff.models.reference import ReferenceUNet
from mtdiff.models.unet import MTUNet

LATENT_CHANNELS = 4  # SD-VAE latent channels
LATENT_DOWNSAMPLE = 8  # SD-VAE spatial downsampling


class MTDiT(TaskModel):
    """DiT backbone + eps head + per-task heads (``D_i``) and encoders (``E_i``).

    ``input_shape`` is (C, H, W) of the diffusion space; ``tasks`` a subset of :data:`TASKS`.
    ``class_conditional``: the standard baseline, a label embedding added to adaLN's conditioning.
    """

    def __init__(self, input_shape: Sequence[int], *, patch_size: int, depth: int, hidden_size: int,
                 num_heads: int, mlp_ratio: float = 4.0, head_hidden: int = 256,
                 tasks: Sequence[str] = (), num_classes: Optional[int] = None,
                 repr_dim: Optional[int] = None, class_conditional: bool = False, class_dropout: float = 0.0):
        super().__init__()
        self._init_tasks(input_shape, tasks, num_classes, repr_dim)
        self.class_dropout = class_dropout
        c, h, w = self.input_shape
        self.input_size = h if h == w else (h, w)
        self.head_hidden = head_hidden
        self.class_conditional = class_conditional
        self.backbone = DiTBackbone((h, w), c, patch_size, depth, hidden_size, num_heads, mlp_ratio)
        # index num_classes is the "null" label of classifier-free guidance
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size) if class_conditional else None
        grid = self.backbone.grid
        self.eps_head = ImageHead(hidden_size, patch_size, c, grid)
        self.heads = nn.ModuleDict()
        for name in self.task_names:
            if name == "label":
                self.heads[name] = PooledHead(hidden_size, head_hidden, num_classes, zero_init_out=True)
            elif name == "representation":
                self.heads[name] = PooledHead(hidden_size, head_hidden, repr_dim)
            else:
                self.heads[name] = ImageHead(hidden_size, patch_size, c, grid)

    def features(self, z_t: torch.Tensor, t: torch.Tensor,
                 class_labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared ``h_t`` (B, N, D) and conditioning vector ``c`` (B, D)."""
        t = self._check_inputs(z_t, t)
        extra = None if self.class_embed is None else class_embedding(self.class_embed, class_labels, t)
        return self.backbone(z_t, t, extra)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``{"eps": (B,C,H,W), <task>: prediction}`` for every enabled task (M5's heads)."""
        h, c = self.features(z_t, t, class_labels)
        out = {"eps": self.eps_head(h, c)}
        for name in self.task_names:
            out[name] = self.heads[name](h, c)
        return out


def input_shape_from_params(params) -> tuple[int, int, int]:
    """(C, H, W) of the diffusion space: the image (pixel mode) or its SD-VAE latent (latent mode)."""
    res, ch = params.data.resolution, params.data.channels
    if params.diffusion.mode == "pixel":
        return (ch, res, res)
    if res % LATENT_DOWNSAMPLE:
        raise ValueError(f"data.resolution {res} must be divisible by {LATENT_DOWNSAMPLE} in latent mode")
    return (LATENT_CHANNELS, res // LATENT_DOWNSAMPLE, res // LATENT_DOWNSAMPLE)


def build_model(params, repr_dim: Optional[int], num_classes: int, *,
                input_shape: Optional[Sequence[int]] = None) -> TaskModel:
    """MTUNet, MTDiT or the library ReferenceUNet (``params.model.backbone``) for
    ``params.tasks.enabled`` and the data shape.

    ``input_shape`` overrides the (C, H, W) derived from params (e.g. from latents ``meta.json``).
    """
    mc = params.model
    shape = tuple(input_shape) if input_shape is not None else input_shape_from_params(params)
    common = dict(head_hidden=mc.head_hidden, tasks=params.tasks.enabled, num_classes=num_classes,
                  repr_dim=repr_dim, class_conditional=mc.class_conditional, class_dropout=mc.class_dropout)
    if mc.backbone == "reference_unet":
        return ReferenceUNet(shape, base_channels=mc.channels, channel_mult=mc.channel_mult,
                             num_res_blocks=mc.num_res_blocks, norm_groups=mc.norm_groups, num_classes=num_classes,
                             class_conditional=mc.class_conditional, class_dropout=mc.class_dropout)
    if mc.backbone == "unet":
        return MTUNet(shape, base_channels=mc.channels, channel_mult=mc.channel_mult,
                      num_res_blocks=mc.num_res_blocks, attn_resolutions=mc.attn_resolutions,
                      num_heads=mc.num_heads, dropout=mc.dropout, label_feedback=mc.label_feedback,
                      norm_groups=mc.norm_groups, **common)
    if shape[1] % mc.patch_size or shape[2] % mc.patch_size:
        raise ValueError(f"model.patch_size {mc.patch_size} must divide the input size {shape[1]}x{shape[2]}")
    depth, hidden, heads = mc.dims
    return MTDiT(shape, patch_size=mc.patch_size, depth=depth, hidden_size=hidden, num_heads=heads,
                 mlp_ratio=mc.mlp_ratio, **common)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: TaskModel) -> float:
    """Forward FLOPs per image (multiply-add = 2 FLOPs) of backbone + all heads.

    MTUNet and ReferenceUNet: counted by ``FlopCounterMode`` on one image (convs and matmuls).
    MTDiT: analytic.

    Counts the matmul/conv work (patch embed, t-MLP, per block: adaLN, qkv, attention scores and
    A@V, proj, MLP; each image head's adaLN + linear; the pooled heads' MLPs). Norms, activations,
    softmax and elementwise ops are ignored, as in DiT's Gflops and FlopCounterMode. Encoders
    (``aggregate``) are not part of the forward pass and are not counted.
    """
    if not isinstance(model, MTDiT):
        return _counted_flops(model)
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


def _counted_flops(model: nn.Module) -> float:
    p = next(model.parameters())
    z = torch.zeros(1, *model.input_shape, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(z, torch.ones(1, dtype=torch.long, device=p.device))
    return float(counter.get_total_flops())
