"""Preemption: a stop signal is recorded (not fatal) while training, and the stage exits 75 with one line.
The training side (save at the next step, exact resume) is in test_resume.py; the flow's in test_flows.py."""
from __future__ import annotations

import os
import signal

import pytest

from mtdiff.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatch


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
