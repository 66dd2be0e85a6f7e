"""U-Net backbone, the class-conditional baseline, label feedback, guidance and the sigma w-schedule."""
from __future__ import annotations

import itertools

import pytest
import torch

from mtdiff.config import DiffusionConfig, TasksConfig
from mtdiff.diffusion import MTDiffusion, Sampler
from mtdiff.diffusion.sampler import ClassifierFreeGuidance, TaskGuidance, timestep_sequence
from mtdiff.diffusion.schedules import build_schedule, make_w
from mtdiff.models import TASKS, MTUNet, build_model, flops_per_image

NUM_CLASSES, REPR_DIM = 10, 12
SMALL = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), num_heads=2,
             head_hidden=32)


def _unet(tasks=TASKS, seed=0, **kw) -> MTUNet:
    torch.manual_seed(seed)
    return MTUNet((1, 28, 28), tasks=tasks, num_classes=NUM_CLASSES, repr_dim=REPR_DIM, **{**SMALL, **kw})


def _randomize_zero_inits(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)


@pytest.mark.parametrize("tasks", [c for r in range(len(TASKS) + 1) for c in itertools.combinations(TASKS, r)],
                         ids=lambda c: "+".join(c) or "none")
def test_unet_output_shapes_every_task_combination(tasks):
    model = _unet(tasks)
    out = model(torch.randn(3, 1, 28, 28), torch.randint(1, 1001, (3,)))
    expected = {"eps": (3, 1, 28, 28), "label": (3, NUM_CLASSES), "representation": (3, REPR_DIM),
                "masked": (3, 1, 28, 28), "transition": (3, 1, 28, 28)}
    assert list(out) == ["eps", *tasks]
    for k, v in out.items():
        assert tuple(v.shape) == expected[k] and torch.isfinite(v).all(), k


def test_unet_zero_init_heads_and_every_parameter_gets_gradient():
    model = _unet(("label", "masked"))
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([5, 900]))
    assert torch.count_nonzero(out["eps"]) == 0  # ADM zero init: eps head predicts 0 at start
    assert torch.allclose(out["label"], torch.zeros_like(out["label"]))  # uniform logits at init
    _randomize_zero_inits(model)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([5, 900]))
    (out["eps"].square().mean() + out["label"].logsumexp(-1).mean() + out["masked"].mean()).backward()
    dead = [n for n, p in model.named_parameters()
            if not n.startswith("encoders") and (p.grad is None or torch.count_nonzero(p.grad) == 0)]
    assert dead == []


@pytest.mark.parametrize("label_feedback", [False, True])
def test_unet_head_skips_the_decoder_and_equals_forward(label_feedback):
    """``model.head`` (evaluation's label accuracy) runs the encoder half only, with forward's values."""
    model = _unet(TASKS, label_feedback=label_feedback).eval()
    _randomize_zero_inits(model)
    z, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 10, 500])
    with torch.no_grad():
        full = model(z, t)
        decoder_calls = []
        hooks = [res.register_forward_pre_hook(lambda *a: decoder_calls.append(1))
                 for level in model.backbone.up for res in level.res]
        for name in ("label", "representation"):
            assert torch.allclose(model.head(name, z, t), full[name], atol=1e-6), name
        assert decoder_calls == []
        model(z, t)
        assert decoder_calls  # the hooks do see the decoder when it runs
        for h in hooks:
            h.remove()
        assert torch.equal(model.head("masked", z, t), full["masked"])  # an image head: the whole forward
    with pytest.raises(KeyError, match="no label head"):
        _unet(("masked",)).head("label", z, t)


def test_label_feedback_conditions_the_decoder_on_the_label_head():
    model = _unet(("label",), label_feedback=True)
    _randomize_zero_inits(model)
    z, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 500])
    base = model(z, t)
    with torch.no_grad():  # change only the label head's output layer: eps must change through feedback
        model.heads["label"].fc2.bias.add_(torch.arange(NUM_CLASSES, dtype=torch.float32))
    moved = model(z, t)
    assert not torch.allclose(base["eps"], moved["eps"])
    plain = _unet(("label",), label_feedback=False)
    assert not hasattr(plain.backbone.feedback, "weight")  # no feedback layer without the option


