"""Preemption: a stop signal is recorded (not fatal) while training, and the stage exits 75 with one line.
The training side (save at the next step, exact resume) is in test_resume.py; the flow's in test_flows.py."""
from __future__ import annotations

import os
import signal

import pytest

from mtdiff.train.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_watch_records_the_first_signal_and_restores_the_handlers(signum):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with PreemptionWatch() as watch:
        assert watch.requested is None
        os.kill(os.getpid(), signum)
        assert watch.requested == signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not overwrite the first
        assert watch.requested == signal.Signals(signum).name
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_ctrl_c_interrupts_for_real():
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_preempted_stage_exits_75_with_one_line(capsys):
    from mtdiff.stages import stage_main

    def run(params):
        raise Preempted("SIGTERM", 7, 10, ".mtdiff/train_state/checkpoints/last.pt")

    with pytest.raises(SystemExit) as stop:
        stage_main(run, [])
    assert stop.value.code == PREEMPTED_EXIT_CODE == 75
    assert capsys.readouterr().err.strip().splitlines() == [
        "preempted: train stopped by SIGTERM at step 7/10; resumable state saved to "
        ".mtdiff/train_state/checkpoints/last.pt; run the stage again to resume"]


def test_ddp_ranks_agree_on_a_stop_every_n_steps_only(monkeypatch):
    """Under DDP the stop flag is all-reduced every DDP_STOP_CHECK_EVERY steps (all ranks at the same
    steps), not every step: a per-step collective would wait for the device at each step."""
    from types import SimpleNamespace

    import torch

    from mtdiff.distributed import DistInfo
    from mtdiff.train import loop

    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), distributed=True)
    calls = []

    def all_reduce(flag, op=None):  # another rank got the signal
        calls.append(int(flag.item()))
        flag.fill_(1)

    monkeypatch.setattr(loop.dist, "all_reduce", all_reduce)
    quiet = SimpleNamespace(requested=None)
    every = loop.DDP_STOP_CHECK_EVERY
    assert [loop.stop_signal(quiet, info, s) for s in range(1, every)] == [None] * (every - 1) and not calls
    assert loop.stop_signal(quiet, info, every) == "SIGTERM" and calls == [0]
    assert loop.stop_signal(SimpleNamespace(requested="SIGUSR1"), info, 2 * every) == "SIGUSR1"
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=info.device, distributed=False)
    assert loop.stop_signal(SimpleNamespace(requested="SIGINT"), single, 3) == "SIGINT"  # no collective: every step
