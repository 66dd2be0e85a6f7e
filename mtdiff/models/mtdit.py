"""MT-Diffusion's network: one DiT backbone, a noise head and one head + encoder per enabled task.

``model(z_t, t)`` runs the reverse-process network (shared ``h_t`` and heads ``D_i``, M5);
``model.aggregate(task_inputs)`` is the encoder side ``A(X) = sum_i E_i(x_i)`` (M2) that the
diffusion code feeds into the forward process (M1/M3) and the posterior (M4).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from mtdiff.models.dit import DiTBackbone
from mtdiff.models.tasks import ImageHead, PooledHead, TaskModel, class_embedding

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
