"""MT-Diffusion math: schedules, forward (M1, M3), posterior (M4), loss (M5), samplers, classifier.

Uses a small stand-in model implementing the model API (``model(z_t, t) -> dict``,
``model.aggregate(inputs) -> A``, ``model.task_names``), never the real DiT.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtdiff.config import DiffusionConfig, TasksConfig
from mtdiff.data import random_patch_mask
from mtdiff.diffusion import MTDiffusion, Sampler, c_closed_form, c_recursion, make_betas, make_w
from mtdiff.diffusion.sampler import LABEL_POLICIES, Absent, DrawnLabel, PatchMasked, timestep_sequence
from mtdiff.models.tasks import TaskModel

F64 = torch.float64
SHAPE = (1, 4, 4)  # C, H, W of the toy "images"
K, D = 3, 5        # classes, representation size


def cfg(**kw) -> DiffusionConfig:
    base = dict(timesteps=50, beta_schedule="linear", beta_start=1e-4, beta_end=0.05, w_schedule="linear",
                w_max=0.5, prediction="eps", mode="pixel")
    base.update(kw)
    return DiffusionConfig(**base)


def tasks(*names: str, rep_loss: str = "mse", label_dropout: float = 0.0) -> TasksConfig:
    on = set(names)
    return TasksConfig.model_validate({
        "label": {"enabled": "label" in on, "weight": 0.3, "dropout": label_dropout},
        "representation": {"enabled": "representation" in on, "weight": 0.2, "loss": rep_loss},
        "masked": {"enabled": "masked" in on, "weight": 0.5, "mask_ratio": 0.5},
        "transition": {"enabled": "transition" in on, "weight": 0.7},
    })


class ToyModel(nn.Module):
    """A tiny MLP with the MT-Diffusion model API: shared trunk, eps head and one head per task."""

    def __init__(self, task_names=("label",), T: int = 50, hidden: int = 64, shape=SHAPE):
        super().__init__()
        self.shape, self.T = shape, T
        n = math.prod(shape)
        self.task_names = list(task_names)
        self.label_emb = nn.Embedding(K, n)
        self.rep_proj = nn.Linear(D, n)
        self.trunk = nn.Sequential(nn.Linear(n + 16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({"eps": nn.Linear(hidden, n)})
        sizes = {"label": K, "representation": D, "masked": n, "transition": n}
        for name in self.task_names:
            self.heads[name] = nn.Linear(hidden, sizes[name])

    head = TaskModel.head  # one head's output: here the whole forward, as for a DiT

    def aggregate(self, inputs: dict) -> torch.Tensor:  # (M2)
        B = next(iter(inputs.values())).shape[0]
        A = torch.zeros(B, math.prod(self.shape), device=self.label_emb.weight.device)
        for name, x in inputs.items():
            if name == "label":
                A = A + (self.label_emb(x) if not x.is_floating_point() else x @ self.label_emb.weight)
            elif name == "representation":
                A = A + self.rep_proj(x)
            else:
                A = A + x.flatten(1)
        return A.view(B, *self.shape)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> dict:
        freqs = torch.arange(8, device=z_t.device, dtype=torch.float32)
        ang = t.float().view(-1, 1) / self.T * (2.0 ** freqs) * math.pi / 2
        h = self.trunk(torch.cat([z_t.flatten(1).float(), ang.sin(), ang.cos()], dim=1))
        out = {}
        for name, head in self.heads.items():
            y = head(h)
            out[name] = y.view(-1, *self.shape) if name in ("eps", "masked", "transition") else y
        return out


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread avoids OpenMP contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- schedules
def test_schedules_endpoints_and_diffusers_betas():
    from diffusers import DDPMScheduler

    lin = make_betas("linear", 50, 1e-4, 0.05)
    assert lin.dtype == F64 and lin.shape == (50,)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.05)
    cos = make_betas("cosine", 50)
    assert cos.max().item() == pytest.approx(0.999)  # the clip bites at t = T
    ref = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2").betas.double()
    assert torch.allclose(cos, ref, atol=1e-6)
    ref_lin = DDPMScheduler(num_train_timesteps=50, beta_start=1e-4, beta_end=0.05).betas.double()
    assert torch.allclose(lin, ref_lin, atol=1e-7)

    w = make_w("linear", 50, 0.4)
    assert w[0].item() == 0 and w[-1].item() == pytest.approx(0.4) and bool((w.diff() > 0).all())
    assert torch.all(make_w("constant", 50, 0.4) == 0.4)
    wc = make_w("cosine", 50, 0.4)
    assert wc[0].item() == 0 and wc[-1].item() == pytest.approx(0.4) and wc[24].item() < 0.2
    with pytest.raises(ValueError, match="w_schedule"):
        make_w("exp", 50, 0.4)
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas("quadratic", 50)

    s = MTDiffusion(cfg()).schedule
    assert s.abar[0].item() == 1.0 and s.c[0].item() == 0.0 and s.w[0].item() == 0.0
    assert all(v.dtype == F64 and v.shape == (51,) for v in s.tables().values())
    assert bool((s.abar.diff() < 0).all())


@pytest.mark.parametrize("beta", ["linear", "cosine"])
@pytest.mark.parametrize("w", ["linear", "constant", "cosine"])
def test_forward_c_recursion_equals_m3_sum(beta, w):
    s = MTDiffusion(cfg(beta_schedule=beta, w_schedule=w)).schedule
    closed = c_closed_form(s.abar, s.w[1:])
    assert torch.allclose(s.c, closed, rtol=1e-12, atol=1e-12)
    assert torch.allclose(c_recursion(s.alphas[1:], s.w[1:]), closed, rtol=1e-12, atol=1e-12)
    assert s.c[-1] > 0


# ----------------------------------------------------------------------------- forward (M1, M3)
@pytest.mark.parametrize("w", ["linear", "constant", "cosine"])
def test_forward_m3_matches_monte_carlo_of_m1_chain(w):
    """Empirical moments of the step-by-step (M1) chain equal (M3) at every t."""
    diff = MTDiffusion(cfg(w_schedule=w, w_max=1.0))
    N = 20000
    g = torch.Generator().manual_seed(0)
    z0_vec = torch.tensor([0.3, -0.7, 1.0, 0.0], dtype=F64)
    A_vec = torch.tensor([1.0, -2.0, 0.5, 0.8], dtype=F64)
    z0, A = z0_vec.expand(N, 4).clone(), A_vec.expand(N, 4).clone()
    z = z0.clone()
    worst = 0.0
    for t in range(1, diff.T + 1):
        z = diff.q_step(z, A, t, generator=g)
        mean, var = diff.q_mean_variance(z0[:1], A[:1], t)
        var = var.item()
        mean_err = (z.mean(0) - mean[0]).abs().max().item() / math.sqrt(var / N)
        var_err = (z.var(0) - var).abs().max().item() / (var * math.sqrt(2 / N))
        worst = max(worst, mean_err, var_err)
    assert worst < 5.0, f"(M3) disagrees with the (M1) chain: worst deviation {worst:.1f} standard errors"
    # the task information moved the mean far away from plain DDPM's sqrt(abar_T) z0
    assert (mean[0] - diff.schedule.sqrt_abar[-1] * z0_vec).abs().max() > 1.0


def test_forward_y_space_is_ddpm_chain():
    """y_t = z_t - c_t A follows DDPM exactly: y_t = sqrt(alpha_t) y_{t-1} + sqrt(1-alpha_t) noise."""
    diff = MTDiffusion(cfg(w_max=0.8))
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(8, *SHAPE, dtype=F64, generator=g)
    A = torch.randn(8, *SHAPE, dtype=F64, generator=g)
    z, y = z0.clone(), z0.clone()
    s = diff.schedule
    for t in range(1, diff.T + 1):
        noise = torch.randn(z.shape, dtype=F64, generator=g)
        z = diff.q_step(z, A, t, noise=noise)
        y = s.alphas[t].sqrt() * y + s.betas[t].sqrt() * noise
        assert torch.allclose(z - s.c[t] * A, y, atol=1e-10)


def test_forward_q_sample_uses_closed_form_and_input_dtype():
    diff = MTDiffusion(cfg())
    z0 = torch.randn(4, *SHAPE)
    A = torch.randn(4, *SHAPE)
    noise = torch.randn(4, *SHAPE)
    t = torch.tensor([1, 7, 30, 50])
    z = diff.q_sample(z0, A, t, noise=noise)
    assert z.dtype == torch.float32
    s = diff.schedule
    ref = torch.stack([s.sqrt_abar[k] * z0[i].double() + s.c[k] * A[i].double()
                       + s.sqrt_one_minus_abar[k] * noise[i].double() for i, k in enumerate(t.tolist())])
    assert torch.allclose(z.double(), ref, atol=1e-5)
    assert diff.q_sample(z0.double(), A.double(), t, noise=noise.double()).dtype == F64


def test_forward_rejects_bad_timesteps():
    diff = MTDiffusion(cfg())
    z0 = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        diff.q_sample(z0, None, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        diff.q_sample(z0, None, 51)
    with pytest.raises(TypeError, match="integer"):
        diff.q_sample(z0, None, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        diff.q_sample(z0, None, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="A has shape"):
        diff.q_sample(z0, torch.zeros(2, 2, 4, 4), 3)


# ----------------------------------------------------------------------------- posterior (M4)
@pytest.mark.parametrize("t", [2, 10, 50])
def test_posterior_m4_matches_monte_carlo_regression(t):
    """Regressing z_{t-1} on z_t over chain samples recovers (M4)'s mean coefficients and variance."""
    diff = MTDiffusion(cfg(w_schedule="constant", w_max=1.0))
    N = 20000
    g = torch.Generator().manual_seed(t)
    z0_vec = torch.tensor([0.3, -0.7, 1.0, 0.0], dtype=F64)
    A_vec = torch.tensor([1.0, -2.0, 0.5, 0.8], dtype=F64)
    z0, A = z0_vec.expand(N, 4).clone(), A_vec.expand(N, 4).clone()
    z_prev = z0.clone()
    for k in range(1, t):
        z_prev = diff.q_step(z_prev, A, k, generator=g)
    z_t = diff.q_step(z_prev, A, t, generator=g)
    # per-dimension OLS of z_{t-1} on z_t (z0 is fixed, so E[z_{t-1}|z_t] is affine in z_t)
    zc, pc = z_t - z_t.mean(0), z_prev - z_prev.mean(0)
    slope = (zc * pc).mean(0) / (zc * zc).mean(0)
    intercept = z_prev.mean(0) - slope * z_t.mean(0)
    resid_var = (pc - slope * zc).var(0)

    s = diff.schedule
    mean0, var, log_var = diff.posterior(torch.zeros(1, 4, dtype=F64), z0[:1], A[:1], t)
    mean1, _, _ = diff.posterior(torch.ones(1, 4, dtype=F64), z0[:1], A[:1], t)
    m4_slope, m4_intercept = (mean1 - mean0)[0], mean0[0]
    assert torch.allclose(m4_slope, torch.full((4,), float(s.posterior_coef_zt[t]), dtype=F64))
    assert var.item() == pytest.approx(float((1 - s.abar[t - 1]) * s.betas[t] / (1 - s.abar[t])))
    assert torch.allclose(slope, m4_slope, atol=0.03), (slope, m4_slope)
    assert torch.allclose(intercept, m4_intercept, atol=0.06), (intercept, m4_intercept)
    assert torch.allclose(resid_var, var.flatten().expand(4), rtol=0.05), (resid_var, var)
    if t > 1:
        assert log_var.item() == pytest.approx(math.log(var.item()))


