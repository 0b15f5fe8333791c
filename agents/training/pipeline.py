"""Rollouts ahead of the learner: a background thread collects the batches of the next steps
while the current one learns, within a staleness bound.

    with RolloutPipeline(loop, problems, seed_of=lambda s: s, first=1, last=100) as rollouts:
        for step in range(1, 101):
            metrics, batch = loop.learn(rollouts.get(step), waited_s=...)
            rollouts.publish()                    # the new adapter, for the next collections
            with rollouts.paused():               # nothing collects while this runs
                evaluate(...)

    learner   | update 1 (v0->v1) | update 2 (v1->v2) | update 3 (v2->v3) |
    sampler   | batch 1, 2 (v0)   | batch 3 (v1)      | batch 4 (v2)      |   max_staleness 1

The collection of step s starts once the learner's adapter is at least version
s - 1 - max_staleness (step s's update starts from version s - 1), with the newest adapter
published by then; a collection plays all its episodes with one adapter, so every episode of a
batch is at most max_staleness versions old when it is trained on and samples older than the
bound are never made (GRPOLoop.learn checks it). With max_staleness 0 the collection of step s
starts after update s - 1: the synchronous loop's order, and its results bit for bit.

The thread is the only one that draws problems and touches the sampler (but during `paused`):
each batch records the problem position after it, which the learner's checkpoint of that step
keeps, so a resumed run continues with the first problem no step has trained on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Self

import numpy as np

from agents.batch import RolloutBatch
from agents.training.loop import Collected, GRPOLoop, ProblemOrder


class RolloutPipeline:
    """The batches of steps first..last of `loop`, collected ahead by a thread (see module)."""

    def __init__(
        self,
        loop: GRPOLoop,
        problems: ProblemOrder,
        seed_of: Callable[[int], int],
        first: int,
        last: int,
    ):
        self.loop, self.problems, self.seed_of = loop, problems, seed_of
        self.first, self.last = first, last
        loop.data_position = problems.position
        self._cond = threading.Condition()
        self._ready: dict[int, Collected] = {}
        self._published = (loop.adapter_version, loop.local_lora)
        # with several processes only process 0 collects; get() sends each batch to the others
        self._collects = loop.rollouts is not None
        self._error: BaseException | None = None
        self._stop, self._pauses, self._busy = False, 0, False
        self._thread = threading.Thread(target=self._produce, name="rollout-pipeline", daemon=True)

    def __enter__(self) -> Self:
        if self._collects:
            self._thread.start()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # leaving on an exception (a stop signal's among them) does not wait for the collection
        # in flight, which may take minutes: its batch is not trained on
        self.close(sync=kind is None, wait=kind is None)

    def _produce(self) -> None:
        bound = self.loop.max_staleness
        try:
            for step in range(self.first, self.last + 1):
                oldest = step - 1 - bound  # the oldest adapter step's update may train on
                with self._cond:
                    self._cond.wait_for(
                        lambda oldest=oldest: (
                            self._stop or (not self._pauses and self._published[0] >= oldest)
                        )
                    )
                    if self._stop:
                        return
                    version, lora = self._published
                    self._busy = True
                try:  # a failed server: the collection is replayed whole, or RolloutsDown
                    done = self.loop.collect_batch(self.problems, self.seed_of(step), version, lora)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                with self._cond:
                    self._ready[step] = done
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the learner's thread by get()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def get(self, step: int) -> Collected:
        """Step `step`'s batch, once collected (the collection's error, if it failed); across
        processes, process 0's, to every process (a collective: every process calls get)."""
        import jax

        collected = None
        if self._collects:
            with self._cond:
                self._cond.wait_for(lambda: step in self._ready or self._error is not None)
                if step not in self._ready:
                    assert self._error is not None  # what the wait ended on, without a batch
                    raise self._error
                collected = self._ready.pop(step)
        if jax.process_count() > 1:
            return broadcast_collected(collected)
        assert collected is not None  # a single process is process 0, which collects
        return collected

    def publish(self) -> None:
        """The learner's adapter changed: collections that start from now on use it."""
        with self._cond:
            self._published = (self.loop.adapter_version, self.loop.local_lora)
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self):
        """No collection runs inside (it waits for the one in flight to end), and the sampler
        holds the learner's latest adapter: for an evaluation."""
        if not self._collects:
            yield
            return
        with self._cond:
            self._pauses += 1
            self._cond.wait_for(lambda: not self._busy)
        try:
            self.loop.sync_sampler()
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def close(self, sync: bool = True, wait: bool = True) -> None:
        """Stop after the collection in flight (waited for unless `wait` is False: the thread,
        a daemon, then ends with it or with the process); with `sync` the sampler then holds
        the learner's latest adapter, as after a synchronous loop."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        while wait and self._thread.is_alive():  # in steps, so that a signal gets through
            self._thread.join(0.2)
        if sync:
            self.loop.sync_sampler()


BATCH_ARRAYS = {
    "tokens": np.int32,
    "loss_mask": np.int32,
    "sampler_logprobs": np.float32,
    "rewards": np.float32,
    "group_ids": np.int32,
    "adapter_version": np.int32,
    "lengths": np.int32,
}
"""The arrays of a RolloutBatch that the processes of a multi-process learner share."""


def broadcast_collected(collected: Collected | None) -> Collected:
    """Process 0's `collected` in every process (the others pass None): its arrays, position and
    version; the episodes' stats stay with process 0, which alone logs them."""
    from jax.experimental import multihost_utils

    head = np.zeros(4, np.int32)
    if collected is not None:
        b, t = collected.batch.tokens.shape
        head[:] = (b, t, collected.position, collected.version)
    b, t, position, version = (int(x) for x in multihost_utils.broadcast_one_to_all(head))
    rows = {"tokens": (b, t), "loss_mask": (b, t), "sampler_logprobs": (b, t)}
    arrays = {
        name: np.asarray(getattr(collected.batch, name), dtype)
        if collected is not None
        else np.zeros(rows.get(name, (b,)), dtype)
        for name, dtype in BATCH_ARRAYS.items()
    }
    arrays = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(arrays).items()}
    if collected is not None:
        return collected
    return Collected(
        RolloutBatch(**arrays, episodes=[], transcripts=[]), {}, position, version, 0.0
    )