def test_class_conditional_baseline_uses_label_and_null_label():
    model = _unet((), class_conditional=True, class_dropout=0.1)
    _randomize_zero_inits(model)
    z, t = torch.randn(2, 1, 28, 28), torch.tensor([300, 300])
    a = model(z, t, torch.tensor([0, 0]))["eps"]
    b = model(z, t, torch.tensor([7, 7]))["eps"]
    null = model(z, t)["eps"]  # no label: the null class
    assert not torch.allclose(a, b) and not torch.allclose(a, null)
    assert torch.allclose(null, model(z, t, torch.tensor([NUM_CLASSES, NUM_CLASSES]))["eps"])


def test_build_model_picks_backbone_and_counts_flops(make_params):
    off = {f"tasks.{n}.enabled": False for n in TASKS}
    unet = build_model(make_params({**off, "model.backbone": "unet", "model.channels": 16,
                                    "sample.condition": "uncond"}), None, NUM_CLASSES)
    assert isinstance(unet, MTUNet) and unet.backbone.base_channels == 16
    assert flops_per_image(unet) > 1e6
    cc = build_model(make_params({**off, "model.class_conditional": True, "model.channels": 16}), None, NUM_CLASSES)
    assert cc.class_conditional and cc.class_dropout == 0.1


def test_training_losses_class_conditional_drops_labels_to_null():
    class Recorder(torch.nn.Module):
        class_conditional, class_dropout, num_classes, task_names = True, 0.5, NUM_CLASSES, []

        def __init__(self):
            super().__init__()
            self.seen = []

        def aggregate(self, inputs):
            raise AssertionError("no task input to aggregate")

        def forward(self, z, t, class_labels=None):
            self.seen.append(class_labels)
            return {"eps": torch.zeros_like(z)}

    model, diff = Recorder(), MTDiffusion(DiffusionConfig(timesteps=50))
    y = torch.randint(0, NUM_CLASSES, (400,), generator=torch.Generator().manual_seed(0))
    tasks = TasksConfig(label={"enabled": False})
    diff.training_losses(model, torch.randn(400, 1, 4, 4), {"class_label": y}, tasks,
                         generator=torch.Generator().manual_seed(1))
    seen = model.seen[0]
    dropped = seen == NUM_CLASSES
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(seen[~dropped], y[~dropped])


def test_cfg_sampling_combines_conditional_and_null_predictions():
    model = _unet((), class_conditional=True).eval()
    _randomize_zero_inits(model)
    diff = MTDiffusion(DiffusionConfig(timesteps=20))
    y = torch.tensor([1, 2, 3])
    tc = TasksConfig(label={"enabled": False})

    def sample(given, scale=1.0):
        sampler = Sampler(diff, "ddim", steps=4, eta=0.0, guidance=(ClassifierFreeGuidance(scale),))
        return sampler(model, (3, 1, 28, 28), given, tasks=tc, generator=torch.Generator().manual_seed(0))

    z = {s: sample({"label": y}, s)["z0"] for s in (0.0, 1.0, 3.0)}
    null = sample({})["z0"]
    assert torch.allclose(z[0.0], null, atol=1e-5)  # scale 0: the unconditional model
    assert not torch.allclose(z[1.0], z[3.0])
    out = sample({"label": y})
    assert torch.equal(out["label"], y)


def test_task_guidance_one_is_plain_conditioning_and_other_scales_move_samples():
    model = _unet(("label",), label_feedback=True).eval()
    _randomize_zero_inits(model)
    diff = MTDiffusion(DiffusionConfig(timesteps=20, w_schedule="sigma", w_max=0.5))
    y = torch.tensor([1, 2, 3])

    def sample(*guidance):
        sampler = Sampler(diff, "ddim", steps=4, eta=0.0, guidance=guidance)
        return sampler(model, (3, 1, 28, 28), {"label": y}, tasks=TasksConfig(),
                       generator=torch.Generator().manual_seed(0))["z0"]

    plain, one, two = sample(), sample(TaskGuidance(1.0)), sample(TaskGuidance(2.0))
    assert torch.equal(plain, one) and not torch.allclose(one, two)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_sigma_w_schedule_keeps_task_signal_a_fixed_fraction_of_the_noise(beta_schedule):
    sch = build_schedule(DiffusionConfig(timesteps=200, beta_schedule=beta_schedule, w_schedule="sigma", w_max=0.4))
    ratio = sch.c[1:] / sch.sqrt_one_minus_abar[1:]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.4), atol=1e-9)
    assert (sch.w[1:] > 0).all()  # a forward process that only adds task information (M1)
    w = make_w("sigma", 200, 0.4, sch.alphas[1:])
    assert torch.allclose(w, sch.w[1:])