def test_posterior_is_ddpm_posterior_in_y_space():
    diff = MTDiffusion(cfg(beta_schedule="cosine", w_schedule="cosine", w_max=0.7))
    g = torch.Generator().manual_seed(2)
    z_t, z0, A = (torch.randn(6, *SHAPE, dtype=F64, generator=g) for _ in range(3))
    s = diff.schedule
    for t in [1, 2, 17, 50]:
        mean, var, log_var = diff.posterior(z_t, z0, A, t)
        ab_t, ab_p, a_t = s.abar[t], s.abar[t - 1], s.alphas[t]
        y_t = z_t - s.c[t] * A
        ddpm_mean = ab_p.sqrt() * (1 - a_t) / (1 - ab_t) * z0 + a_t.sqrt() * (1 - ab_p) / (1 - ab_t) * y_t
        assert torch.allclose(mean, ddpm_mean + s.c[t - 1] * A, atol=1e-10)
    # t = 1: the posterior collapses on z0 (no noise), log-variance clipped to t = 2's
    mean, var, log_var = diff.posterior(z_t, z0, A, 1)
    assert torch.allclose(mean, z0, atol=1e-12) and var.abs().max().item() == 0
    assert log_var.flatten()[0].item() == pytest.approx(math.log(float(s.posterior_variance[2])))


