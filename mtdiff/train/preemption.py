"""Preemption: a scheduler's stop signal turns into a save at the next step boundary and a clean exit.

Cluster schedulers send SIGTERM (SLURM can send SIGUSR1 ahead of time with ``--signal``) and kill
the job a grace period later; Ctrl-C sends SIGINT. :class:`PreemptionWatch` records the first such
signal instead of dying; the training loop checks :meth:`PreemptionWatch.requested` after every
step, saves its resumable state and raises :class:`Preempted`. The stage then exits with
:data:`PREEMPTED_EXIT_CODE` and one line; the rerun resumes from the saved state exactly, and the
Prefect flow reports the stage as preempted instead of retrying it.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run again to go on
PREEMPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Preempted(Exception):
    """Training stopped on a signal after saving its resumable state."""

    def __init__(self, signal_name: str, step: int, total: int, state_path: str):
        self.signal_name, self.step, self.total, self.state_path = signal_name, step, total, state_path
        super().__init__(f"train stopped by {signal_name} at step {step}/{total}; resumable state saved to "
                         f"{state_path}; run the stage again to resume")


class PreemptionWatch:
    """Context manager: while active, SIGTERM / SIGINT / SIGUSR1 are recorded, not fatal.

    Handlers are only installed from the main thread (Python's rule); elsewhere the watch is inert.
    A second SIGINT while the first is being handled restores the default handler's behaviour
    (KeyboardInterrupt), so an impatient Ctrl-C still stops a run whose save hangs.
    """

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self._received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._received is None:
            self._received = signum

    @property
    def requested(self) -> Optional[str]:
        """The first signal's name (e.g. ``"SIGTERM"``) once one arrived, else None."""
        return signal.Signals(self._received).name if self._received is not None else None

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
