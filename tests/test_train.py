"""Train stage: outputs, checkpoint contents, params hash, LR schedule, EMA, the shared training
step and its meter, inference loading, MLflow."""
from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import pytest
import torch

from fixtures.tiny_run import ALL_TASKS, data_root, link_data, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory) -> Path:
    return data_root(tmp_path_factory, tasks=ALL_TASKS)


@pytest.fixture
def root(shared_data, workdir) -> Path:
    link_data(shared_data, workdir)
    return workdir


# -- the stage ----------------------------------------------------------------------------------

def test_train_writes_checkpoints_and_metrics(root):
    from mtdiff import precision
    from mtdiff.checkpoint import load_checkpoint, params_hash
    from mtdiff.stages import train

    params = tiny_params(root, **{f"tasks.{t}.enabled": True for t in ALL_TASKS})
    summary = train.run(params)

    assert summary["steps"] == 6 and summary["resumed_from_step"] is None
    assert set(summary["final_losses"]) == {"eps", *ALL_TASKS, "classifier"}  # the default clean classifier
    assert all(math.isfinite(v) for v in summary["final_losses"].values())
    assert summary["img_per_s"] > 0 and summary["world_size"] == 1 and summary["precision"] == "fp32"
    on_disk = json.loads((root / "metrics" / "train.json").read_text())
    assert on_disk["steps"] == 6 and on_disk["final_loss"] == pytest.approx(summary["final_loss"])
    assert on_disk["device_name"] == precision.device_name(torch.device("cpu"))  # what the img/s ran on
    # project-relative: the metrics file reads the same on every machine
    assert on_disk["checkpoint"] == ".mtdiff/train_state/checkpoints/last.pt"

    # weights_only=True load of both files (load_checkpoint uses it; check torch.load directly too)
    # the resumable state lives outside the DVC output (which holds ema.pt only)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["ema.pt"]
    state = torch.load(root / ".mtdiff" / "train_state" / "checkpoints" / "last.pt", weights_only=True)
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
    from mtdiff.train.step import make_targets

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


def test_masked_dropout_hides_whole_images_and_leaves_the_rest_as_before(root):
    """tasks.masked.dropout: a dropped image's input is all zero (absent from A); the kept ones get the
    same masks as without dropout (the dropout draw comes after them)."""
    from mtdiff.train.step import make_targets

    over = {"tasks.masked.enabled": True}
    z0 = torch.randn(64, 1, 28, 28)
    batch = {"z0": z0, "label": torch.zeros(64, dtype=torch.long)}
    _, plain = make_targets(batch, tiny_params(root, **over), torch.Generator().manual_seed(0))
    _, drop = make_targets(batch, tiny_params(root, **over, **{"tasks.masked.dropout": 0.5}),
                           torch.Generator().manual_seed(0))
    absent = (drop["masked"].flatten(1) == 0).all(1)
    assert 16 <= int(absent.sum()) <= 48  # about half of 64
    assert torch.equal(drop["masked"][~absent], plain["masked"][~absent])


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
    from mtdiff.train.optim import WarmupConstant, build_scheduler

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
    from mtdiff.train.optim import EMA

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
    from mtdiff.precision import autocast_dtype, make_grad_scaler
    from mtdiff.train.optim import build_optimizer

    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "bf16") is None and autocast_dtype(cpu, "fp16") is None
    assert not make_grad_scaler(cpu, None).is_enabled()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(net, 1e-3, 0.1, cpu)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"]) == 1  # only the matrix


def test_resumable_batch_sampler_skips_done_batches():
    from mtdiff.distributed import DistInfo
    from mtdiff.train.loader import ResumableBatchSampler, make_sampler

    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    s = make_sampler(20, info, seed=3)
    s.set_epoch(2)
    full = list(ResumableBatchSampler(s, 6))
    assert len(full) == 3 and all(len(b) == 6 for b in full)
    assert list(ResumableBatchSampler(s, 6, start=2)) == full[2:]
    s.set_epoch(3)
    assert list(ResumableBatchSampler(s, 6)) != full  # a new permutation each epoch


