"""MT-Diffusion model: shapes, encoders (M2), init, gradients, FLOPs, DiT-B/2 size."""
from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mtdiff.models import (TASKS, MTDiT, build_model, count_params, flops_per_image, input_shape_from_params,
                           rms_normalize, sincos_pos_embed_2d)

TINY = {"model.backbone": "dit", "model.size": "custom", "model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2,
        "model.head_hidden": 16}
NO_TASKS = {f"tasks.{t}.enabled": False for t in TASKS}
LATENT = {"diffusion.mode": "latent", "data.resolution": 256, "data.channels": 3, "model.patch_size": 2}
NUM_CLASSES, REPR_DIM = 10, 24


def _params(make_params, tasks=(), **over):
    enabled = {f"tasks.{t}.enabled": True for t in tasks}
    cond = {"sample.condition": "label" if "label" in tasks else "uncond"}
    return make_params({**TINY, **NO_TASKS, **enabled, **cond, **over})


def _tiny(tasks=TASKS, shape=(1, 28, 28), patch=4, seed=0) -> MTDiT:
    torch.manual_seed(seed)
    return MTDiT(shape, patch_size=patch, depth=2, hidden_size=32, num_heads=2, head_hidden=16,
                 tasks=tasks, num_classes=NUM_CLASSES, repr_dim=REPR_DIM)