def test_posterior_and_forward_without_tasks_equal_plain_ddpm():
    """A = 0 (no extra task): q_sample is diffusers' add_noise and (M4) is Ho et al.'s eq. 7."""
    from diffusers import DDPMScheduler

    c = cfg(beta_end=0.02, w_max=0.9)
    diff = MTDiffusion(c)
    sched = DDPMScheduler(num_train_timesteps=c.timesteps, beta_start=c.beta_start, beta_end=c.beta_end)
    g = torch.Generator().manual_seed(3)
    z0, noise, z_t = (torch.randn(5, *SHAPE, generator=g) for _ in range(3))
    t = torch.tensor([1, 2, 20, 49, 50])
    zero = torch.zeros_like(z0)
    ours = diff.q_sample(z0, None, t, noise=noise)
    assert torch.allclose(ours, diff.q_sample(z0, zero, t, noise=noise))
    assert torch.allclose(ours, sched.add_noise(z0, noise, t - 1), atol=1e-5)

    betas = torch.linspace(c.beta_start, c.beta_end, c.timesteps, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    mean, var, _ = diff.posterior(z_t.double(), z0.double(), None, t)
    for i, k in enumerate((t - 1).tolist()):  # 0-based k as in Ho et al.
        ab_prev = abar[k - 1] if k > 0 else torch.tensor(1.0, dtype=F64)
        ref_mean = (ab_prev.sqrt() * betas[k] / (1 - abar[k]) * z0[i].double()
                    + (1 - betas[k]).sqrt() * (1 - ab_prev) / (1 - abar[k]) * z_t[i].double())
        assert torch.allclose(mean[i], ref_mean, atol=1e-10)
        assert var[i].item() == pytest.approx(float((1 - ab_prev) / (1 - abar[k]) * betas[k]), abs=1e-15)


def test_predict_z0_and_eps_invert_q_sample():
    for prediction in ("eps", "z0"):
        diff = MTDiffusion(cfg(prediction=prediction))
        g = torch.Generator().manual_seed(4)
        z0, A, noise = (torch.randn(4, *SHAPE, dtype=F64, generator=g) for _ in range(3))
        t = torch.tensor([1, 5, 25, 50])
        z_t = diff.q_sample(z0, A, t, noise=noise)
        head = noise if prediction == "eps" else z0
        assert torch.allclose(diff.predict_z0(z_t, head, A, t), z0, atol=1e-8)
        assert torch.allclose(diff.predict_z0(z_t, {"eps": head}, A, t), z0, atol=1e-8)
        assert torch.allclose(diff.predict_eps(z_t, z0, A, t), noise, atol=1e-8)
    # ignoring A would give a wrong z0: the c_t A shift matters
    diff = MTDiffusion(cfg())
    z_t = diff.q_sample(z0, A, t, noise=noise)
    assert not torch.allclose(diff.predict_z0(z_t, noise, None, t), z0, atol=1e-3)


# ----------------------------------------------------------------------------- loss (M5)
def test_training_losses_returns_each_task_term_matching_m5():
    torch.manual_seed(0)
    names = ("label", "representation", "masked", "transition")
    model = ToyModel(names)
    diff = MTDiffusion(cfg())
    g = torch.Generator().manual_seed(5)
    B = 8
    z0 = torch.randn(B, *SHAPE, generator=g)
    mask = (torch.rand(B, *SHAPE, generator=g) > 0.5).float()
    targets = {"label": torch.randint(0, K, (B,), generator=g), "representation": torch.randn(B, D, generator=g),
               "masked": z0 * mask, "transition": torch.randn(B, *SHAPE, generator=g)}
    t = torch.randint(1, 51, (B,), generator=g)
    noise = torch.randn(B, *SHAPE, generator=g)

    for rep_loss in ("mse", "cosine"):
        tc = tasks(*names, rep_loss=rep_loss)
        res = diff.training_losses(model, z0, targets, tc, t=t, noise=noise)
        assert set(res) == {"loss", "eps", *names}
        assert res["loss"].requires_grad and res["loss"].dim() == 0
        assert all(not res[k].requires_grad and res[k].dim() == 0 for k in ("eps", *names))
        # recompute independently: A from all task inputs, z_t by (M3), heads vs targets
        out = model(diff.q_sample(z0, model.aggregate(targets), t, noise=noise), t)
        rep = (F.mse_loss(out["representation"], targets["representation"]) if rep_loss == "mse" else
               (1 - F.cosine_similarity(out["representation"], targets["representation"], dim=-1)).mean())
        ref = {"eps": F.mse_loss(out["eps"], noise), "label": F.cross_entropy(out["label"], targets["label"]),
               "representation": rep, "masked": F.mse_loss(out["masked"], z0),  # the FULL image
               "transition": F.mse_loss(out["transition"], targets["transition"])}
        for k, v in ref.items():
            assert res[k].item() == pytest.approx(v.item(), rel=1e-5), k
        total = ref["eps"] + 0.3 * ref["label"] + 0.2 * rep + 0.5 * ref["masked"] + 0.7 * ref["transition"]
        assert res["loss"].item() == pytest.approx(total.item(), rel=1e-5)
        res["loss"].backward()
        assert model.heads["label"].weight.grad is not None and model.label_emb.weight.grad is not None
        model.zero_grad()

    # a disabled task contributes nothing: neither to A nor to the loss (a fine-tune's left-out task:
    # its head's loss on the inputs given is reported, detached)
    res = diff.training_losses(model, z0, targets, tasks("label"), t=t, noise=noise)
    assert set(res) == {"loss", "eps", "label", "representation", "masked", "transition"}
    assert res["masked"].item() == pytest.approx(F.mse_loss(model(diff.q_sample(
        z0, model.aggregate({"label": targets["label"]}), t, noise=noise), t)["masked"], z0).item(), rel=1e-5)
    out = model(diff.q_sample(z0, model.aggregate({"label": targets["label"]}), t, noise=noise), t)
    assert res["loss"].item() == pytest.approx(
        (F.mse_loss(out["eps"], noise) + 0.3 * F.cross_entropy(out["label"], targets["label"])).item(), rel=1e-5)
    with pytest.raises(KeyError, match="representation"):
        diff.training_losses(model, z0, {"label": targets["label"]}, tasks("label", "representation"), t=t)


def test_label_loss_max_t_counts_only_the_small_t_samples():
    """tasks.label.max_t: the label head's cross-entropy over the samples at t <= max_t only (a
    masked mean); none of them in the batch gives 0, not NaN."""
    model, diff = ToyModel(("label",)), MTDiffusion(cfg())
    g = torch.Generator().manual_seed(12)
    z0, noise = torch.randn(6, *SHAPE, generator=g), torch.randn(6, *SHAPE, generator=g)
    y = torch.randint(0, K, (6,), generator=g)
    t = torch.tensor([1, 5, 10, 20, 40, 50])
    tc = tasks("label").model_copy(update={"label": tasks("label").label.model_copy(update={"max_t": 10})})
    res = diff.training_losses(model, z0, {"label": y}, tc, t=t, noise=noise)
    out = model(diff.q_sample(z0, model.aggregate({"label": y}), t, noise=noise), t)
    assert res["label"].item() == pytest.approx(F.cross_entropy(out["label"][:3], y[:3]).item(), rel=1e-5)
    tc0 = tc.model_copy(update={"label": tc.label.model_copy(update={"max_t": 1})})
    none = diff.training_losses(model, z0, {"label": y}, tc0, t=t.clamp(min=2), noise=noise)
    assert none["label"].item() == 0.0


def test_training_losses_without_tasks_is_ddpm_simple_loss():
    model = ToyModel(())
    diff = MTDiffusion(cfg(w_max=0.9))
    g = torch.Generator().manual_seed(6)
    z0, noise = torch.randn(8, *SHAPE, generator=g), torch.randn(8, *SHAPE, generator=g)
    t = torch.randint(1, 51, (8,), generator=g)
    res = diff.training_losses(model, z0, {"label": torch.zeros(8, dtype=torch.long)}, tasks(), t=t, noise=noise)
    s = diff.schedule
    z_t = s.sqrt_abar[t].float().view(-1, 1, 1, 1) * z0 + s.sqrt_one_minus_abar[t].float().view(-1, 1, 1, 1) * noise
    ref = F.mse_loss(model(z_t, t)["eps"], noise)
    assert set(res) == {"loss", "eps"}
    assert res["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    # z0 prediction: the target is z0 itself
    res0 = MTDiffusion(cfg(prediction="z0")).training_losses(model, z0, {}, tasks(), t=t, noise=noise)
    assert res0["loss"].item() == pytest.approx(F.mse_loss(model(z_t, t)["eps"], z0).item(), rel=1e-5)
    # random t / noise come from the generator: reproducible
    r1 = diff.training_losses(model, z0, {}, tasks(), generator=torch.Generator().manual_seed(9))
    r2 = diff.training_losses(model, z0, {}, tasks(), generator=torch.Generator().manual_seed(9))
    assert r1["loss"].item() == r2["loss"].item()


def _toy_batch(g: torch.Generator, B: int, patterns: torch.Tensor):
    y = torch.randint(0, K, (B,), generator=g)
    z0 = patterns[y] + 0.1 * torch.randn(B, *SHAPE, generator=g)
    return z0, y


def test_toy_training_m5_loss_decreases():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    patterns = 0.8 * torch.sign(torch.randn(K, *SHAPE, generator=g))
    model = ToyModel(("label", "representation"), hidden=128)
    diff = MTDiffusion(cfg())
    tc = tasks("label", "representation")
    rep_table = torch.randn(K, D, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hist = []
    for _ in range(200):
        z0, y = _toy_batch(g, 128, patterns)
        res = diff.training_losses(model, z0, {"label": y, "representation": rep_table[y]}, tc, generator=g)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        hist.append({k: v.item() for k, v in res.items()})
    first = {k: sum(h[k] for h in hist[:20]) / 20 for k in hist[0]}
    last = {k: sum(h[k] for h in hist[-20:]) / 20 for k in hist[0]}
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["eps"] < first["eps"] and last["label"] < 0.5 * first["label"], (first, last)

    # the trained label head classifies clean-ish images; classify returns (B, K) log-probabilities
    z0, y = _toy_batch(g, 64, patterns)
    logp = diff.classify(model, z0, [1, 5], generator=g)
    assert logp.shape == (64, K)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(64), atol=1e-4)
    assert (logp.argmax(-1) == y).float().mean().item() > 0.9


# ----------------------------------------------------------------------------- sampling
def test_timestep_sequence_strided_and_full():
    diff = MTDiffusion(cfg(timesteps=1000))
    assert timestep_sequence(diff.T) == list(range(1000, 0, -1))
    seq = timestep_sequence(diff.T, 10)
    assert seq[0] == 1000 and seq[-1] == 1 and len(set(seq)) == 10 and seq == sorted(seq, reverse=True)
    assert timestep_sequence(diff.T, 1) == [1000]
    for n in (2, 3, 7, 999):
        s = timestep_sequence(diff.T, n)
        assert len(set(s)) == n and s[0] == 1000 and s[-1] == 1
    with pytest.raises(ValueError, match="steps"):
        timestep_sequence(diff.T, 1001)


@pytest.mark.parametrize("given_kind", ["uncond", "label", "masked"])
def test_sample_ddim_eta1_full_steps_equals_ddpm(given_kind):
    torch.manual_seed(1)
    names = ("label", "masked")
    model = ToyModel(names).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    B = 16
    gd = torch.Generator().manual_seed(11)
    given = {"uncond": {}, "label": {"label": torch.randint(0, K, (B,), generator=gd)},
             "masked": {"masked": torch.randn(B, *SHAPE, generator=gd)}}[given_kind]
    runs = {}
    for sampler in ("ddpm", "ddim"):
        runs[sampler] = Sampler(diff, sampler, steps=50, eta=1.0)(model, (B, *SHAPE), given, tasks=tasks(*names),
                                                                  generator=torch.Generator().manual_seed(12))
    a, b = runs["ddpm"], runs["ddim"]
    assert set(a) == {"z0", "label", "label_probs", "masked"}
    assert torch.allclose(a["z0"], b["z0"], atol=1e-5), (a["z0"] - b["z0"]).abs().max()
    assert torch.equal(a["label"], b["label"])
    assert a["z0"].abs().max() <= 1.0  # pixel mode clips z0_hat; the last step returns it
    if given_kind == "label":
        assert torch.equal(a["label"], given["label"])
    # a different generator gives different samples (the noise is really used)
    c = Sampler(diff, "ddpm")(model, (B, *SHAPE), given, tasks=tasks(*names),
                              generator=torch.Generator().manual_seed(13))
    assert not torch.allclose(a["z0"], c["z0"], atol=1e-3)


def test_sample_ddim_eta0_is_deterministic():
    torch.manual_seed(2)
    model = ToyModel(("label",)).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    z_T = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))

    def sample(eta, seed):
        return Sampler(diff, "ddim", steps=10, eta=eta, clip=False)(
            model, (8, *SHAPE), tasks=tasks("label"), z_T=z_T, generator=torch.Generator().manual_seed(seed))

    r = [sample(0.0, s) for s in (1, 2)]
    assert torch.equal(r[0]["z0"], r[1]["z0"]) and torch.isfinite(r[0]["z0"]).all()
    r = [sample(1.0, s) for s in (1, 2)]
    assert not torch.allclose(r[0]["z0"], r[1]["z0"], atol=1e-3)


