"""Rollouts ahead of the learner: a background thread collects the batches of the next steps
while the current one learns, within the staleness bound (`RolloutPipeline.oldest_adapter`).

    with RolloutPipeline(loop, problems, seed_of=lambda s: s, first=1, last=100) as rollouts:
        for step in range(1, 101):
            metrics, batch = loop.learn(rollouts.get(step), waited_s=...)
            rollouts.publish()                    # the new adapter, for the next collections
            with rollouts.paused():               # nothing collects while this runs
                evaluate(...)

    learner   | update 1 (v0->v1) | update 2 (v1->v2) | update 3 (v2->v3) |
    sampler   | batch 1, 2 (v0)   | batch 3 (v1)      | batch 4 (v2)      |   max_staleness 1

Two threads, and what each owns:

- the learner's thread (the caller's) owns the loop: it updates it, publishes each new adapter
  and, inside `paused` and after `close`, uses the sampler (an evaluation, a sync);
- the producer thread ("rollout-pipeline") owns `problems` (it alone draws from them) and,
  outside `paused`, the sampler: it syncs each collection's adapter through
  GRPOLoop.collect_batch, whose sync bookkeeping is the loop's own (GRPOLoop.sync_sampler,
  under the loop's lock).

Everything the two threads hand each other (the published adapter, the batches, the producer's
error, the pause and stop requests) lives in one `_Handoff`, under its one lock. Each batch
records the problem position after it, which the learner's checkpoint of that step keeps, so
a resumed run continues with the first problem no step has trained on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Self

import numpy as np
from flax import nnx

from toolgrpo.agents.batch import RolloutBatch
from toolgrpo.agents.training.loop import Collected, GRPOLoop, ProblemOrder


class _Handoff:
    """What the learner's thread and the producer thread share, and the one lock over it.

    Lock discipline: every field below is read and written only inside this class's methods;
    each holds `_cond` for its whole body and calls nothing outside this class meanwhile (no
    collection, update or sampler sync runs under it, and GRPOLoop's lock is never taken inside
    it). Each field has one writer:

        field        written by                      read by
        _adapter     learner: publish                producer: claim (the adapter it collects with)
        _pauses      learner: pause, resume          producer: claim (> 0: no collection starts)
        _stopped     learner: stop                   producer: claim
        _collecting  producer: claim, finish, fail   learner: pause (waits until False)
        _ready       producer: finish (adds)         learner: take (removes)
        _error       producer: fail                  learner: take
    """

    def __init__(self, adapter: tuple[int, nnx.State]):
        self._cond = threading.Condition()
        self._adapter = adapter
        self._pauses, self._stopped, self._collecting = 0, False, False
        self._ready: dict[int, Collected] = {}
        self._error: BaseException | None = None

    def publish(self, adapter: tuple[int, nnx.State]) -> None:
        """The learner's (version, LoRA) to collect with from now on."""
        with self._cond:
            self._adapter = adapter
            self._cond.notify_all()

    def claim(self, oldest: int) -> tuple[int, nnx.State] | None:
        """The producer's turn: once no pause holds it back and the published adapter is at
        least version `oldest`, mark a collection in flight and return that adapter; None
        once stopped."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._stopped or (not self._pauses and self._adapter[0] >= oldest)
            )
            if self._stopped:
                return None
            self._collecting = True
            return self._adapter

    def finish(self, step: int, collected: Collected) -> None:
        """The producer's collection ended with step `step`'s batch."""
        with self._cond:
            self._collecting = False
            self._ready[step] = collected
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The producer failed (a collection among others): `take` raises `error`."""
        with self._cond:
            self._collecting = False
            self._error = error
            self._cond.notify_all()

    def take(self, step: int) -> Collected:
        """Step `step`'s batch, once the producer has it (its error, if it failed first)."""
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                assert self._error is not None  # what the wait ended on, without a batch
                raise self._error
            return self._ready.pop(step)

    def pause(self) -> None:
        """Hold collections back, and wait for the one in flight to end."""
        with self._cond:
            self._pauses += 1
            self._cond.wait_for(lambda: not self._collecting)

    def resume(self) -> None:
        """Undo one `pause`."""
        with self._cond:
            self._pauses -= 1
            self._cond.notify_all()

    def stop(self) -> None:
        """No collection starts from now on (the one in flight ends as it will)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


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
        self._handoff = _Handoff((loop.adapter_version, loop.local_lora))
        # with several processes only process 0 collects; get() sends each batch to the others
        self._collects = loop.rollouts is not None
        self._thread = threading.Thread(target=self._produce, name="rollout-pipeline", daemon=True)

    def __enter__(self) -> Self:
        if self._collects:
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # leaving on an exception (a stop signal's among them) does not wait for the collection
        # in flight, which may take minutes: its batch is not trained on
        self.close(sync=kind is None, wait=kind is None)

    def oldest_adapter(self, step: int) -> int:
        """The staleness bound, stated and enforced here: the collection of step `step` starts
        once the published adapter is at least this version, and collects with the newest one
        published by then. Step s's update starts from version s - 1 and a collection plays
        all its episodes with one adapter, so every episode of a batch is at most
        max_staleness versions old when it is trained on, and older samples are never made.
        GRPOLoop.learn checks it; PIPELINED_TIS_CAP is sized for it. With max_staleness 0 the
        collection of step s starts after update s - 1: the synchronous loop's order, and its
        results bit for bit."""
        return step - 1 - self.loop.max_staleness

    def _produce(self) -> None:
        """The producer thread: each step's collection in turn, handed to `get`."""
        handoff = self._handoff
        try:
            for step in range(self.first, self.last + 1):
                adapter = handoff.claim(self.oldest_adapter(step))
                if adapter is None:
                    return
                version, lora = adapter
                # a failed server: the collection is replayed whole, or RolloutsDown
                done = self.loop.collect_batch(self.problems, self.seed_of(step), version, lora)
                handoff.finish(step, done)
        except BaseException as exc:  # noqa: BLE001 - handed to the learner's thread by get()
            handoff.fail(exc)

    def get(self, step: int) -> Collected:
        """Step `step`'s batch, once collected (the collection's error, if it failed); across
        processes, process 0's, to every process (a collective: every process calls get)."""
        import jax

        collected = self._handoff.take(step) if self._collects else None
        if jax.process_count() > 1:
            return broadcast_collected(collected)
        assert collected is not None  # a single process is process 0, which collects
        return collected

    def publish(self) -> None:
        """The learner's adapter changed: collections that start from now on use it."""
        self._handoff.publish((self.loop.adapter_version, self.loop.local_lora))

    @contextlib.contextmanager
    def paused(self) -> Generator[None]:
        """No collection runs inside (it waits for the one in flight to end), and the sampler
        holds the learner's latest adapter: for an evaluation."""
        if not self._collects:
            yield
            return
        self._handoff.pause()
        try:
            self.loop.sync_sampler()
            yield
        finally:
            self._handoff.resume()

    def close(self, sync: bool = True, wait: bool = True) -> None:
        """Stop after the collection in flight (waited for unless `wait` is False: the thread,
        a daemon, then ends with it or with the process); with `sync` the sampler then holds
        the learner's latest adapter, as after a synchronous loop."""
        self._handoff.stop()
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
