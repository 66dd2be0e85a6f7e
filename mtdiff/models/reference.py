"""The library references: diffusers' ``UNet2DModel`` and ``DiTTransformer2DModel`` as eps-only
:class:`TaskModel` wrappers.

Not a second product: a baseline that trains, samples and is scored through exactly the project's
training step, sampler and evaluator (``model.backbone: reference_unet``), so that a gap between it
and :class:`~mtdiff.models.unet.MTUNet` at equal steps is a defect of our U-Net, measured inside
every sweep that carries a ``reference_*`` point (docs/engine.md).

The architecture is the textbook small U-Net of diffusers: ``block_out_channels = channels x
channel_mult``, ``layers_per_block = num_res_blocks``, plain ``DownBlock2D`` / ``UpBlock2D`` (no
attention but in the middle block), ``norm_num_groups = model.norm_groups``, additive timestep
embedding, and for the class-conditional baseline ``num_class_embeds = K + 1`` (the last is the
null label of classifier-free guidance, as in our U-Net).

The DiT reference (``model.backbone: reference_dit``) is diffusers' port of Peebles & Xie's DiT with
our depth, width, heads and patch: adaLN-Zero blocks, tanh-GELU MLP, fixed sin-cos positions, and
its own initialisation (PyTorch defaults, not DiT's zero-init). It is class-conditional only (its
adaLN needs a label): the baseline that :class:`~mtdiff.models.mtdit.MTDiT` is measured against.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from mtdiff.models.tasks import TaskModel


class ReferenceUNet(TaskModel):
    """``model(z_t, t, class_labels=None) -> {"eps": ...}`` through ``diffusers.UNet2DModel``.

    ``t`` is mtdiff's 1-based timestep; the library model is fed ``t - 1``, the 0-based index its
    schedulers use, so the network sees what it would in diffusers' own loop.
    """

    def __init__(self, input_shape: Sequence[int], *, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, norm_groups: int, num_classes: Optional[int] = None,
                 class_conditional: bool = False, class_dropout: float = 0.0):
        super().__init__()
        from diffusers import UNet2DModel  # heavy import: only when the reference is built

        self._init_tasks(input_shape, (), num_classes, None)
        c, h, w = self.input_shape
        if h != w:
            raise ValueError(f"reference_unet needs a square input, got {h}x{w}")
        self.class_conditional = class_conditional
        self.class_dropout = class_dropout
        levels = len(channel_mult)
        self.unet = UNet2DModel(
            sample_size=h, in_channels=c, out_channels=c,
            block_out_channels=tuple(base_channels * m for m in channel_mult),
            layers_per_block=num_res_blocks, norm_num_groups=norm_groups,
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            num_class_embeds=num_classes + 1 if class_conditional else None,
        )

    def forward(self, z_t: torch.Tensor, t: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        t = self._check_inputs(z_t, t)
        if self.class_conditional and class_labels is None:  # unconditional pass: the null label
            class_labels = torch.full_like(t, self.num_classes)
        labels = class_labels if self.class_conditional else None
        return {"eps": self.unet(z_t, t - 1, class_labels=labels).sample}


class ReferenceDiT(TaskModel):
    """``model(z_t, t, class_labels=None) -> {"eps": ...}`` through ``diffusers.DiTTransformer2DModel``.

    The null label (index ``num_classes``) is the unconditional pass; diffusers' own label dropout is
    switched off so that the diffusion code's ``model.class_dropout`` is the only one, as for our models.
    """

    class_conditional = True

    def __init__(self, input_shape: Sequence[int], *, patch_size: int, depth: int, hidden_size: int,
                 num_heads: int, num_classes: int, class_dropout: float = 0.0):
        super().__init__()
        from diffusers import DiTTransformer2DModel  # heavy import: only when the reference is built

        self._init_tasks(input_shape, (), num_classes, None)
        c, h, w = self.input_shape
        if h != w:
            raise ValueError(f"reference_dit needs a square input, got {h}x{w}")
        self.class_dropout = class_dropout
        self.dit = DiTTransformer2DModel(
            num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=c,
            out_channels=c, num_layers=depth, sample_size=h, patch_size=patch_size,
            num_embeds_ada_norm=num_classes)
        for block in self.dit.transformer_blocks:
            # a table of num_classes + 1 rows (the last: the null label) whose dropout is ours, not its own
            block.norm1.emb.class_embedder.dropout_prob = 0.0

    def forward(self, z_t: torch.Tensor, t: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        t = self._check_inputs(z_t, t)
        if class_labels is None:  # unconditional pass: the null label
            class_labels = torch.full_like(t, self.num_classes)
        return {"eps": self.dit(z_t, timestep=t - 1, class_labels=class_labels).sample}
