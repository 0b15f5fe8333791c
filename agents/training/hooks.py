"""What `fit` does between steps besides the update: hooks with intervals.

    fit(loop, problems, log, start=0, steps=100, seed=0, hooks=[
        Hook(save, every=10, at_exit=True),                 # a checkpoint (saved at a stop too)
        Evaluation(evaluator, range(30), log).hook(every=25),
        transcripts(log, every=10),
        Hook(lambda step, done: print(step, done.metrics["train/reward"]), every=5),  # your own
    ])

A hook's `run(step, done)` is called once step `step` is logged, in the order the hooks are
given, when `step % every == phase % every`; `done` is the step's StepDone (its metrics and
batch). An `at_exit` hook (a checkpoint) is also called, due or not, for the last step done when
fit ends, with `done.exiting`: at the last step, at a stop signal, or when rollout servers stay
down (then only when a step was trained in this call); a hook that `samples` (an evaluation) pauses the rollouts made ahead, is cut short by
a stop signal, and does not run after the step a stop signal ends the run with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

from toolgrpo.agents.training.evaluation import evaluate

if TYPE_CHECKING:
    from toolgrpo.agents.batch import RolloutBatch
    from toolgrpo.agents.rollout import Rollouts
    from toolgrpo.agents.training.loop import GRPOLoop
    from toolgrpo.agents.training.runlog import StepLog


@dataclass(frozen=True)
class StepDone:
    """What a hook learns of the step it runs after."""

    metrics: dict = field(default_factory=dict)
    """The step's logged metrics (empty for a step of an earlier run: a resume's first stop)."""
    batch: RolloutBatch | None = None
    """The batch the step trained on (None at exit after a step whose batch was dropped)."""
    exiting: bool = False
    """An at_exit call: fit ends after this step (the last, a stop, servers down)."""


@dataclass(frozen=True)
class Hook:
    """`run(step, done)` after every step with `step % every == phase % every` (every 0:
    never); `at_exit`: also for the last step done when fit ends (a checkpoint); `samples`: it
    uses the sampler (an evaluation: module docstring)."""

    run: Callable[[int, StepDone], object]
    _: KW_ONLY
    every: int = 1
    phase: int = 0
    at_exit: bool = False
    samples: bool = False

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"a hook's every must be >= 0, got {self.every}")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == self.phase % self.every


def transcripts(log: StepLog, every: int, count: int = 4) -> Hook:
    """The first `count` transcripts of the batch of steps 1, 1 + every, 1 + 2 * every, ..."""

    def write(step: int, done: StepDone) -> None:
        if done.batch is not None:
            log.transcripts(step, done.batch.transcripts[:count])

    return Hook(write, every=every, phase=1)


@dataclass
class Evaluation:
    """pass@k of `rollouts` (their group_size samples a problem) on the problems `indices`,
    logged to `log` as eval/* with a few transcripts; callable on its own (`evaluation(step)`:
    before training, after it) and as a fit hook (`hook(every)`). Step `step` is played with
    seed `seed + stride * step`. With `loop`, the sampler first gets the learner's latest
    adapter and the samples are checked to come from it (a no-op when the sampler holds it)."""

    rollouts: Rollouts
    indices: Sequence[int]
    log: StepLog
    _: KW_ONLY
    ks: Sequence[int] = (1,)
    seed: int = 0
    stride: int = 1
    loop: GRPOLoop | None = None

    def __call__(self, step: int, done: StepDone | None = None) -> dict:
        version = None
        if self.loop is not None:
            self.loop.sync_sampler()
            version = self.loop.adapter_version
        metrics, texts = evaluate(
            self.rollouts,
            self.indices,
            ks=self.ks,
            seed=self.seed + self.stride * step,
            adapter_version=version,
        )
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        self.log.log(step, metrics)
        self.log.transcripts(step, texts, tag="eval")
        return metrics

    def hook(self, every: int) -> Hook:
        """Evaluations every `every` steps before the last (the caller evaluates the last)."""
        return Hook(self, every=every, samples=True)