def _randomize_zero_inits(model: torch.nn.Module) -> None:
    """Give the adaLN-Zero / zero-init parameters small random values so every path is live."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)


ALL_COMBOS = [c for r in range(len(TASKS) + 1) for c in itertools.combinations(TASKS, r)]


@pytest.mark.parametrize("tasks", ALL_COMBOS, ids=lambda c: "+".join(c) or "none")
def test_output_shapes_every_task_combination_pixel(make_params, tasks):
    params = _params(make_params, tasks)
    model = build_model(params, REPR_DIM if "representation" in tasks else None, NUM_CLASSES)
    assert model.task_names == list(tasks)
    assert model.in_channels == 1 and model.input_size == 28
    z, t = torch.randn(3, 1, 28, 28), torch.randint(1, 1001, (3,))
    out = model(z, t)
    expected = {"eps": (3, 1, 28, 28), "label": (3, NUM_CLASSES), "representation": (3, REPR_DIM),
                "masked": (3, 1, 28, 28), "transition": (3, 1, 28, 28)}
    assert set(out) == {"eps", *tasks}
    for k, v in out.items():
        assert tuple(v.shape) == expected[k], k
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("tasks", [(), ("label",), TASKS], ids=["none", "label", "all"])
def test_output_shapes_latent(make_params, tasks):
    params = _params(make_params, tasks, **LATENT)
    assert input_shape_from_params(params) == (4, 32, 32)
    model = build_model(params, REPR_DIM if "representation" in tasks else None, 1000)
    assert model.backbone.num_tokens == 256
    z, t = torch.randn(2, 4, 32, 32), torch.tensor([1, 1000])
    out = model(z, t)
    assert out["eps"].shape == (2, 4, 32, 32)
    for name in ("masked", "transition"):
        if name in tasks:
            assert out[name].shape == (2, 4, 32, 32)
    if "label" in tasks:
        assert out["label"].shape == (2, 1000)


def test_custom_dims_and_input_shape_override(make_params):
    params = _params(make_params, ("label",), **{"model.hidden_size": 48, "model.num_heads": 3,
                                                  "model.depth": 3, "model.patch_size": 2})
    model = build_model(params, None, 5, input_shape=(3, 8, 12))
    assert len(model.backbone.blocks) == 3 and model.backbone.hidden_size == 48
    assert model.backbone.grid == (4, 6) and model.input_size == (8, 12)
    out = model(torch.randn(2, 3, 8, 12), torch.tensor(7))  # scalar t is broadcast
    assert out["eps"].shape == (2, 3, 8, 12) and out["label"].shape == (2, 5)


def test_bad_inputs_are_named(make_params):
    model = _tiny()
    with pytest.raises(ValueError, match="z_t"):
        model(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t: expected"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="label"):
        model.aggregate({"label": torch.rand(2, NUM_CLASSES + 1)})
    with pytest.raises(ValueError, match="masked"):
        model.aggregate({"masked": torch.randn(2, 1, 14, 14)})
    with pytest.raises(ValueError, match="repr_dim"):
        build_model(_params(make_params, ("representation",)), None, NUM_CLASSES)
    with pytest.raises(ValueError, match="patch_size"):
        build_model(_params(make_params, (), **{"model.patch_size": 5}), None, NUM_CLASSES)


def test_aggregate_int_labels_equal_one_hot_probs():
    model = _tiny(("label",))
    y = torch.tensor([0, 3, 9, 3])
    a_int = model.aggregate({"label": y})
    a_prob = model.aggregate({"label": torch.nn.functional.one_hot(y, NUM_CLASSES).float()})
    assert a_int.shape == (4, 1, 28, 28)
    torch.testing.assert_close(a_int, a_prob, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a_int[0], a_int[1])  # distinct classes, distinct codes
    torch.testing.assert_close(a_int[1], a_int[3])
    # Soft labels give the expected code: a 50/50 mix is the mean of the two codes.
    mix = torch.zeros(1, NUM_CLASSES)
    mix[0, 0] = mix[0, 3] = 0.5
    torch.testing.assert_close(model.aggregate({"label": mix})[0], (a_int[0] + a_int[1]) / 2,
                               rtol=1e-5, atol=1e-5)


def test_aggregate_sums_present_enabled_tasks():
    model = _tiny(("label", "representation", "masked"))
    y, r, m = torch.tensor([1, 2]), torch.randn(2, REPR_DIM), torch.randn(2, 1, 28, 28)
    a = model.aggregate({"label": y, "representation": r, "masked": m})
    expected = model.encode("label", y) + model.encode("representation", r) + m
    torch.testing.assert_close(a, expected)
    # Absent / None / not-enabled keys contribute nothing (M2).
    torch.testing.assert_close(model.aggregate({"label": y, "masked": None, "transition": m}),
                               model.encode("label", y))
    with pytest.raises(KeyError, match="transition"):
        model.aggregate({"label": y, "transition": m}, strict=True)


def test_aggregate_without_tasks_is_zeros():
    model = _tiny(("label",))
    a = model.aggregate({}, batch_size=3)
    assert a.shape == (3, 1, 28, 28) and a.dtype == torch.float32 and not a.any()
    like = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    a = model.aggregate({"label": None}, like=like)
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.float64 and not a.any()
    a = model.aggregate({"something_else": torch.zeros(4)})  # batch size inferred from a tensor
    assert a.shape == (4, 1, 28, 28) and not a.any()
    with pytest.raises(ValueError, match="batch_size"):
        model.aggregate({})
    # No tasks enabled at all: A is always 0 and M1 is plain DDPM.
    assert not _tiny(()).aggregate({"label": torch.tensor([1, 2])}, batch_size=2).any()


def test_encoders_are_unit_rms_and_cannot_collapse():
    model = _tiny(("label", "representation"))
    with torch.no_grad():  # even a tiny table / linear gives unit-RMS codes
        model.encoders["label"].embedding.weight.mul_(1e-4)
        model.encoders["representation"].linear.weight.mul_(1e-3)
    for name, x in (("label", torch.arange(NUM_CLASSES)), ("representation", torch.randn(6, REPR_DIM))):
        e = model.encode(name, x)
        rms = e.square().mean(dim=(1, 2, 3)).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    # Soft labels: expected code, RMS <= 1 (less certain -> weaker signal).
    probs = torch.softmax(torch.randn(4, NUM_CLASSES), dim=1)
    rms = model.encode("label", probs).square().mean(dim=(1, 2, 3)).sqrt()
    assert (rms <= 1 + 1e-5).all() and (rms < 0.999).any()
    x = torch.randn(3, 7, dtype=torch.bfloat16) * 1e-3
    y = rms_normalize(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().square().mean(1), torch.ones(3), rtol=2e-2, atol=2e-2)


def test_zero_init_outputs():
    model = _tiny()
    out = model(torch.randn(4, 1, 28, 28), torch.randint(1, 1001, (4,)))
    assert not out["eps"].any()
    assert not out["masked"].any() and not out["transition"].any()
    torch.testing.assert_close(out["label"], torch.zeros_like(out["label"]))  # uniform class probs
    assert out["representation"].abs().sum() > 0  # the representation head is not zero-init
    for block in model.backbone.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()


def test_gradients_reach_every_head_at_init_and_every_parameter_once_live():
    model = _tiny()

    def loss_of(model):
        z0, t = torch.randn(4, 1, 28, 28), torch.randint(1, 1001, (4,))
        y, r = torch.randint(0, NUM_CLASSES, (4,)), torch.randn(4, REPR_DIM)
        m, s = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
        a = model.aggregate({"label": y, "representation": r, "masked": m, "transition": s})
        noise = torch.randn_like(z0)
        out = model(z0 + 0.1 * a + noise, t)
        return ((out["eps"] - noise).square().mean() + torch.nn.functional.cross_entropy(out["label"], y)
                + (out["representation"] - r).square().mean() + (out["masked"] - m).square().mean()
                + (out["transition"] - s).square().mean())

    loss_of(model).backward()
    for name, module in [("eps", model.eps_head), *model.heads.items()]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    model.zero_grad(set_to_none=True)
    _randomize_zero_inits(model)
    loss_of(model).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_channels_last_and_batch_independence():
    model = _tiny(("label", "masked"))
    _randomize_zero_inits(model)
    model.eval()
    z, t = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 1000])
    ref = model(z, t)
    cl = model(z.contiguous(memory_format=torch.channels_last), t)
    single = model(z[1:2], t[1:2])
    for k in ref:
        torch.testing.assert_close(cl[k], ref[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(single[k], ref[k][1:2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref["eps"][0], model(z[:1], torch.tensor([6]))["eps"][0])  # t matters


def test_tiny_model_learns_labels_from_conditioned_inputs():
    """The label code aggregated into z_t (M3-style) is readable by the label head.

    Every step draws fresh z0 noise, so the label is only recoverable from A: held-out accuracy
    far above chance shows encoder -> z_t -> backbone -> head is a working path.
    """
    model = _tiny(("label",), seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.full((20,), 10)
    for _ in range(50):
        y = torch.randint(0, NUM_CLASSES, (20,), generator=g)
        z_t = torch.randn(20, 1, 28, 28, generator=g) + model.aggregate({"label": y})
        loss = torch.nn.functional.cross_entropy(model(z_t, t)["label"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = torch.arange(40) % NUM_CLASSES
    with torch.no_grad():
        logits = model(torch.randn(40, 1, 28, 28, generator=g) + model.aggregate({"label": y}),
                       torch.full((40,), 10))["label"]
    acc = (logits.argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc


def test_sincos_pos_embed_matches_dit_reference():
    dim, gs = 16, 3
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float64), np.arange(gs, dtype=np.float64)))

    def emb1d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([emb1d(grid[0]), emb1d(grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, gs, gs).numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,patch,tasks", [((1, 28, 28), 4, TASKS), ((4, 16, 16), 2, ("label",)),
                                                ((3, 8, 8), 1, ())])
def test_flops_match_flop_counter(shape, patch, tasks):
    model = _tiny(tasks, shape=shape, patch=patch)
    b = 2
    z, t = torch.randn(b, *shape), torch.randint(1, 1001, (b,))
    # The CPU fused SDPA kernel has no FlopCounterMode formula; the math backend runs the same
    # attention as counted matmuls (Q K^T and A V), so the count covers the whole forward.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(z, t)
    counted = counter.get_total_flops() / b
    analytic = flops_per_image(model)
    assert abs(analytic - counted) / counted < 0.01, (analytic, counted)
    n, d = model.backbone.num_tokens, model.backbone.hidden_size
    assert analytic > 2 * 2 * n * n * d * 2  # includes both attention matmuls of both blocks


def test_count_params():
    model = _tiny(("label",))
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.encoders.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - NUM_CLASSES * 28 * 28


def test_dit_b2_latent_size_matches_dit(make_params):
    params = _params(make_params, ("label",), **LATENT, **{"model.size": "B"})
    with torch.device("meta"):
        model = build_model(params, None, 1000)
    bb = model.backbone
    assert (bb.depth, bb.hidden_size, bb.num_heads, len(bb.blocks)) == (12, 768, 12, 12)
    assert bb.num_tokens == 256
    # DiT-B/2 is 130.5M params = our backbone + eps head (C=4 out, no learned sigma) plus its
    # class embedding (1001 x 768), the sigma half of its final linear, and its pos_embed Parameter.
    ours = count_params(bb) + count_params(model.eps_head)
    dit_b2 = ours + 1001 * 768 + (768 + 1) * 2 * 2 * 4 + 256 * 768
    assert abs(dit_b2 - 130.5e6) / 130.5e6 < 0.002, dit_b2
    assert 129e6 < count_params(model) < 136e6  # + label encoder (1000 x 4096) and label head
    # DiT reports 23.01 GFLOPs (multiply-adds) for DiT-B/2; ours counts 2 per multiply-add.
    backbone_macs = (flops_per_image(model) - 2 * (768 * 256 + 256 * 1000)) / 2
    assert abs(backbone_macs - 23.01e9) / 23.01e9 < 0.01, backbone_macs


def test_compile_fullgraph_matches_eager():
    # fullgraph: no graph break anywhere in the model (what train.compile relies on). Inductor needs
    # a C++ compiler; without one the same capture is checked with the aot_eager backend.
    model = _tiny()
    _randomize_zero_inits(model)
    z, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 5, 999])
    ref = model(z, t)
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    out = torch.compile(model, fullgraph=True, backend=backend)(z, t)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_and_fused_attention_flops():
    model = _tiny().cuda()
    _randomize_zero_inits(model)
    z, t = torch.randn(4, 1, 28, 28, device="cuda"), torch.randint(1, 1001, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(z, t)
        probs = torch.softmax(out["label"], dim=1)  # bf16 soft labels feed back into M2
        a = model.aggregate({"label": probs, "masked": z}, like=z)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    assert a.shape == z.shape and a.dtype == torch.float32
    with FlopCounterMode(display=False) as counter:  # CUDA's fused SDPA kernels are counted
        model(z, t)
    counted = counter.get_total_flops() / 4
    assert abs(flops_per_image(model) - counted) / counted < 0.01


def test_dit_label_feedback_reads_mid_depth_and_conditions_the_later_blocks():
    """With label feedback the label head reads the tokens after the first half of the blocks; its
    softmax, embedded, conditions the rest. Zero-initialised: at init eps equals the plain DiT's."""
    torch.manual_seed(0)
    fed = MTDiT((1, 28, 28), patch_size=4, depth=4, hidden_size=32, num_heads=2, head_hidden=16,
                tasks=("label",), num_classes=NUM_CLASSES, label_feedback=True)
    torch.manual_seed(0)
    plain = MTDiT((1, 28, 28), patch_size=4, depth=4, hidden_size=32, num_heads=2, head_hidden=16,
                  tasks=("label",), num_classes=NUM_CLASSES, label_feedback=False)
    _randomize_zero_inits(plain)
    state = {k: v for k, v in plain.state_dict().items()}
    fed.load_state_dict(state, strict=False)  # all but the (zero) feedback layer
    z, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 10, 500])
    with torch.no_grad():
        assert torch.allclose(fed(z, t)["eps"], plain(z, t)["eps"], atol=1e-6)
        blocks_run = []
        hooks = [b.register_forward_pre_hook(lambda *a: blocks_run.append(1)) for b in fed.backbone.blocks]
        label = fed.head("label", z, t)
        assert len(blocks_run) == fed.backbone.mid == 2  # the evaluation's label head skips the later half
        for h in hooks:
            h.remove()
        assert torch.allclose(label, fed(z, t)["label"], atol=1e-6)
        assert not torch.allclose(label, plain(z, t)["label"])  # read at mid-depth, not at the end
        fed.feedback.weight.normal_(0, 0.5)
        base = fed(z, t)["eps"]
        fed.heads["label"].fc2.bias.add_(torch.arange(NUM_CLASSES, dtype=torch.float32))
        assert not torch.allclose(base, fed(z, t)["eps"])  # eps now follows the label head's prediction
    assert plain.feedback is None