def test_meter_window_means_throughput_and_non_finite_check(monkeypatch):
    from mtdiff.distributed import DistInfo
    from mtdiff.train import meter as meter_mod
    from mtdiff.train.meter import TrainMeter
    from mtdiff.train.step import NonFiniteLossError, StepOutput

    clock = iter([0.0, 2.0, 2.0, 5.0, 5.0])  # window 1: 2 s; window 2: 3 s minus 1 s excluded
    monkeypatch.setattr(meter_mod.time, "perf_counter", lambda: next(clock))
    info = DistInfo(0, 1, 0, torch.device("cpu"), False)
    meter = TrainMeter(["loss", "eps", "label"], images_per_step=8, info=info)

    def out(loss: float, eps: float, label: float, gnorm: float) -> StepOutput:
        return StepOutput({"loss": torch.tensor(loss), "eps": torch.tensor(eps), "label": torch.tensor(label)},
                          torch.tensor(gnorm))

    meter.add(1, out(1.0, 0.5, 2.0, 1.0))
    meter.add(2, out(3.0, 1.5, 4.0, 3.0))
    meter.check_finite()
    w = meter.flush()
    assert w.losses == pytest.approx({"loss": 2.0, "eps": 1.0, "label": 3.0}) and w.grad_norm == pytest.approx(2.0)
    assert (w.images, w.seconds, w.img_per_s) == (16, 2.0, 8.0)
    meter.add(3, out(1.0, 1.0, 1.0, 1.0))
    meter.exclude(1.0)
    w = meter.flush()
    assert (w.images, w.seconds) == (8, 2.0)
    assert meter.session.img_per_s == pytest.approx(24 / 4.0) and meter.steady.img_per_s == pytest.approx(4.0)

    meter.add(4, out(1.0, 1.0, 1.0, 1.0))
    meter.add(5, out(float("nan"), 0.25, 1.0, 1.0))
    meter.add(6, out(float("inf"), 1.0, 1.0, 1.0))  # the first bad step is the one reported
    with pytest.raises(NonFiniteLossError, match=r"step 5: per-task losses \{'loss': nan, 'eps': 0.25, "
                                                 r"'label': 1.0\}; kept"):
        meter.check_finite("; kept")


def test_derive_seed_streams_are_distinct_and_stable():
    from mtdiff.utils import derive_seed

    seeds = {derive_seed(s, stream, rank) for s in (0, 1) for stream in ("noise", "global", "loader/0")
             for rank in (0, 1)}
    assert len(seeds) == 12 and all(0 <= v < 2**63 for v in seeds)
    assert derive_seed(0, "noise", 1) == derive_seed(0, "noise", 1)
    torch.Generator().manual_seed(max(seeds))  # every derived seed is a valid torch seed


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

