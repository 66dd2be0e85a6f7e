"""Task encoders ``E_i`` (into the diffusion space, M2) and task heads ``D_i`` (on ``h_t``, M5).

Encoders map task data ``x_i`` to a ``C x H x W`` signal; their sum is the aggregated ``A(X)``
that the forward process (M1/M3) mixes into ``z_t``. Heads read the shared backbone's token
features ``h_t`` (B, N, D) and the conditioning vector ``c`` (B, D) and predict each ``x_i``.
"""
from __future__ import annotations

import torch
from torch import nn

from mtdiff.models.dit import FinalLayer, unpatchify

RMS_EPS = 1e-12  # only guards an all-zero code; far below any trained code's mean square


def rms_normalize(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Parameter-free RMS normalisation over all but the first dim: each sample gets unit RMS.

    Why: in M3 the encoder output enters ``z_t`` only through ``c_t * A``. Left free, training can
    shrink ``E_i`` towards 0 (a smaller offset is an easier nuisance for the eps head), which quietly
    turns MT-Diffusion back into unconditional DDPM. Fixing the scale makes ``w_t`` (``diffusion.w_max``)
    the one knob for how strongly task information is injected; only the direction is learned.
    Computed in float32 so bf16/fp16 autocast cannot underflow the mean square.
    """
    xf = x.float()
    dims = tuple(range(1, x.ndim))
    out = xf * torch.rsqrt(xf.square().mean(dim=dims, keepdim=True) + eps)
    return out.to(x.dtype)


class LabelEncoder(nn.Module):
    """E_label: class label -> learned (C, H, W) code with unit RMS.

    Accepts int64 labels (B,) or float class probabilities (B, K). For probabilities it returns the
    expected embedding ``sum_k p_k E(k)`` (the reverse process' soft labels, METHOD.md), so one-hot
    probabilities give exactly the int-label result, and an uncertain label carries a weaker signal.
    """

    def __init__(self, num_classes: int, shape: tuple[int, int, int]):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"label encoder needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.shape = tuple(shape)
        # N(0, 1) init: random codes in C*H*W dims are already nearly orthogonal, i.e. separable
        # from step 0; the RMS normalisation makes the init scale irrelevant to the forward pass.
        self.embedding = nn.Embedding(num_classes, shape[0] * shape[1] * shape[2])

    def codes(self) -> torch.Tensor:
        """All class codes, normalised: (K, C*H*W)."""
        return rms_normalize(self.embedding.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if y.ndim != 1:
                raise ValueError(f"label: integer labels must have shape (B,), got {tuple(y.shape)}")
            out = rms_normalize(self.embedding(y.long()))
        elif y.is_floating_point():
            if y.ndim != 2 or y.shape[1] != self.num_classes:
                raise ValueError(f"label: probabilities must have shape (B, {self.num_classes}), "
                                 f"got {tuple(y.shape)}")
            codes = self.codes()
            out = y.to(codes.dtype) @ codes
        else:
            raise ValueError(f"label: expected int64 labels (B,) or float probabilities (B, K), got {y.dtype}")
        return out.reshape(y.shape[0], *self.shape)


class RepresentationEncoder(nn.Module):
    """E_repr: representation vector (B, D) -> linear -> (C, H, W) with unit RMS."""

    def __init__(self, repr_dim: int, shape: tuple[int, int, int]):
        super().__init__()
        if repr_dim < 1:
            raise ValueError(f"representation encoder needs repr_dim >= 1, got {repr_dim}")
        self.repr_dim = repr_dim
        self.shape = tuple(shape)
        self.linear = nn.Linear(repr_dim, shape[0] * shape[1] * shape[2])
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if r.ndim != 2 or r.shape[1] != self.repr_dim:
            raise ValueError(f"representation: expected shape (B, {self.repr_dim}), got {tuple(r.shape)}")
        out = self.linear(r.to(self.linear.weight.dtype))
        return rms_normalize(out).reshape(r.shape[0], *self.shape)


class IdentityEncoder(nn.Module):
    """E_masked / E_transition: the masked or paired image already lives in the diffusion space.

    No normalisation and no parameters: its scale is the data's scale, so it cannot collapse.
    """

    def __init__(self, name: str, shape: tuple[int, int, int]):
        super().__init__()
        self.name = name
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name}: expected shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        return x


class PooledHead(nn.Module):
    """Mean-pooled tokens -> LayerNorm -> MLP -> ``out_dim`` (label logits or a representation)."""

    def __init__(self, dim: int, hidden: int, out_dim: int, zero_init_out: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out_dim)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if zero_init_out:
            # Uniform logits at init (loss = log K): no arbitrary class preference to unlearn.
            nn.init.zeros_(self.fc2.weight)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(h.mean(dim=1)))))


class ImageHead(nn.Module):
    """Per-token adaLN final layer -> linear -> unpatchify to (B, C, H, W): noise / masked / paired heads."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, grid: tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.grid = tuple(grid)
        self.final = FinalLayer(dim, patch_size, out_channels)
        # DiT zero-init: modulation and output start at 0, so the head predicts 0 at init.
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.final(h, c), self.out_channels, self.patch_size, *self.grid)