class GaussianOracle(nn.Module):
    """The exact denoiser for z0 ~ N(m, s^2 I) with a single class whose embedding is ``e``.

    Under (M3), y_t = z_t - c_t e ~ N(sqrt(abar_t) m, (abar_t s^2 + 1 - abar_t) I), so
    E[eps | z_t] and E[z0 | z_t] are affine in y_t. A sampler that mishandles the c_t A shift
    (or the posterior) does not return N(m, s^2).
    """

    def __init__(self, diff: MTDiffusion, m: torch.Tensor, s: float, e: torch.Tensor):
        super().__init__()
        self.diff, self.m, self.s, self.e = diff, m, s, e
        self.task_names = ["label"]

    def aggregate(self, inputs):
        lbl = inputs["label"]
        weight = lbl.sum(-1) if lbl.is_floating_point() else torch.ones(lbl.shape[0])  # probs sum to 1
        return weight.view(-1, 1) * self.e

    def forward(self, z_t, t):
        sch = self.diff.schedule
        ab, c = sch.abar[t].view(-1, 1), sch.c[t].view(-1, 1)
        y = z_t.double() - c * self.e
        dev = y - ab.sqrt() * self.m
        denom = ab * self.s ** 2 + 1 - ab
        if self.diff.prediction == "eps":
            head = (1 - ab).sqrt() / denom * dev
        else:
            head = self.m + ab.sqrt() * self.s ** 2 / denom * dev
        return {"eps": head.to(z_t.dtype), "label": torch.zeros(z_t.shape[0], 1)}


