"""Building and measuring the network: which class ``params`` asks for, the diffusion space's shape,
parameter and FLOP counts (the train stage, the benchmark and inference all build through here)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtdiff.config import LATENT_DOWNSAMPLE
from mtdiff.models.dit import TIME_FREQ_DIM
from mtdiff.models.mtdit import MTDiT
from mtdiff.models.reference import ReferenceDiT, ReferenceUNet
from mtdiff.models.tasks import ImageHead, TaskModel
from mtdiff.models.unet import MTUNet

LATENT_CHANNELS = 4  # SD-VAE latent channels
TRAIN_FLOPS_PER_FORWARD = 3  # a training step's FLOPs per forward FLOP: forward + backward (about twice)


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
    """MTUNet, MTDiT or a library reference, ReferenceUNet / ReferenceDiT (``params.model.backbone``), for
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
    common["classifier_dropout"] = params.tasks.label.classifier_dropout if params.tasks.clean_classifier else None
    if mc.backbone == "unet":
        return MTUNet(shape, base_channels=mc.channels, channel_mult=mc.channel_mult,
                      num_res_blocks=mc.num_res_blocks, attn_resolutions=mc.attn_resolutions,
                      num_heads=mc.num_heads, dropout=mc.dropout, label_feedback=mc.label_feedback,
                      norm_groups=mc.norm_groups, **common)
    if shape[1] % mc.patch_size or shape[2] % mc.patch_size:
        raise ValueError(f"model.patch_size {mc.patch_size} must divide the input size {shape[1]}x{shape[2]}")
    depth, hidden, heads = mc.dims
    if mc.backbone == "reference_dit":
        return ReferenceDiT(shape, patch_size=mc.patch_size, depth=depth, hidden_size=hidden, num_heads=heads,
                            num_classes=num_classes, class_dropout=mc.class_dropout)
    return MTDiT(shape, patch_size=mc.patch_size, depth=depth, hidden_size=hidden, num_heads=heads,
                 mlp_ratio=mc.mlp_ratio, label_feedback=mc.label_feedback, **common)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(model: TaskModel) -> float:
    """Forward FLOPs per image (multiply-add = 2 FLOPs) of backbone + all heads.

    MTUNet and the references: counted by ``FlopCounterMode`` on one image (convs and matmuls).
    MTDiT: analytic.

    Counts the matmul/conv work (patch embed, t-MLP, per block: adaLN, qkv, attention scores and
    A@V, proj, MLP; each image head's adaLN + linear; the pooled heads' MLPs). Norms, activations,
    softmax and elementwise ops are ignored, as in DiT's Gflops and FlopCounterMode. Encoders
    (``aggregate``) are not part of the forward pass and are not counted.
    """
    if not isinstance(model, MTDiT):
        return _counted_flops(model)
    return _dit_flops(model)


def _dit_flops(model: MTDiT) -> float:
    """The analytic count of :func:`flops_per_image` for MTDiT."""
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
    if model.feedback is not None:
        flops += 2 * model.feedback.in_features * d  # the label feedback's embedding
    return float(flops)


def _counted_flops(model: nn.Module) -> float:
    p = next(model.parameters())
    z = torch.zeros(1, *model.input_shape, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(z, torch.ones(1, dtype=torch.long, device=p.device))
    return float(counter.get_total_flops())