# -- the clean-image classifier (tasks.label.classifier: clean) --------------------------------------
@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_clean_classifier_reads_pooled_features_of_the_clean_image(make_params, backbone):
    over = {"model.backbone": backbone, "model.channels": 8, "model.channel_mult": [1, 2]}
    plain = build_model(_params(make_params, ("label",), **over, **{"tasks.label.classifier": "head"}), None,
                        NUM_CLASSES)
    assert plain.classifier is None
    with pytest.raises(KeyError, match="classifier"):
        plain.classifier_logits(torch.zeros(2, 1, 28, 28))
    params = _params(make_params, ("label",), **over, **{"tasks.label.classifier": "clean",
                                                          "tasks.label.classifier_dropout": 0.3})
    torch.manual_seed(0)
    model = build_model(params, None, NUM_CLASSES).eval()
    assert model.classifier.net[3].p == 0.3
    z0 = torch.randn(3, 1, 28, 28)
    t0 = torch.zeros(3, dtype=torch.long)
    feats = model.pooled_features(z0, t0)
    # U-Net: every encoder map and the middle, one mean per channel; DiT: the first half's blocks
    width = model.backbone.pooled_channels if backbone == "unet" else model.backbone.pooled_blocks * 32
    assert feats.shape == (3, width) and model.classifier.net[0].normalized_shape == (width,)
    logits = model.classifier_logits(z0)
    assert logits.shape == (3, NUM_CLASSES)
    torch.testing.assert_close(logits, model.classifier(feats))
    # per image: a batch of one gives the same logits (no batch statistics, LayerNorm not BatchNorm)
    torch.testing.assert_close(model.classifier_logits(z0[1:2]), logits[1:2], rtol=1e-4, atol=1e-5)
    # the reverse process' forward is unchanged: the classifier is no head of z_t
    assert set(model(z0, torch.ones(3, dtype=torch.long))) == {"eps", "label"}


def test_unet_pooled_features_are_the_encoder_maps_means(make_params):
    params = _params(make_params, ("label",), **{"model.backbone": "unet", "model.channels": 8,
                                                 "model.channel_mult": [1, 2], "tasks.label.classifier": "clean"})
    torch.manual_seed(0)
    model = build_model(params, None, NUM_CLASSES).eval()
    z0, t0 = torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    bottleneck, hs, _ = model.backbone.encode(z0, t0)
    expected = torch.cat([h.mean(dim=(2, 3)) for h in [*hs, bottleneck]], dim=1)
    torch.testing.assert_close(model.pooled_features(z0, t0), expected)
    assert expected.shape[1] == sum(h.shape[1] for h in hs) + bottleneck.shape[1]
