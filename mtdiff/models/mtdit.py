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
    ``label_feedback``: as the U-Net's, the label head reads the tokens at mid-depth and its softmax,
    embedded, joins adaLN's conditioning for the later blocks and the other heads (the trunk reads the
    injected label out of ``z_t`` and generates for it); zero-initialised, so training starts without it.
    """

    def __init__(self, input_shape: Sequence[int], *, patch_size: int, depth: int, hidden_size: int,
                 num_heads: int, mlp_ratio: float = 4.0, head_hidden: int = 256,
                 tasks: Sequence[str] = (), num_classes: Optional[int] = None,
                 repr_dim: Optional[int] = None, class_conditional: bool = False, class_dropout: float = 0.0,
                 label_feedback: bool = False, classifier_dropout: Optional[float] = None):
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
        self.label_feedback = label_feedback and "label" in self.task_names
        self.feedback = nn.Linear(num_classes, hidden_size) if self.label_feedback else None
        if self.feedback is not None:
            nn.init.zeros_(self.feedback.weight)
            nn.init.zeros_(self.feedback.bias)
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
        self._init_classifier(self.backbone.pooled_blocks * hidden_size, head_hidden, classifier_dropout)

    def features(self, z_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                 out: Optional[dict[str, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared ``h_t`` (B, N, D) and conditioning vector ``c`` (B, D); with label feedback the label
        head's logits (read at mid-depth) are put in ``out["label"]``."""
        t = self._check_inputs(z_t, t)
        extra = None if self.class_embed is None else class_embedding(self.class_embed, class_labels, t)
        if not self.label_feedback:
            return self.backbone(z_t, t, extra)
        out = {} if out is None else out

        def label_cond(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            out["label"] = self.heads["label"](x, c)
            return self.feedback(torch.softmax(out["label"].float(), dim=-1).to(x.dtype))

        return self.backbone(z_t, t, extra, mid_cond=label_cond)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``{"eps": (B,C,H,W), <task>: prediction}`` for every enabled task (M5's heads)."""
        out: dict[str, torch.Tensor] = {}
        h, c = self.features(z_t, t, class_labels, out)
        out = {"eps": self.eps_head(h, c), **out}
        for name in self.task_names:
            if name not in out:
                out[name] = self.heads[name](h, c)
        return {"eps": out["eps"], **{n: out[n] for n in self.task_names}}

    def head(self, name: str, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """With label feedback the label head reads mid-depth tokens: the later blocks are skipped."""
        if name != "label" or not self.label_feedback:
            return super().head(name, z_t, t)
        x, c = self.backbone(z_t, self._check_inputs(z_t, t), stop_at_mid=True)
        return self.heads["label"](x, c)