def test_label_dropout_takes_the_label_code_out_of_a_for_a_fraction_of_examples():
    model = _unet(("label",))
    diff = MTDiffusion(DiffusionConfig(timesteps=50, w_schedule="sigma", w_max=0.5))
    seen = []
    model.aggregate = lambda inputs, _agg=model.aggregate: seen.append(inputs["label"]) or _agg(inputs)
    y = torch.randint(0, NUM_CLASSES, (300,), generator=torch.Generator().manual_seed(0))
    tc = TasksConfig(label={"enabled": True, "dropout": 0.3})
    losses = diff.training_losses(model, torch.randn(300, 1, 28, 28), {"label": y}, tc,
                                  generator=torch.Generator().manual_seed(1))
    probs = seen[0]
    absent = probs.sum(-1) == 0
    assert 0.2 < absent.float().mean() < 0.4
    assert torch.equal(probs[~absent].argmax(-1), y[~absent])  # kept rows: the one-hot label
    assert torch.count_nonzero(model.aggregate({"label": probs[absent]})) == 0  # absent: code 0 (M2)
    assert torch.isfinite(losses["label"])  # the head still learns every label


def test_two_pass_task_guidance_extrapolates_from_the_label_absent_prediction():
    model = _unet(("label",)).eval()
    _randomize_zero_inits(model)
    diff = MTDiffusion(DiffusionConfig(timesteps=20, w_schedule="sigma", w_max=0.5))
    y = torch.tensor([1, 2, 3])
    calls = []
    forward = model.forward
    model.forward = lambda z, t, *a: calls.append(z.clone()) or forward(z, t, *a)

    def sample(*guidance):
        sampler = Sampler(diff, "ddim", steps=2, eta=0.0, guidance=guidance)
        return sampler(model, (3, 1, 28, 28), {"label": y}, tasks=TasksConfig(),
                       generator=torch.Generator().manual_seed(0))["z0"]

    guided = sample(TaskGuidance(3.0))
    assert len(calls) == 2 and calls[0].shape[0] == 6  # two steps, label given and absent in one batch
    c_T = float(diff.schedule.c[20])
    assert torch.allclose(calls[0][3:], calls[0][:3] - c_T * model.aggregate({"label": y}), atol=1e-5)
    # the same as the two passes one after the other: eps = eps_absent + s (eps_given - eps_absent)
    model.forward = forward
    c_t = {t: float(diff.schedule.c[t]) for t in timestep_sequence(diff.T, 2)}
    code = model.aggregate({"label": y})

    def two_pass(z, t, *a):
        given = forward(z, t, *a)
        absent = forward(z - c_t[int(t[0])] * code, t, *a)
        return {**given, "eps": absent["eps"] + 3.0 * (given["eps"] - absent["eps"])}
    model.forward = two_pass
    reference = sample()
    assert torch.allclose(guided, reference, atol=1e-5)


@pytest.mark.parametrize("guidance", [TaskGuidance(2.0), ClassifierFreeGuidance(3.0)], ids=["task", "cfg"])
def test_forward_batch_splits_the_network_calls_and_keeps_the_samples(guidance):
    """``sample.forward_batch``: guidance's doubled batch (2 x 5 images) in calls of at most 3; same samples."""
    cfg = isinstance(guidance, ClassifierFreeGuidance)
    model = _unet(() if cfg else ("label",), class_conditional=cfg).eval()
    _randomize_zero_inits(model)
    diff = MTDiffusion(DiffusionConfig(timesteps=20, w_schedule="sigma", w_max=0.5))

    def sample(forward_batch):
        sampler = Sampler(diff, "ddim", steps=3, eta=1.0, guidance=(guidance,), forward_batch=forward_batch)
        return sampler(model, (5, 1, 28, 28), {"label": torch.arange(5)}, tasks=TasksConfig(label={"enabled": not cfg}),
                       generator=torch.Generator().manual_seed(0))

    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    one = sample(None)
    assert calls == [10, 10, 10]
    calls.clear()
    split = sample(3)
    hook.remove()
    assert calls == [3, 3, 3, 1] * 3
    assert one.keys() == split.keys()
    for k in one:
        assert torch.allclose(one[k].double(), split[k].double(), atol=1e-5), k
