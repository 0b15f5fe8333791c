"""Stop signals as a request to stop after a checkpoint: SIGINT (Ctrl-C) and SIGTERM (a
scheduler's stop) are recorded, and cut short only the blocks that leave nothing half-written
(a wait for a batch, an evaluation)."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Self

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and the stop of SLURM, Kubernetes and preemptible VMs: either ends a run after a
checkpoint (StopSignals)."""


class StepAbandoned(BaseException):
    """A stop signal cut short a block that leaves nothing half-done (StopSignals.abandoning).
    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way takes
    it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM as a request to stop after a checkpoint. The first signal is recorded
    (`signum`); inside an `abandoning()` block (a wait for a batch, an evaluation) it also
    raises StepAbandoned there, at once. Everywhere else, an update and a checkpoint's write
    included, a signal, and any repeat of it (`uv run` forwards a signal a second time), is only
    recorded: nothing is cut short half-written. With `abandon` False nothing is cut short (the
    processes of a multi-process learner stop after the same step). On exit the previous
    handlers come back (a program that called `train` has its Ctrl-C again); an entry point
    that ends the process after a stop ignores the signals from then on (ignore_stop_signals),
    so that a late repeat does not end it before it has."""

    def __init__(self, abandon: bool = True):
        self.abandon = abandon
        self.signum: int | None = None
        self._abandonable = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> Self:
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            message = (
                f"\n{name}: stopping: an update in flight is finished, a wait for a batch or "
                "an evaluation is cut short; then a checkpoint and the adapter are saved\n"
            )
        else:
            message = f"\n{name}: already stopping (the checkpoint is saved before the exit)\n"
        os.write(2, message.encode())  # not print: the main thread may be inside a print
        if self._abandonable:
            self._abandonable = False
            raise StepAbandoned(self.signum)

    @contextlib.contextmanager
    def abandoning(self):
        """A block that a stop signal ends at once (StepAbandoned), one that came before it
        included: it must leave nothing half-written."""
        if not self.abandon:
            yield
            return
        if self.signum is not None:  # a signal came before the block
            raise StepAbandoned(self.signum)
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM ignored from now on: for a process that is ending after a stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