@pytest.mark.parametrize("prediction,sampler,steps,start,tol", [
    ("eps", "ddpm", None, "zero", 0.03), ("z0", "ddpm", None, "predict", 0.03), ("eps", "ddim", 25, "predict", 0.05),
    ("eps", "dpmpp2m", 25, "predict", 0.05)])
def test_sample_with_exact_denoiser_recovers_the_data_distribution(prediction, sampler, steps, start, tol):
    diff = MTDiffusion(cfg(timesteps=100, beta_schedule="cosine", w_schedule="constant", w_max=0.5,
                           prediction=prediction))
    m, s, e = torch.tensor([1.0, -0.5], dtype=F64), 0.5, torch.tensor([2.0, -1.0], dtype=F64)
    oracle = GaussianOracle(diff, m, s, e)
    N = 20000
    for given in ({}, {"label": torch.zeros(N, dtype=torch.long)}):
        run = Sampler(diff, sampler, steps=steps, eta=0.0 if sampler == "ddim" else 1.0, clip=False, dtype=F64,
                      start=start)
        out = run(oracle, (N, 2), given, tasks=tasks("label"), generator=torch.Generator().manual_seed(3))
        z = out["z0"]
        assert torch.allclose(z.mean(0), m, atol=tol), z.mean(0)
        assert torch.allclose(z.std(0), torch.full((2,), s, dtype=F64), atol=tol), z.std(0)
        assert (out["label"] == 0).all()


