"""fit's hooks: each runs at its interval once its step is logged; checkpoints (at_exit) also
when fit ends, at the last step or at a stop; evaluations (samples) never after the step that
ends the run."""

import os
import signal
from types import SimpleNamespace

import pytest
from test_loop import StubRollouts, loop_of

from toolgrpo.agents.training import Hook, Interrupted, ProblemOrder, fit, transcripts


class Log:
    def __init__(self):
        self.steps, self.texts = [], {}

    def log(self, step, metrics):
        self.steps.append(step)

    def transcripts(self, step, texts, tag="train"):
        self.texts[step] = list(texts)


def stub_loop(signal_at: int | None = None):
    """A GRPOLoop over stub rollouts whose update only counts (a SIGINT to this process during
    the update of step `signal_at`)."""
    loop = loop_of(StubRollouts(varied=range(1000)), problems_per_step=2)
    loop.cfg = SimpleNamespace(max_skipped_updates=3)  # ty: ignore[invalid-assignment] - a stub
    updates = []

    def update(batch):
        updates.append(1)
        loop.state.updates += 1  # the adapter's version: the pipeline waits for it
        if len(updates) == signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # recorded by fit's StopSignals
        return {"skipped_updates": 0}

    loop.update = update
    return loop


def recorder(calls: list):
    return lambda step, done: calls.append((step, done.exiting, done.batch is not None))


def test_hooks_run_at_their_intervals_and_checkpoints_once_more_at_the_end():
    every_2, every_3_from_1, saved, evaluated = [], [], [], []
    log = Log()
    hooks = [
        Hook(recorder(every_2), every=2),
        Hook(recorder(every_3_from_1), every=3, phase=1),
        Hook(recorder(saved), every=4, at_exit=True),
        Hook(recorder(evaluated), every=2, samples=True),
        transcripts(log, every=5),
        Hook(recorder([]), every=0),  # never
    ]
    fit(stub_loop(), ProblemOrder(None), log, start=0, steps=6, seed=0, hooks=hooks)
    assert log.steps == [1, 2, 3, 4, 5, 6]
    assert [s for s, _, _ in every_2] == [2, 4, 6]
    assert [s for s, _, _ in every_3_from_1] == [1, 4]
    assert saved == [(4, False, True), (6, True, True)]  # due at 4; at the end, due or not
    assert [s for s, _, _ in evaluated] == [2, 4]  # not after the last step
    assert sorted(log.texts) == [1, 6] and len(log.texts[1]) == 4


def test_a_stop_signal_runs_the_checkpoint_of_the_step_in_flight_and_no_evaluation():
    saved, evaluated = [], []
    hooks = [
        Hook(recorder(saved), every=10, at_exit=True),
        Hook(recorder(evaluated), every=1, samples=True),
    ]
    with pytest.raises(Interrupted) as stop:
        fit(
            stub_loop(signal_at=3), ProblemOrder(None), Log(), start=0, steps=8, seed=0, hooks=hooks
        )
    assert stop.value.step == 3 and stop.value.exit_code == 128 + signal.SIGINT
    assert saved == [(3, True, True)]  # the update in flight was finished, then saved
    assert [s for s, _, _ in evaluated] == [1, 2]


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="every must be >= 0"):
        Hook(print, every=-1)
