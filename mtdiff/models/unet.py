"""ADM-style U-Net backbone for pixel mode, shared by every MT-Diffusion head.

After Dhariwal & Nichol's guided-diffusion ``unet.py`` (the paper's own backbone family): residual
blocks with the timestep embedding entering the second GroupNorm as scale/shift
(``use_scale_shift_norm``), self-attention at the low resolutions, stride-2 conv down / nearest+conv
up, skip connections between the halves. A DiT with 4-px patches over 28x28 (49 tokens) is a poor
fit for small images; this trunk is the default for the Fashion-MNIST profile, DiT stays for latents.

Outputs for the heads: the last decoder feature map (image heads are output convolutions) and the
bottleneck map (label / representation heads read it). Two optional conditioning paths, both off
for MT-Diffusion proper (whose conditioning enters through the forward process, M1-M3):
- ``class_embed``: the standard class-conditional baseline (label embedding added to the timestep
  embedding, an extra "null" class for classifier-free guidance);
- ``feedback``: a vector computed from the bottleneck (the label head's soft prediction) added to
  the decoder's embedding, so the decoder is conditioned on what the trunk read out of ``z_t``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtdiff.models.dit import TimestepEmbedder
from mtdiff.models.tasks import TaskModel, class_embedding

NORM_GROUPS = 8  # GroupNorm groups (model.norm_groups' default); fewer where they do not divide the channels


def group_norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups.

    Why not ADM's 32: at this U-Net's 32-64 channels, 32 groups hold 1-2 channels each, i.e. an
    instance norm that strips every channel's mean over the image, the signal that carries the
    global brightness of a noisy input (engine-parity ablation, docs/engine.md).
    """
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer so each block starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, then GN scaled/shifted by the embedding, SiLU, dropout, zero-init conv; skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = NORM_GROUPS):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = group_norm(out_ch, groups)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Spatial self-attention over all positions (fused SDPA), zero-init output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int = NORM_GROUPS):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"U-Net channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, hd)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, in_chs: Sequence[int], out_ch: int, emb_dim: int, attn: bool, num_heads: int,
                 dropout: float, groups: int = NORM_GROUPS):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, emb_dim, dropout, groups) for c in in_chs)
        self.attn = nn.ModuleList(AttentionBlock(out_ch, num_heads, groups) if attn else nn.Identity()
                                  for _ in in_chs)


