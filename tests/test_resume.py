"""Resume: an interrupted or extended run ends bitwise where an uninterrupted one does; a changed
param starts fresh; a NaN loss stops with a clear error and keeps the last good checkpoint."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from fixtures.tiny_run import data_root, link_data, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")

# masked + label: the mask draws and the label embedding both have to replay exactly;
# 64 images / batch 16 = 4 steps per epoch, so 10 steps cross two epoch boundaries.
TASKS = {"tasks.masked.enabled": True}
STEPS = 10


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    return data_root(tmp_path_factory, tasks=("masked",))


@pytest.fixture
def root(shared_data, workdir):
    link_data(shared_data, workdir)
    return workdir


def _params(root, ckpt: str, steps: int = STEPS, **over):
    return tiny_params(root, **{"train.out_dir": str(root / ckpt), "evaluate.out_dir": str(root / f"m_{ckpt}"),
                                "train.steps": steps, **TASKS, **over})


def _state(root, ckpt: str):
    """The resumable state of the run writing ``root/ckpt`` (no DVC output: .mtdiff/train_state/<ckpt>)."""
    from mtdiff.train.state import train_state_dir

    path = train_state_dir(_params(root, ckpt))
    assert path == root / ".mtdiff" / "train_state" / ckpt
    return path


def test_train_state_root_from_the_environment(root, monkeypatch, tmp_path):
    """A sweep point's experiment runs in a temp copy a kill throws away: the sweep moves the state out."""
    from mtdiff.config import ConfigError
    from mtdiff.train.state import train_state_dir

    monkeypatch.setenv("MTDIFF_TRAIN_STATE_ROOT", str(tmp_path / "sweep_state" / "p"))
    assert train_state_dir(_params(root, "ckpt")) == tmp_path / "sweep_state" / "p" / "ckpt"
    monkeypatch.setenv("MTDIFF_TRAIN_STATE_ROOT", "relative/state")
    with pytest.raises(ConfigError, match="MTDIFF_TRAIN_STATE_ROOT='relative/state': must be an absolute path"):
        train_state_dir(_params(root, "ckpt"))


def _assert_same(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"model weight {k} differs"
    for k in a.ema.shadow:
        assert torch.equal(a.ema.shadow[k], b.ema.shadow[k]), f"EMA weight {k} differs"
    assert a.ema.num_updates == b.ema.num_updates


def test_train_resume_matches_uninterrupted(root):
    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.stages.train import train

    full = train(_params(root, "full"))

    # (1) a run with fewer steps, then extended: train.steps is outside the params hash
    train(_params(root, "ext", steps=5))
    extended = train(_params(root, "ext"))
    assert extended.summary["resumed_from_step"] == 5
    _assert_same(full, extended)

    # (2) a hard interruption after step 7: the checkpoint of step 4 (ckpt_every 4) is resumed,
    #     steps 5..7 are redone and must come out the same
    def interrupt(step: int) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_params(root, "int"), on_step=interrupt)
    assert load_checkpoint(_state(root, "int") / "last.pt")["step"] == 4
    resumed = train(_params(root, "int"))
    assert resumed.summary["resumed_from_step"] == 4
    _assert_same(full, resumed)

    # (3) preemption: SIGTERM after step 7 saves the state of step 7 (not only ckpt_every's step 4)
    #     and raises Preempted; the rerun resumes there and ends where the uninterrupted run does
    import signal

    from mtdiff.train.preemption import Preempted

    def preempt(step: int) -> None:
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM at step 7/10") as stop:
        train(_params(root, "pre"), on_step=preempt)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is only installed while training
    assert stop.value.state_path == ".mtdiff/train_state/pre/last.pt"
    assert load_checkpoint(_state(root, "pre") / "last.pt")["step"] == 7
    preempted = train(_params(root, "pre"))
    assert preempted.summary["resumed_from_step"] == 7
    _assert_same(full, preempted)

    # the final checkpoints agree too, and load with weights_only=True
    a = torch.load(_state(root, "full") / "last.pt", weights_only=True)
    b = torch.load(_state(root, "int") / "last.pt", weights_only=True)
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (10, 2, 2)
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    assert torch.equal(a["rng"][0]["noise"], b["rng"][0]["noise"])

    # the training curve (metrics/train_log.csv, a DVC plot) of the resumed run is the uninterrupted one's:
    # rows from step 2 on, the rows logged after the resumed checkpoint (step 6) redone, not duplicated
    def curve(ckpt):
        rows = list(csv.DictReader((root / f"m_{ckpt}" / "train_log.csv").open()))
        return [{k: r[k] for k in ("step", "epoch", "loss", "eps", "masked", "label", "lr")} for r in rows]

    assert [r["step"] for r in curve("full")] == ["2", "4", "6", "8", "10"]
    assert curve("int") == curve("full")
    # the extended run logged its last step (5) before going on; its later windows restart there
    assert [r["step"] for r in curve("ext")] == ["2", "4", "5", "6", "8", "10"]
    assert curve("ext")[:2] == curve("full")[:2] and curve("ext")[-2:] == curve("full")[-2:]