@pytest.mark.parametrize("beta_schedule,T", [("linear", 1000), ("cosine", 100)])
def test_dpmpp2m_beats_ddim_at_equal_steps_and_keeps_the_aggregated_term_exact(beta_schedule, T):
    """On the exact Gaussian denoiser, DPM-Solver++(2M) at 25 steps lands closer to the probability-flow
    ODE's solution (DDIM, eta 0, at all T steps) than DDIM at 25 steps; and a given label (A = e)
    changes nothing in y-space: the same noise gives the same z0 given or predicted."""
    diff = MTDiffusion(cfg(timesteps=T, beta_schedule=beta_schedule, beta_end=0.02, w_schedule="constant",
                           w_max=0.5))
    m, s, e = torch.tensor([1.0, -0.5], dtype=F64), 0.3, torch.tensor([2.0, -1.0], dtype=F64)
    oracle = GaussianOracle(diff, m, s, e)
    N = 1000
    label = {"label": torch.zeros(N, dtype=torch.long)}

    def run(sampler, steps, given=label):
        return Sampler(diff, sampler, steps=steps, eta=0.0, clip=False, dtype=F64)(
            oracle, (N, 2), given, tasks=tasks("label"), generator=torch.Generator().manual_seed(4))["z0"]

    ode = run("ddim", T)
    err = {smp: (run(smp, 25) - ode).abs().max().item() for smp in ("ddim", "dpmpp2m")}
    assert err["dpmpp2m"] < 0.6 * err["ddim"], err
    assert torch.allclose(run("dpmpp2m", 25, {}), run("dpmpp2m", 25), atol=1e-9)  # label predicted: A_hat = e


def test_min_snr_weighting_matches_its_definition():
    diff = MTDiffusion(cfg(loss_weighting="min_snr", min_snr_gamma=5.0))
    ab = diff.schedule.abar
    snr = ab / (1 - ab)
    w = diff.schedule.eps_loss_weight
    t_low, t_high = 1, 50  # SNR far above gamma at t = 1 (down-weighted), below it at t = T (weight 1)
    assert snr[t_low] > 5 and snr[t_high] < 5
    assert w[t_low].item() == pytest.approx(5.0 / snr[t_low].item()) and w[t_high].item() == 1.0
    model = ToyModel(())
    g = torch.Generator().manual_seed(6)
    z0, noise = torch.randn(8, *SHAPE, generator=g), torch.randn(8, *SHAPE, generator=g)
    t = torch.tensor([1, 2, 5, 10, 20, 30, 40, 50])
    res = diff.training_losses(model, z0, {}, tasks(), t=t, noise=noise)
    z_t = diff.q_sample(z0, None, t, noise=noise)
    per_sample = (model(z_t, t)["eps"] - noise).square().flatten(1).mean(1)
    assert res["loss"].item() == pytest.approx((w[t].float() * per_sample).mean().item(), rel=1e-5)
    plain = MTDiffusion(cfg()).training_losses(model, z0, {}, tasks(), t=t, noise=noise)
    assert res["loss"].item() < plain["loss"].item()  # only ever down-weights


