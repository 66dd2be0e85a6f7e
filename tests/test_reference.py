"""The library references (model.backbone: reference_unet, reference_dit) and the U-Net's norm-groups lever."""
from __future__ import annotations

import math

import pytest
import torch

from mtdiff.config import ConfigError, DiffusionConfig, TasksConfig
from mtdiff.diffusion import MTDiffusion, Sampler
from mtdiff.diffusion.sampler import ClassifierFreeGuidance
from mtdiff.models import TASKS, MTUNet, build_model, flops_per_image
from mtdiff.models.reference import ReferenceDiT, ReferenceUNet

NUM_CLASSES = 10
OFF = {f"tasks.{n}.enabled": False for n in TASKS}


def _reference(class_conditional=True, seed=0) -> ReferenceUNet:
    torch.manual_seed(seed)
    return ReferenceUNet((1, 28, 28), base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                         num_classes=NUM_CLASSES, class_conditional=class_conditional, class_dropout=0.1)


def test_reference_is_diffusers_unet2dmodel_fed_zero_based_timesteps():
    from diffusers import UNet2DModel

    model = _reference().eval()
    unet = model.unet
    assert isinstance(unet, UNet2DModel)
    assert tuple(unet.config.block_out_channels) == (16, 32, 32) and unet.config.layers_per_block == 1
    assert unet.config.norm_num_groups == 8 and unet.config.num_class_embeds == NUM_CLASSES + 1
    assert set(unet.config.down_block_types) == {"DownBlock2D"} and set(unet.config.up_block_types) == {"UpBlock2D"}
    z, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 1000]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        out = model(z, t, y)
        assert list(out) == ["eps"] and out["eps"].shape == z.shape
        assert torch.equal(out["eps"], unet(z, t - 1, class_labels=y).sample)
        # no label: the null label (the CFG unconditional pass), as MTUNet's baseline
        assert torch.equal(model(z, t)["eps"], model(z, t, torch.full_like(y, NUM_CLASSES))["eps"])
        assert not torch.allclose(model(z, t)["eps"], out["eps"])


def test_reference_trains_and_samples_through_the_project_code():
    model = _reference()
    diff = MTDiffusion(DiffusionConfig(timesteps=50))
    tasks = TasksConfig(label={"enabled": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    res = diff.training_losses(model, torch.randn(8, 1, 28, 28, generator=g), {"class_label": y}, tasks, generator=g)
    assert set(res) == {"loss", "eps"}
    res["loss"].backward()
    assert all(p.grad is not None for p in model.unet.parameters() if p.requires_grad)
    opt.step()
    sampler = Sampler(diff, "ddim", steps=3, guidance=(ClassifierFreeGuidance(2.0),))
    out = sampler(model.eval(), (4, 1, 28, 28), {"label": y[:4]}, tasks=tasks,
                  generator=torch.Generator().manual_seed(1))
    assert out["z0"].shape == (4, 1, 28, 28) and torch.equal(out["label"], y[:4])


def test_build_model_reference_and_its_validation(make_params):
    params = make_params({**OFF, "model.backbone": "reference_unet", "model.class_conditional": True,
                          "model.channels": 16})
    model = build_model(params, None, NUM_CLASSES)
    assert isinstance(model, ReferenceUNet) and model.class_conditional
    assert flops_per_image(model) > 1e6
    with pytest.raises(ConfigError, match="reference_unet.*label"):
        make_params({"model.backbone": "reference_unet"})  # the default run's label task is on
    with pytest.raises(ConfigError, match="model.backbone"):
        make_params({**OFF, "model.backbone": "diffusers", "sample.condition": "uncond"})


@pytest.mark.parametrize("groups", [8, 32, 12])
def test_norm_groups_sets_every_groupnorm(make_params, groups):
    """Every GroupNorm of the U-Net (trunk, attention, heads) takes gcd(model.norm_groups, channels)."""
    params = make_params({"model.norm_groups": groups, "model.channel_mult": [1, 2, 3]})
    model = build_model(params, None, NUM_CLASSES)
    assert isinstance(model, MTUNet)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 20 and {n.num_channels for n in norms} >= {32, 64, 96}
    for norm in norms:
        assert norm.num_groups == math.gcd(groups, norm.num_channels), (norm.num_channels, norm.num_groups)
    first = model.backbone.down[0].res[0].in_layers[0]
    assert first.num_channels == 32 and first.num_groups == {8: 8, 32: 32, 12: 4}[groups]


def _reference_dit(seed=0) -> "ReferenceDiT":
    torch.manual_seed(seed)
    return ReferenceDiT((1, 28, 28), patch_size=4, depth=2, hidden_size=64, num_heads=4,
                        num_classes=NUM_CLASSES, class_dropout=0.1)


def test_reference_dit_is_diffusers_dit_fed_zero_based_timesteps_without_its_own_label_dropout():
    from diffusers import DiTTransformer2DModel

    model = _reference_dit().train()  # train mode: diffusers would drop labels here by itself
    dit = model.dit
    assert isinstance(dit, DiTTransformer2DModel)
    assert dit.config.num_layers == 2 and dit.config.patch_size == 4 and dit.inner_dim == 64
    z, t, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 500, 1000]), torch.tensor([0, 4, 9])
    torch.manual_seed(1)
    out = model(z, t, y)["eps"]
    torch.manual_seed(2)  # a label dropout of its own would draw other labels under another seed
    assert torch.equal(model(z, t, y)["eps"], out) and out.shape == z.shape
    assert torch.equal(out, dit(z, timestep=t - 1, class_labels=y).sample)
    null = torch.full_like(y, NUM_CLASSES)  # the CFG unconditional pass: the last row of its table
    assert torch.equal(model(z, t)["eps"], model(z, t, null)["eps"])


def test_build_model_reference_dit_trains_and_its_validation(make_params):
    params = make_params({**OFF, "model.backbone": "reference_dit", "model.class_conditional": True,
                          "model.depth": 2, "model.hidden_size": 64, "sample.condition": "label"})
    model = build_model(params, None, NUM_CLASSES)
    assert isinstance(model, ReferenceDiT) and flops_per_image(model) > 1e6
    diff = MTDiffusion(DiffusionConfig(timesteps=50))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (4,), generator=g)
    res = diff.training_losses(model, torch.randn(4, 1, 28, 28, generator=g), {"class_label": y},
                               TasksConfig(label={"enabled": False}), generator=g)
    res["loss"].backward()
    assert all(p.grad is not None for p in model.dit.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="reference_dit.*class-conditional"):
        make_params({**OFF, "model.backbone": "reference_dit", "sample.condition": "uncond"})
