"""Task encoders ``E_i`` (into the diffusion space, M2) and task heads ``D_i`` (on ``h_t``, M5).

Encoders map task data ``x_i`` to a ``C x H x W`` signal; their sum is the aggregated ``A(X)``
that the forward process (M1/M3) mixes into ``z_t``. Heads read the shared backbone's token
features ``h_t`` (B, N, D) and the conditioning vector ``c`` (B, D) and predict each ``x_i``.
"""
from __future__ import annotations

import torch
from torch import nn

from typing import Mapping, Optional, Sequence

from mtdiff.config import TASKS
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


def class_embedding(embed: nn.Embedding, class_labels: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """The class-conditional baseline's label embedding (not MT-Diffusion's label task); no label is
    the null label, the last index: classifier-free guidance's unconditional class."""
    if class_labels is None:
        class_labels = torch.full_like(t, embed.num_embeddings - 1)
    return embed(class_labels)


class LabelEncoder(nn.Module):
    """E_label: class label -> learned (C, H, W) code with unit RMS.

    Accepts int64 labels (B,) or float class probabilities (B, K). For probabilities it returns the
    expected embedding ``sum_k p_k E(k)`` (the reverse process' soft labels, docs/method.md), so one-hot
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
        self.act = nn.GELU()  # exact, as the DiT blocks' MLP
        self.fc2 = nn.Linear(hidden, out_dim)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if zero_init_out:
            # Uniform logits at init (loss = log K): no arbitrary class preference to unlearn.
            nn.init.zeros_(self.fc2.weight)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(h.mean(dim=1)))))


class PooledClassifier(nn.Module):
    """The clean-image classifier: pooled backbone features -> LayerNorm -> Linear -> GELU -> dropout
    -> Linear -> logits (Joint Diffusion's head, LayerNorm for its BatchNorm: no running statistics
    for the EMA copy or DDP ranks to disagree on)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


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



class TaskModel(nn.Module):
    """The encoder side shared by every backbone: ``E_i`` per enabled task and ``A = sum_i E_i(x_i)`` (M2).

    Subclasses build the backbone and heads and implement ``forward(z_t, t, class_labels=None)``.
    ``class_conditional`` marks the standard class-conditional baseline (label into the norms).
    """

    class_conditional = False

    def _init_classifier(self, feature_dim: int, hidden: int, dropout: Optional[float]) -> None:
        """Build :class:`PooledClassifier` on ``feature_dim`` pooled features when ``dropout`` is set
        (``tasks.label.classifier: clean``), else ``self.classifier = None``; it needs the label task's classes."""
        if dropout is None:
            self.classifier = None
            return
        if "label" not in self.task_names:
            raise ValueError("tasks.label.classifier 'clean' needs tasks.label.enabled: true")
        self.classifier = PooledClassifier(feature_dim, hidden, self.num_classes, dropout)

    def pooled_features(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, F) spatially pooled backbone features the clean-image classifier reads (the backbone's own)."""
        return self.backbone.pooled_features(z, t)

    def classifier_logits(self, z0: torch.Tensor) -> torch.Tensor:
        """The clean-image classifier on ``z0`` at t = 0 with no task code: (B, K) logits."""
        if getattr(self, "classifier", None) is None:
            raise KeyError("the model has no clean-image classifier (tasks.label.classifier is not 'clean')")
        t = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
        return self.classifier(self.pooled_features(z0, self._check_inputs(z0, t)))

    def _init_tasks(self, input_shape: Sequence[int], tasks: Sequence[str], num_classes: Optional[int],
                    repr_dim: Optional[int]) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
        self.input_shape = tuple(int(v) for v in input_shape)
        self.in_channels = self.input_shape[0]
        # Fixed (the config's) order, so outputs and state_dict keys never depend on input order.
        self.task_names: list[str] = [t for t in TASKS if t in tasks]
        self.num_classes = num_classes
        self.repr_dim = repr_dim
        self.encoders = nn.ModuleDict()
        for name in self.task_names:
            if name == "label":
                if not num_classes:
                    raise ValueError("tasks.label is enabled but num_classes was not given")
                self.encoders[name] = LabelEncoder(num_classes, self.input_shape)
            elif name == "representation":
                if not repr_dim:
                    raise ValueError("tasks.representation is enabled but repr_dim was not given "
                                     "(read it from representations/meta.json 'dim')")
                self.encoders[name] = RepresentationEncoder(repr_dim, self.input_shape)
            else:  # masked / transition: image-valued task data already in the diffusion space
                self.encoders[name] = IdentityEncoder(name, self.input_shape)

    def _check_inputs(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Shapes only (no value check, so no host sync); returns ``t`` as (B,)."""
        if z_t.ndim != 4 or tuple(z_t.shape[1:]) != self.input_shape:
            raise ValueError(f"z_t: expected shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(z_t.shape)}")
        if t.ndim == 0:
            return t.expand(z_t.shape[0])
        if t.ndim != 1 or t.shape[0] != z_t.shape[0]:
            raise ValueError(f"t: expected shape ({z_t.shape[0]},) or a scalar, got {tuple(t.shape)}")
        return t

    def head(self, name: str, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One head's output ``D_name(h_t)`` (evaluation: the label / representation heads on test
        images). Here the whole forward; a backbone whose head reads an inner feature skips the rest."""
        out = self(z_t, t)
        if name not in out:
            raise KeyError(f"the model has no {name} head (tasks.{name}.enabled is false; heads: {sorted(out)})")
        return out[name]

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
        codes = [self.encoders[n](task_inputs[n]) for n in self.task_names if task_inputs.get(n) is not None]
        if codes:
            total = torch.stack(codes).sum(0) if len(codes) > 1 else codes[0]
            if batch_size is not None and total.shape[0] != batch_size:
                raise ValueError(f"aggregate: task inputs have batch size {total.shape[0]}, "
                                 f"batch_size={batch_size} was asked for")
            return total.to(like.dtype) if like is not None else total
        if batch_size is None:
            tensors = [v for v in task_inputs.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
            if like is None and not tensors:
                raise ValueError("aggregate: no task inputs to infer the batch size from; "
                                 "pass batch_size= or like=")
            batch_size = like.shape[0] if like is not None else tensors[0].shape[0]
        ref = like if like is not None else next(self.parameters())
        return torch.zeros(batch_size, *self.input_shape, dtype=ref.dtype, device=ref.device)