class SpyModel(ToyModel):
    """Records what the sampler feeds to ``forward`` and ``aggregate``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, object]] = []

    def forward(self, z_t, t):
        out = super().forward(z_t, t)
        self.calls.append(("forward", (z_t.clone(), {k: v.clone() for k, v in out.items()})))
        return out

    def aggregate(self, inputs):
        self.calls.append(("aggregate", {k: v.clone() for k, v in inputs.items()}))
        return super().aggregate(inputs)


@pytest.mark.parametrize("start", ["zero", "predict"])
def test_sample_feeds_given_or_predicted_task_inputs_to_aggregate(start):
    torch.manual_seed(6)
    model = SpyModel(("label", "masked")).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    tc = tasks("label", "masked")  # mask_ratio 0.5
    B = 4
    noise_T = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(8))
    Sampler(diff, "ddim", steps=3, start=start)(model, (B, *SHAPE), tasks=tc,
                                               generator=torch.Generator().manual_seed(8))
    fwd = [c[1] for c in model.calls if c[0] == "forward"]
    agg = [c[1] for c in model.calls if c[0] == "aggregate"]
    assert len(fwd) == (4 if start == "predict" else 3) and len(agg) == len(fwd)
    for (z_in, out), inputs in zip(fwd, agg):
        # not given: soft labels (softmax) and the expected masked input (1 - mask_ratio) * restored image
        assert torch.allclose(inputs["label"], torch.softmax(out["label"], -1))
        assert torch.allclose(inputs["masked"], 0.5 * out["masked"])
    c_T = float(diff.schedule.c[50])
    assert torch.allclose(fwd[0][0], noise_T)  # nothing given: z_T starts as pure noise ...
    if start == "predict":  # ... then is shifted by c_T A(predictions at the noise)
        assert torch.allclose(fwd[1][0], noise_T + c_T * model.aggregate(agg[0]), atol=1e-5)

    model.calls.clear()
    lbl = torch.tensor([2, 0, 1, 1])
    Sampler(diff, "ddpm", steps=2, start=start)(model, (B, *SHAPE), {"label": lbl}, tasks=tc,
                                               generator=torch.Generator().manual_seed(8))
    agg = [c[1] for c in model.calls if c[0] == "aggregate"]
    assert torch.equal(agg[0]["label"], lbl) and set(agg[0]) == {"label"}  # z_T = c_T A(given) + noise
    assert all(torch.equal(a["label"], lbl) for a in agg)


@pytest.mark.parametrize("mode", ["hard", "absent"])
def test_sample_predicted_label_modes(mode):
    """A label not given enters A_hat as its argmax's one-hot (hard) or not at all (absent: code 0)."""
    torch.manual_seed(6)
    model = SpyModel(("label",)).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    out = Sampler(diff, "ddim", steps=3, inputs={"label": LABEL_POLICIES[mode]()})(
        model, (4, *SHAPE), tasks=tasks("label"), generator=torch.Generator().manual_seed(8))
    fwd = [c[1][1] for c in model.calls if c[0] == "forward"]
    agg = [c[1]["label"] for c in model.calls if c[0] == "aggregate"]
    assert len(agg) == len(fwd) == 4
    for heads, code in zip(fwd, agg):
        want = F.one_hot(heads["label"].argmax(-1), K).float() if mode == "hard" else torch.zeros(4, K)
        assert torch.equal(code, want)
    # the returned label is the head's argmax whatever entered A_hat
    assert torch.equal(out["label"], torch.softmax(fwd[-1]["label"], -1).argmax(-1))


def test_sample_predicted_label_drawn_holds_one_class_from_the_heads_softmax():
    """``drawn``: one class per sample drawn from the head's softmax at z_T, then held as a given label."""
    torch.manual_seed(6)
    model = SpyModel(("label",)).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    B = 64
    drawn = Sampler(diff, "ddim", steps=3, inputs={"label": DrawnLabel()})
    out = drawn(model, (B, *SHAPE), tasks=tasks("label"), generator=torch.Generator().manual_seed(8))
    fwd = [c[1] for c in model.calls if c[0] == "forward"]
    agg = [c[1]["label"] for c in model.calls if c[0] == "aggregate"]
    # the draw's pass at pure noise (nothing given), then the 3 steps; no "predict" pass: all is given
    assert len(fwd) == 4 and len(agg) == 4  # nothing given at the draw: A = 0 without an aggregate call
    gen = torch.Generator().manual_seed(8)
    noise_T = torch.randn((B, *SHAPE), generator=gen)
    assert torch.equal(fwd[0][0], noise_T)
    want = torch.multinomial(torch.softmax(fwd[0][1]["label"], -1), 1, generator=gen).squeeze(1)
    assert all(torch.equal(code, want) for code in agg)  # held as given from then on
    assert torch.equal(out["label"], want)
    assert want.unique().numel() > 1  # a draw, not an argmax shared by all samples
    again = drawn(SpyModel(("label",)).eval(), (B, *SHAPE), tasks=tasks("label"),
                  generator=torch.Generator().manual_seed(8))
    assert torch.equal(again["label"], out["label"])
    # a z_T passed in is the draw's input too: the label is still drawn and held
    spy = SpyModel(("label",)).eval()
    passed = drawn(spy, (B, *SHAPE), tasks=tasks("label"), z_T=noise_T, generator=torch.Generator().manual_seed(8))
    agg = [c[1]["label"] for c in spy.calls if c[0] == "aggregate"]
    assert len(agg) == 3 and all(torch.equal(code, passed["label"]) for code in agg)


def test_sample_patch_masked_gives_masked_input_training_form():
    """PatchMasked: a masked input not given enters A_hat as head image * a patch mask drawn once per
    sample from the mask generator (training's z0 * mask); Absent: code 0."""
    torch.manual_seed(6)
    model = SpyModel(("masked",)).eval()
    diff = MTDiffusion(cfg(w_max=1.0))
    tc = tasks("masked")
    Sampler(diff, "ddim", steps=3, inputs={"masked": PatchMasked(patch=2)})(
        model, (4, *SHAPE), tasks=tc, generator=torch.Generator().manual_seed(8),
        mask_generator=torch.Generator().manual_seed(1))
    mask = random_patch_mask(4, SHAPE, tc.masked.mask_ratio, 2, generator=torch.Generator().manual_seed(1))
    assert 0 < mask.mean() < 1
    fwd = [c[1][1] for c in model.calls if c[0] == "forward"]
    agg = [c[1]["masked"] for c in model.calls if c[0] == "aggregate"]
    assert len(agg) == len(fwd) == 4
    assert all(torch.equal(code, heads["masked"] * mask) for heads, code in zip(fwd, agg))
    model.calls.clear()
    Sampler(diff, "ddim", steps=2, inputs={"masked": Absent()})(model, (4, *SHAPE), tasks=tc)
    assert all(not c[1]["masked"].any() for c in model.calls if c[0] == "aggregate")