def test_output_removed_by_dvc_is_rewritten(root):
    """DVC deletes the stage's outputs before it runs the stage: a finished run's state still resumes
    (nothing to train) and rewrites ema.pt and the curve; raising train.steps extends it."""
    import shutil

    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.stages.train import train

    train(_params(root, "out", steps=4))
    shutil.rmtree(root / "out")
    (root / "m_out" / "train_log.csv").unlink()
    again = train(_params(root, "out", steps=4))
    assert again.summary["resumed_from_step"] == 4
    assert load_checkpoint(root / "out" / "ema.pt")["step"] == 4
    assert [r["step"] for r in csv.DictReader((root / "m_out" / "train_log.csv").open())] == ["2", "4"]

    extended = train(_params(root, "out", steps=6))
    assert extended.summary["resumed_from_step"] == 4
    assert load_checkpoint(_state(root, "out") / "last.pt")["step"] == 6


def test_finished_run_is_not_retrained(root):
    from mtdiff.stages.train import train

    train(_params(root, "done", steps=3))
    again = train(_params(root, "done", steps=3))
    assert again.summary["resumed_from_step"] == 3 and again.summary["steps"] == 3
    assert again.summary["final_loss"] is not None  # restored from the checkpoint's stats


def test_checkpoint_past_the_budget_starts_fresh(root, caplog):
    """A shorter run (same params, fewer steps) must not reuse a longer run's checkpoint: a sweep's
    fixed budget would silently become the longer one."""
    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.stages.train import train

    train(_params(root, "budget", steps=5))
    with caplog.at_level("WARNING", logger="mtdiff.train"):
        short = train(_params(root, "budget", steps=3))
    assert short.summary["resumed_from_step"] is None
    assert "past train.steps 3" in caplog.text
    assert load_checkpoint(_state(root, "budget") / "last.pt")["step"] == 3
    assert load_checkpoint(_state(root, "budget") / "last.pt.stale.1")["step"] == 5
    _assert_same(short, train(_params(root, "budget_ref", steps=3)))


def test_changed_param_starts_fresh(root, caplog):
    from mtdiff.checkpoint import load_checkpoint, params_hash
    from mtdiff.stages.train import train

    train(_params(root, "chg", steps=3))
    changed = _params(root, "chg", steps=3, **{"train.lr": 3e-3})
    with caplog.at_level("WARNING", logger="mtdiff.train"):
        result = train(changed)
    assert result.summary["resumed_from_step"] is None
    assert "starting fresh" in caplog.text
    assert (_state(root, "chg") / "last.pt.stale.1").exists()
    assert load_checkpoint(_state(root, "chg") / "last.pt")["params_hash"] == params_hash(changed)


def test_finished_run_of_other_code_is_retrained_an_unfinished_one_resumes(root, monkeypatch, caplog):
    """DVC reruns train when its code changed: a finished state from the old code must not be
    re-exported as the new code's weights. A killed run resumes across an edit, with a warning."""
    from mtdiff import checkpoint as ckpt_mod
    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.stages.train import train

    train(_params(root, "code", steps=3))
    assert load_checkpoint(root / "code" / "ema.pt")["meta"]["code_hash"] == ckpt_mod.code_hash()
    monkeypatch.setattr(ckpt_mod, "code_hash", lambda: "edited-code")
    with caplog.at_level("WARNING", logger="mtdiff.train"):
        retrained = train(_params(root, "code", steps=3))
    assert retrained.summary["resumed_from_step"] is None
    assert "a finished run of other code" in caplog.text
    assert load_checkpoint(_state(root, "code") / "last.pt.stale.1")["meta"]["code_hash"] != "edited-code"
    assert load_checkpoint(_state(root, "code") / "last.pt")["meta"]["code_hash"] == "edited-code"

    monkeypatch.setattr(ckpt_mod, "code_hash", lambda: "edited-again")
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtdiff.train"):
        extended = train(_params(root, "code", steps=5))
    assert extended.summary["resumed_from_step"] == 3
    assert "resuming a run started with other code" in caplog.text


def test_nan_loss_raises_and_keeps_last_good_checkpoint(root, monkeypatch):
    from mtdiff.checkpoint import load_checkpoint
    from mtdiff.diffusion import MTDiffusion
    from mtdiff.stages.train import train
    from mtdiff.train.step import NonFiniteLossError

    calls = {"n": 0}
    real = MTDiffusion.training_losses

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 6:  # from step 6 on the loss is NaN
            out = dict(out, loss=out["loss"] * float("nan"), eps=out["eps"] * float("nan"))
        return out

    monkeypatch.setattr(MTDiffusion, "training_losses", poisoned)
    params = _params(root, "nan", **{"train.log_every": 3})  # checks at 3, 4 (ckpt), 6: first bad = 6
    with pytest.raises(NonFiniteLossError, match=r"step 6: per-task losses \{'loss': nan, 'eps': nan"):
        train(params)
    state = load_checkpoint(_state(root, "nan") / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert load_checkpoint(root / "nan" / "ema.pt")["step"] == 4