def test_train_clean_classifier_is_logged_saved_and_kept_through_a_finetune(root):
    """tasks.label.classifier clean: its loss is a column of the training curve and of train.json, the
    EMA checkpoint loads with it, and a fine-tune leaving the label out still reports it (untrained)."""
    import csv

    from mtdiff.checkpoint import load_for_inference
    from mtdiff.stages import train

    params = tiny_params(root, **{"tasks.label.classifier": "clean", "train.finetune_steps": 2,
                                  "sample.condition": "uncond"})
    summary = train.run(params)
    assert set(summary["final_losses"]) == {"eps", "label", "classifier"}
    assert math.isfinite(summary["final_losses"]["classifier"])
    rows = list(csv.DictReader((root / "metrics" / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["2", "4", "6"] and all(float(r["classifier"]) > 0 for r in rows)
    model, _, _ = load_for_inference(params, device="cpu")
    assert model.classifier is not None and not model.classifier.training
    assert model.classifier_logits(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


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
    for key in ("train/step/loss", "train/step/eps", "train/step/label", "train/step/lr", "train/step/img_per_s"):
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist][:2] == [2, 4], key
    assert run.data.tags["checkpoint"].endswith("last.pt")
    assert any(a.path == "train.json" for a in client.list_artifacts(run.info.run_id))


# -- issue 22: an MLflow store that cannot be written ---------------------------------------------

def test_an_unusable_mlflow_store_leaves_the_training_outputs_whole(root, monkeypatch):
    """A store that is no database (corrupt file) and one that fails every write mid-run (a full
    disk under it): the stage's own outputs are written all the same, the records are kept."""
    import mlflow

    from mtdiff.stages import train
    from mtdiff.pipeline.mlflow_replay import read_pending
    from mtdiff.pipeline.tracking import pending_file

    for var in ("MTDIFF_PARENT_RUN_ID", "MLFLOW_PARENT_RUN_ID", "MTDIFF_MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")
    broken = root / "broken.db"
    broken.write_bytes(b"this is not an SQLite database\n" * 64)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{broken}")
    params = tiny_params(root, **{"train.steps": 4, "mlflow.experiment": "broken-store"})
    summary = train.run(params)
    assert summary["steps"] == 4 and (root / "checkpoints" / "ema.pt").is_file()
    assert json.loads((root / "metrics" / "train.json").read_text())["steps"] == 4
    kept = [r["what"] for r in read_pending(pending_file("train"))]
    assert kept[0] == "start_run" and "log_metrics" in kept and kept[-1] == "end_run"

    # a store that opens but whose every write fails (ENOSPC under it), from the first metric on
    from fixtures.mlflow_store import sqlite_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_store(root / "store"))
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    for name in ("log_metrics", "log_params", "set_tags", "log_artifact", "log_image", "log_input"):
        monkeypatch.setattr(mlflow, name, disk_full)
    monkeypatch.setattr("mlflow.pytorch.log_model", disk_full)
    shutil.rmtree(root / "checkpoints")
    summary = train.run(tiny_params(root, **{"train.steps": 4, "mlflow.experiment": "full-store", "seed": 1}))
    assert summary["steps"] == 4 and (root / "checkpoints" / "ema.pt").is_file()


@pytest.mark.parametrize("flags, unit", [("fpu avx2 amx_bf16 avx512_bf16", "amx_bf16"),
                                         ("fpu avx2 avx512f avx512_bf16", "avx512_bf16"),
                                         ("fpu avx2 fma", None)])
def test_precision_auto_takes_bf16_only_on_cpus_with_bf16_units(tmp_path, monkeypatch, flags, unit):
    """``train.precision: auto`` on CPU: bf16 autocast where /proc/cpuinfo shows AMX or AVX512-BF16
    (both code paths run on any CI machine, whatever its CPU), fp32 on AVX2-only CPUs."""
    import builtins

    from mtdiff import precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    precision.cpu_info.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert precision.cpu_bf16_units() == unit
        assert precision.autocast_dtype(cpu, "auto") == (torch.bfloat16 if unit else None)
        assert precision.autocast_dtype(cpu, "bf16") is None and precision.autocast_dtype(cpu, "fp32") is None
        # what train.json and the benches record beside a speed: the model and the unit that ran it
        assert precision.device_name(cpu) == f"Test CPU 9000 ({unit or 'no bf16 units'})"
    finally:
        precision.cpu_info.cache_clear()


def test_cpu_bf16_autocast_trains_with_fp32_timesteps_loss_and_ema(make_params):
    """A bf16-autocast training step on CPU: the loss and the EMA stay fp32, the weights fp32."""
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.models import build_model
    from mtdiff.train.step import TrainStep

    params = make_params({"model.channels": 8, "model.channel_mult": [1, 2], "model.attn_resolutions": [14],
                          "diffusion.timesteps": 1000})
    model = build_model(params, None, 10)
    step = TrainStep(model, MTDiffusion(params.diffusion), params, torch.device("cpu"),
                     generator=torch.Generator().manual_seed(0), amp_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batch = {"z0": torch.rand(4, 1, 28, 28, generator=g) * 2 - 1, "label": torch.arange(4)}
    out = step(batch)
    assert out.losses["loss"].dtype == torch.float32 and torch.isfinite(out.losses["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in step.ema.shadow.values() if v.is_floating_point())
