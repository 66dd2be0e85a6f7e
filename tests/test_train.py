"""Train stage: outputs, checkpoint contents, params hash, LR schedule, EMA, inference loading, MLflow.

Also holds the tiny-data helpers that test_resume / test_ddp / test_sample import
(``from test_train import ...``; pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtdiff.config import DEFAULT_PARAMS, Params, load_params

# A tiny model and schedule: a few CPU seconds per run.
TINY = {"model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2, "model.patch_size": 4,
        "model.head_hidden": 32, "diffusion.timesteps": 50, "train.batch_size": 16,
        "train.warmup_steps": 2, "train.log_every": 2, "train.ckpt_every": 4, "train.steps": 6,
        "train.device": "cpu", "sample.steps": 10, "sample.num_samples": 12, "sample.batch_size": 8,
        "data.max_per_split": 64, "representations.epochs": 0}


def tiny_params(root: Path, **over) -> Params:
    """Params rooted in ``root`` (data/, checkpoints/, samples/, metrics/) with the TINY sizes."""
    base = {"data.out_dir": str(root / "data"), "train.out_dir": str(root / "checkpoints"),
            "sample.out_dir": str(root / "samples"), "evaluate.out_dir": str(root / "metrics")}
    return load_params(DEFAULT_PARAMS, overrides={**base, **TINY, **over})


def build_data(params: Params) -> None:
    """The real prepare + latents (+ representations) stages on ``data.max_per_split`` images."""
    from mtdiff.stages import latents, prepare

    prepare.run(params)
    latents.run(params)
    if params.tasks.representation.enabled:
        from mtdiff.stages import representations

        representations.run(params)


def data_root(tmp_path_factory, fmnist: Path, tasks: tuple[str, ...] = ()) -> Path:
    """A temp root holding tiny data with the given extra tasks' inputs (built once per call)."""
    if not (fmnist / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not at {fmnist}")
    root = tmp_path_factory.mktemp("traindata")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTDIFF_MLFLOW", "0")
        build_data(tiny_params(root, **{f"tasks.{t}.enabled": True for t in tasks}))
    return root


def link_data(src_root: Path, dst_root: Path) -> None:
    """Share the read-only data folder of ``src_root`` with a test's own root."""
    dst_root.mkdir(parents=True, exist_ok=True)
    if not (dst_root / "data").exists():
        (dst_root / "data").symlink_to(src_root / "data", target_is_directory=True)


def fmnist_path() -> Path:
    return Path(os.environ.get("MTDIFF_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


ALL_TASKS = ("label", "representation", "masked", "transition")


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny models gain nothing from two, and on a shared, oversubscribed
    2-core machine OpenMP's spinning threads made steps ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    return data_root(tmp_path_factory, fmnist_path(), tasks=ALL_TASKS)


@pytest.fixture
def root(shared_data, workdir) -> Path:
    link_data(shared_data, workdir)
    return workdir


# -- the stage ----------------------------------------------------------------------------------

def test_train_writes_checkpoints_and_metrics(root):
    from mtdiff.checkpoint import load_checkpoint, params_hash
    from mtdiff.stages import train

    params = tiny_params(root, **{f"tasks.{t}.enabled": True for t in ALL_TASKS})
    summary = train.run(params)

    assert summary["steps"] == 6 and summary["resumed_from_step"] is None
    assert set(summary["final_losses"]) == {"eps", *ALL_TASKS}
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    assert summary["img_per_s"] > 0 and summary["world_size"] == 1 and summary["precision"] == "fp32"
    on_disk = json.loads((root / "metrics" / "train.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["final_loss"] == pytest.approx(summary["final_loss"])

    # weights_only=True load of both files (load_checkpoint uses it; check torch.load directly too)
    state = torch.load(root / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "ema", "opt", "sched", "scaler", "step", "epoch", "batch_in_epoch", "rng",
                "params_hash", "meta"):
        assert key in state, key
    assert state["step"] == 6
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)  # 64 images / batch 16 = 4 steps per epoch
    assert state["params_hash"] == params_hash(params)
    assert state["meta"]["num_classes"] == 10 and state["meta"]["shape"] == [1, 28, 28]
    assert state["meta"]["repr_dim"] == params.representations.dim
    assert isinstance(state["rng"][0]["global"]["numpy"]["keys"], torch.Tensor)
    ema = load_checkpoint(root / "checkpoints" / "ema.pt")
    assert ema["step"] == 6 and set(ema["ema"]["shadow"]) == set(state["model"])
    # the EMA differs from the raw weights after training (it lags behind)
    assert any(not torch.equal(state["model"][k], ema["ema"]["shadow"][k]) for k in state["model"])


def test_train_rejects_batch_larger_than_dataset(root):
    from mtdiff.stages import train

    with pytest.raises(ValueError, match="fewer than one batch"):
        train.run(tiny_params(root, **{"train.batch_size": 128}))


def test_masked_targets_hide_the_configured_fraction(root):
    from mtdiff.stages.train import make_targets

    params = tiny_params(root, **{"tasks.masked.enabled": True, "tasks.masked.mask_ratio": 0.5})
    z0 = torch.randn(8, 1, 28, 28)
    batch = {"z0": z0, "label": torch.zeros(8, dtype=torch.long)}
    g = torch.Generator().manual_seed(0)
    _, targets = make_targets(batch, params, g)
    hidden = (targets["masked"] == 0).float().mean().item()
    assert hidden == pytest.approx(round(0.5 * 49) / 49, abs=1e-6)  # 7x7 patches of 4 px, exact count
    assert torch.equal(targets["masked"] != 0, (targets["masked"] == z0) & (z0 != 0))
    with pytest.raises(KeyError, match="representation"):
        make_targets(batch, tiny_params(root, **{"tasks.representation.enabled": True}), g)


# -- params hash --------------------------------------------------------------------------------

def test_params_hash_ignores_logistics_but_not_training_params(tmp_path):
    from mtdiff.checkpoint import params_hash

    base = params_hash(tiny_params(tmp_path))
    same = [{"train.steps": 999}, {"train.log_every": 7}, {"train.ckpt_every": 3}, {"train.out_dir": "x"},
            {"data.out_dir": "elsewhere"}, {"sample.steps": 5}, {"evaluate.num_samples": 3}]
    for over in same:
        assert params_hash(tiny_params(tmp_path, **over)) == base, over
    changed = [{"train.lr": 3e-3}, {"seed": 1}, {"model.depth": 3}, {"diffusion.w_max": 0.2},
               {"tasks.label.weight": 0.5}, {"train.batch_size": 8}, {"data.max_per_split": 32}]
    for over in changed:
        assert params_hash(tiny_params(tmp_path, **over)) != base, over


# -- helpers ------------------------------------------------------------------------------------

def test_warmup_then_constant_lr():
    from mtdiff.training import WarmupConstant, build_scheduler

    f = WarmupConstant(4)
    assert [f(s) for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert WarmupConstant(0)(0) == 1.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_ema_update_matches_formula_and_warmup():
    from mtdiff.training import EMA

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    assert ema.current_decay() == pytest.approx(0.1)  # (1+0)/(10+0): early updates follow the weights
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for k, v in net.state_dict().items():
        assert torch.allclose(ema.shadow[k], 0.1 * start[k] + 0.9 * v)
    ema.num_updates = 10_000
    assert ema.current_decay() == pytest.approx(0.9)
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    other = torch.nn.Linear(3, 2)
    ema.copy_to(other)
    assert all(torch.equal(other.state_dict()[k], ema.shadow[k]) for k in ema.shadow)


def test_cpu_trains_in_fp32_and_optimizer_groups():
    from mtdiff.training import autocast_dtype, build_optimizer, make_grad_scaler

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "bf16") is None and autocast_dtype(cpu, "fp16") is None
    assert not make_grad_scaler(cpu, None).is_enabled()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(net, 1e-3, 0.1, cpu)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"]) == 1  # only the matrix


def test_resumable_batch_sampler_skips_done_batches():
    from mtdiff.training import DistInfo, ResumableBatchSampler, make_sampler

    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    s = make_sampler(20, info, seed=3)
    s.set_epoch(2)
    full = list(ResumableBatchSampler(s, 6))
    assert len(full) == 3 and all(len(b) == 6 for b in full)
    assert list(ResumableBatchSampler(s, 6, start=2)) == full[2:]
    s.set_epoch(3)
    assert list(ResumableBatchSampler(s, 6)) != full  # a new permutation each epoch


# -- inference loading --------------------------------------------------------------------------

def test_load_for_inference_uses_ema_weights_and_checks_params(root):
    from mtdiff.checkpoint import load_checkpoint, load_for_inference
    from mtdiff.stages import train

    params = tiny_params(root, **{"train.steps": 2})
    train.run(params)
    model, diffusion, meta = load_for_inference(params)
    ema = load_checkpoint(root / "checkpoints" / "ema.pt")["ema"]["shadow"]
    assert not model.training
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert meta["num_classes"] == 10 and meta["step"] == 2 and diffusion.T == 50
    with pytest.raises(ValueError, match="diffusion.w_max"):
        load_for_inference(tiny_params(root, **{"diffusion.w_max": 0.3}))
    with pytest.raises(FileNotFoundError, match="train stage"):
        load_for_inference(params, path=root / "nope.pt")


# -- MLflow -------------------------------------------------------------------------------------

def test_train_logs_to_mlflow(root, monkeypatch):
    from fixtures.mlflow_store import sqlite_store
    from mlflow import MlflowClient

    from mtdiff.stages import train

    uri = sqlite_store(root / "store")
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    params = tiny_params(root, **{"train.steps": 4, "mlflow.experiment": "train-test"})
    train.run(params)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("train-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("loss", "loss/eps", "loss/label", "lr", "img_per_s"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist][:2] == [2, 4], key
    assert run.data.tags["checkpoint"].endswith("last.pt")
    assert any(a.path == "train.json" for a in client.list_artifacts(run.info.run_id))