class UNetBackbone(nn.Module):
    """``(z_t, t) -> (features (B, C0, H, W), bottleneck (B, Cb, h, w), emb (B, E))``.

    ``channel_mult`` gives one level per entry (28x28 with (1, 2, 2): 28, 14, 7); attention at
    levels whose resolution is in ``attn_resolutions`` and in the middle block.
    """

    def __init__(self, input_size: tuple[int, int], in_channels: int, base_channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 num_heads: int, dropout: float = 0.0, num_classes: Optional[int] = None,
                 feedback_dim: Optional[int] = None, norm_groups: int = NORM_GROUPS):
        super().__init__()
        self.norm_groups = norm_groups
        self.input_size = tuple(input_size)
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.channel_mult = tuple(channel_mult)
        emb_dim = 4 * base_channels
        self.emb_dim = emb_dim
        self.t_embedder = TimestepEmbedder(emb_dim)
        # Standard class conditioning (baseline only); index num_classes is the CFG "null" label.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.feedback = nn.Linear(feedback_dim, emb_dim) if feedback_dim else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self._build(input_size, base_channels, num_res_blocks, attn_resolutions, num_heads, dropout)

    def _build(self, input_size, base: int, n_res: int, attn_res, heads: int, dropout: float) -> None:
        res, g = min(input_size), self.norm_groups
        chans, skips = base, [base]
        self.down, self.downsample, self.sizes = nn.ModuleList(), nn.ModuleList(), []
        for i, mult in enumerate(self.channel_mult):
            out = base * mult
            self.down.append(Level([chans] + [out] * (n_res - 1), out, self.emb_dim, res in attn_res, heads,
                                   dropout, g))
            chans = out
            skips += [out] * n_res
            last = i == len(self.channel_mult) - 1
            self.downsample.append(nn.Identity() if last else Downsample(chans))
            self.sizes.append(res)
            if not last:
                skips.append(chans)
                res = (res + 1) // 2
        # what pooled_features concatenates: every encoder map (the skips) and the middle's output
        self.pooled_channels = sum(skips) + chans
        self.mid = nn.ModuleList([ResBlock(chans, chans, self.emb_dim, dropout, g), AttentionBlock(chans, heads, g),
                                  ResBlock(chans, chans, self.emb_dim, dropout, g)])
        self.bottleneck_channels = chans
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(self.channel_mult))):
            out = base * mult
            ins = [chans + skips.pop()] + [out + skips.pop() for _ in range(n_res)]
            self.up.append(Level(ins, out, self.emb_dim, self.sizes[i] in attn_res, heads, dropout, g))
            chans = out
            self.upsample.append(Upsample(chans) if i > 0 else nn.Identity())
        self.out_channels = chans

    def embed(self, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.t_embedder(t)
        if self.class_embed is not None:
            emb = emb + class_embedding(self.class_embed, class_labels, t)
        return emb

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                feedback_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None):
        """``feedback_fn(bottleneck, emb) -> (B, feedback_dim)`` conditions the decoder (see module doc)."""
        bottleneck, hs, emb = self.encode(z_t, t, class_labels)
        h = bottleneck
        if self.feedback is not None and feedback_fn is not None:
            emb = emb + self.feedback(feedback_fn(bottleneck, emb))
        for i, (level, up) in enumerate(zip(self.up, self.upsample)):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, hs.pop()], dim=1), emb))
            if not isinstance(up, nn.Identity):
                h = up(h, hs[-1].shape[-2:])
        return h, bottleneck, emb

    def encode(self, z_t: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The encoder half and the middle: (bottleneck map, skip features, embedding)."""
        emb = self.embed(t, class_labels)
        h = self.conv_in(z_t)
        hs = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))
                hs.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        return self.mid[2](self.mid[1](self.mid[0](h, emb)), emb), hs, emb

    def pooled_features(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Every encoder block's map and the middle's, each mean-pooled over space: (B, pooled_channels)."""
        bottleneck, hs, _ = self.encode(z, t)
        return torch.cat([h.mean(dim=(2, 3)) for h in (*hs, bottleneck)], dim=1)


class ConvHead(nn.Module):
    """Image head: GN-SiLU-conv3x3 from the last decoder map to ``out_channels`` (zero init: 0 at start)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.net = nn.Sequential(group_norm(in_ch, groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(in_ch, out_ch, 3, padding=1)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class BottleneckHead(nn.Module):
    """Label / representation head on the bottleneck map: 1x1 reduce -> flatten -> MLP (+ timestep).

    Flattened, not mean-pooled: the task code ``E_i(x_i)`` is a fixed spatial pattern in ``z_t``
    (M3), and reading it needs position (a pooled conv feature is blind to where a pattern is).
    """

    REDUCED = 16  # channels kept per position before flattening

    def __init__(self, channels: int, hw: tuple[int, int], emb_dim: int, hidden: int, out_dim: int,
                 zero_init_out: bool = False, groups: int = NORM_GROUPS):
        super().__init__()
        self.reduce = nn.Sequential(group_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, self.REDUCED, 1))
        self.fc1 = nn.Linear(self.REDUCED * hw[0] * hw[1], hidden)
        self.t_proj = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        if zero_init_out:  # uniform logits at init (loss = log K)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, bottleneck: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.reduce(bottleneck).flatten(1)) + self.t_proj(emb)
        return self.fc2(F.silu(h))


class MTUNet(TaskModel):
    """U-Net trunk + eps head (output conv) + one head per enabled task + encoders ``E_i``.

    ``label_feedback``: the label head's softmax, read from the bottleneck, conditions the decoder
    (MT-Diffusion: the trunk reads the injected label out of ``z_t`` and generates for it).
    ``class_conditional``: the standard baseline (true label into the norms, null label for CFG).
    """

    def __init__(self, input_shape: Sequence[int], *, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attn_resolutions: Sequence[int], num_heads: int, head_hidden: int,
                 dropout: float = 0.0, tasks: Sequence[str] = (), num_classes: Optional[int] = None,
                 repr_dim: Optional[int] = None, class_conditional: bool = False, class_dropout: float = 0.0,
                 label_feedback: bool = False, norm_groups: int = NORM_GROUPS,
                 classifier_dropout: Optional[float] = None):
        super().__init__()
        self._init_tasks(input_shape, tasks, num_classes, repr_dim)
        self.class_dropout = class_dropout  # P(null label) in training: classifier-free guidance
        c, h, w = self.input_shape
        self.class_conditional = class_conditional
        self.label_feedback = label_feedback and "label" in self.task_names
        self.backbone = UNetBackbone((h, w), c, base_channels, channel_mult, num_res_blocks, attn_resolutions,
                                     num_heads, dropout, num_classes=num_classes if class_conditional else None,
                                     feedback_dim=num_classes if self.label_feedback else None,
                                     norm_groups=norm_groups)
        bb = self.backbone
        hw = (bb.sizes[-1], bb.sizes[-1]) if h == w else self._bottleneck_hw(h, w)
        self.eps_head = ConvHead(bb.out_channels, c, norm_groups)
        self.heads = nn.ModuleDict()
        for name in self.task_names:
            if name in ("label", "representation"):
                out_dim = num_classes if name == "label" else repr_dim
                self.heads[name] = BottleneckHead(bb.bottleneck_channels, hw, bb.emb_dim, head_hidden, out_dim,
                                                  zero_init_out=name == "label", groups=norm_groups)
            else:
                self.heads[name] = ConvHead(bb.out_channels, c, norm_groups)
        self._init_classifier(bb.pooled_channels, head_hidden, classifier_dropout)

    def _bottleneck_hw(self, h: int, w: int) -> tuple[int, int]:
        for _ in self.backbone.channel_mult[1:]:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def forward(self, z_t: torch.Tensor, t: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """``{"eps": (B,C,H,W), <task>: prediction}`` for every enabled task (M5's heads)."""
        t = self._check_inputs(z_t, t)
        out: dict[str, torch.Tensor] = {}

        def label_probs(bottleneck: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            out["label"] = self.heads["label"](bottleneck, emb)
            return _soft_label(out["label"], bottleneck.dtype)

        feats, bottleneck, emb = self.backbone(z_t, t, class_labels,
                                               label_probs if self.label_feedback else None)
        out["eps"] = self.eps_head(feats)
        for name in self.task_names:
            if name in out:
                continue
            head = self.heads[name]
            out[name] = head(bottleneck, emb) if isinstance(head, BottleneckHead) else head(feats)
        return {"eps": out["eps"], **{n: out[n] for n in self.task_names}}

    def head(self, name: str, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A bottleneck head (label, representation) without the decoder: the evaluation's label
        accuracy over the test split then costs the encoder half only (same values as ``forward``)."""
        bottleneck_head = self.heads[name] if name in self.heads else None
        if not isinstance(bottleneck_head, BottleneckHead):
            return super().head(name, z_t, t)
        bottleneck, _, emb = self.backbone.encode(z_t, self._check_inputs(z_t, t))
        if self.label_feedback and name != "label":  # as in forward: the fed-back embedding
            emb = emb + self.backbone.feedback(_soft_label(self.heads["label"](bottleneck, emb), bottleneck.dtype))
        return bottleneck_head(bottleneck, emb)


def _soft_label(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The label head's softmax (in float32), what label feedback feeds the decoder."""
    return torch.softmax(logits.float(), dim=-1).to(dtype)