def test_sample_conditioning_modes_and_errors():
    torch.manual_seed(3)
    names = ("label", "representation", "masked", "transition")
    model = ToyModel(names).eval()
    diff = MTDiffusion(cfg())
    tc = tasks(*names)
    B = 4
    g = torch.Generator().manual_seed(4)
    givens = [{}, {"label": torch.tensor([0, 1, 2, 1])}, {"masked": torch.randn(B, *SHAPE)},
              {"transition": torch.randn(B, *SHAPE)}, {"label": torch.softmax(torch.randn(B, K), -1)}]
    for given in givens:
        out = Sampler(diff, "ddim", steps=5)(model, (B, *SHAPE), given, tasks=tc, generator=g)
        assert out["z0"].shape == (B, *SHAPE) and torch.isfinite(out["z0"]).all()
        assert out["label"].shape == (B,) and out["label"].dtype == torch.long
        assert out["representation"].shape == (B, D)
        assert out["masked"].shape == out["transition"].shape == (B, *SHAPE)
        if "label" in given and not given["label"].is_floating_point():
            assert torch.equal(out["label"], given["label"])
    # tasks_cfg omitted: enabled tasks come from model.task_names
    out = Sampler(diff, "ddpm", steps=3)(model, (B, *SHAPE), generator=g)
    assert set(out) == {"z0", "label", "label_probs", "representation", "masked", "transition"}
    with pytest.raises(ValueError, match="not enabled"):
        Sampler(diff)(model, (B, *SHAPE), {"label": torch.zeros(B, dtype=torch.long)}, tasks=tasks("masked"))
    with pytest.raises(ValueError, match="batch size"):
        Sampler(diff)(model, (B, *SHAPE), {"label": torch.zeros(B + 1, dtype=torch.long)}, tasks=tc)
    with pytest.raises(ValueError, match="sampler"):
        Sampler(diff, "euler")
    with pytest.raises(KeyError, match="label"):
        Sampler(diff, steps=2)(ToyModel(()), (B, *SHAPE), tasks=tasks("label"))


def test_classify_shape_and_ignores_given_label():
    torch.manual_seed(5)
    model = ToyModel(("label", "masked")).eval()
    diff = MTDiffusion(cfg())
    z0 = torch.randn(6, *SHAPE)
    masked = z0 * (torch.rand(6, *SHAPE) > 0.5)
    a = diff.classify(model, z0, [1, 10, 50], given={"masked": masked}, generator=torch.Generator().manual_seed(0))
    b = diff.classify(model, z0, [1, 10, 50], given={"masked": masked, "label": torch.zeros(6, dtype=torch.long)},
                      generator=torch.Generator().manual_seed(0))
    c = diff.classify(model, z0, [1, 10, 50], generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, K) and torch.allclose(a.exp().sum(-1), torch.ones(6), atol=1e-5)
    assert torch.equal(a, b)            # the label never leaks into A
    assert not torch.allclose(a, c)     # the masked image does enter A
    with pytest.raises(KeyError, match="label head"):
        diff.classify(ToyModel(()), z0, [1])
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        diff.classify(model, z0, [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_losses_and_samplers_with_cpu_generator():
    dev = torch.device("cuda")
    torch.manual_seed(7)
    names = ("label", "masked")
    model = ToyModel(names).to(dev)
    diff = MTDiffusion(cfg(w_max=1.0))
    tc = tasks(*names)
    g = torch.Generator().manual_seed(0)  # CPU generator driving CUDA tensors
    z0 = torch.randn(16, *SHAPE, device=dev)
    targets = {"label": torch.randint(0, K, (16,), device=dev), "masked": z0 * (torch.rand_like(z0) > 0.5)}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = diff.training_losses(model, z0, targets, tc, generator=g)
    res["loss"].backward()
    assert res["loss"].device.type == "cuda" and torch.isfinite(res["loss"])
    model.eval()
    a = Sampler(diff, "ddpm")(model, (16, *SHAPE), tasks=tc, generator=torch.Generator().manual_seed(1))
    b = Sampler(diff, "ddim", steps=50, eta=1.0)(model, (16, *SHAPE), tasks=tc,
                                                 generator=torch.Generator().manual_seed(1))
    assert a["z0"].device.type == "cuda" and torch.allclose(a["z0"], b["z0"], atol=1e-5)
    logp = diff.classify(model, z0, [1, 10], generator=g)
    assert logp.shape == (16, K) and logp.device.type == "cuda"


def test_training_losses_trains_the_clean_classifier_on_the_image_alone(make_params):
    """tasks.label.classifier clean: a cross-entropy of the classifier on z0 (t = 0, no label code),
    weighted by classifier_weight, and its gradient reaches the shared encoder (Joint Diffusion)."""
    from mtdiff.models import build_model

    over = {"model.channels": 8, "model.channel_mult": [1, 2], "tasks.label.classifier": "clean",
            "tasks.label.classifier_weight": 1.0, "tasks.label.classifier_dropout": 0.0, "sample.condition": "label"}
    params = make_params(over)
    torch.manual_seed(0)
    model = build_model(params, None, 10)
    diff = MTDiffusion(params.diffusion)
    g = torch.Generator().manual_seed(1)
    z0, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    t, noise = torch.randint(1, 1001, (4,), generator=g), torch.randn(4, 1, 28, 28, generator=g)
    tc = params.tasks
    res = diff.training_losses(model, z0, {"label": y}, tc, t=t, noise=noise)
    assert res["classifier"].item() == pytest.approx(F.cross_entropy(model.classifier_logits(z0), y).item(), rel=1e-5)
    no_clf = tc.model_copy(update={"label": tc.label.model_copy(update={"classifier_weight": 0.0})})
    base = diff.training_losses(model, z0, {"label": y}, no_clf, t=t, noise=noise)
    assert res["loss"].item() == pytest.approx(base["loss"].item() + res["classifier"].item(), rel=1e-5)
    grads = []
    for loss in (res["loss"], base["loss"]):
        model.zero_grad()
        loss.backward()
        grads.append(model.backbone.conv_in.weight.grad.clone())
    assert model.classifier.net[1].weight.grad is not None
    assert not torch.allclose(grads[0], grads[1])  # the classifier shapes the shared encoder
