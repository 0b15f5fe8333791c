"""The steps of a run: collect (from the rollout pipeline), update, log, and the hooks between
steps (toolgrpo.agents.training.hooks), until the last step, a stop signal or a fault.

    fit(loop, ProblemOrder(n), RunLog("runs/y", cfg), start=0, steps=20, seed=0, hooks=[...])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from toolgrpo.agents.training.errors import Interrupted
from toolgrpo.agents.training.health import HealthMonitor
from toolgrpo.agents.training.hooks import Hook, StepDone
from toolgrpo.agents.training.loop import GRPOLoop, NonFiniteUpdates, ProblemOrder, RolloutsDown
from toolgrpo.agents.training.runlog import StepLog
from toolgrpo.agents.training.signals import StepAbandoned, StopSignals

if TYPE_CHECKING:
    from toolgrpo.agents.training.pipeline import RolloutPipeline

logger = logging.getLogger(__name__)


def fit(
    loop: GRPOLoop,
    problems: ProblemOrder,
    log: StepLog,
    *,
    start: int,
    steps: int,
    seed: int,
    hooks: Sequence[Hook] = (),
    signals: StopSignals | None = None,
    progress: bool = True,
    health: HealthMonitor | None = None,
) -> dict:
    """Steps start+1 .. steps of `loop`, each logged, then its due `hooks` (toolgrpo.agents.training.hooks
    says when each runs). Step t samples with seed `seed * 1_000_003 + t`. Batches come from a
    RolloutPipeline, up to loop.max_staleness steps ahead (0: the synchronous loop); a hook
    that samples pauses it. `progress`: a progress bar on stderr. `health` (default: a
    HealthMonitor with default thresholds) watches every step: its health/* flags are logged
    with the step's metrics, its warnings go to this module's logger and the bar. Returns the
    last step's metrics.

    A stop signal (`signals`, or StopSignals of its own) raises Interrupted once a step is
    logged and its at_exit hooks (checkpoints) have run: the step whose update is in flight,
    or, when it comes while the learner waits for a batch or a sampling hook runs, the last one
    done (the batch is dropped: a resumed run collects it again). grpo.max_skipped_updates
    non-finite updates in a row raise NonFiniteUpdates once the last is logged, before any hook
    of it. Rollout servers that are down raise RolloutsDown, with the at_exit hooks run for the
    last step trained, named in its `step`."""
    import jax
    from tqdm import tqdm

    from toolgrpo.agents.training.pipeline import RolloutPipeline

    metrics: dict = {}
    if health is None:
        group_size = None if loop.rollouts is None else loop.rollouts.cfg.group_size
        health = HealthMonitor(group_size=group_size)
    bar = tqdm(
        range(start + 1, steps + 1),
        desc="GRPO",
        initial=start,
        total=steps,
        dynamic_ncols=True,
        disable=not progress,
    )
    done = start  # the last step logged and its hooks run

    def exit_hooks(step: int, last: StepDone) -> None:
        for hook in hooks:
            if hook.at_exit:
                hook.run(step, dataclasses.replace(last, exiting=True))

    with contextlib.ExitStack() as stack:
        interrupt = signals or stack.enter_context(StopSignals(jax.process_count() == 1))
        last = StepDone()
        try:
            with RolloutPipeline(
                loop, problems, lambda step: seed * 1_000_003 + step, start + 1, steps
            ) as rollouts:
                for step in bar:
                    t0 = time.perf_counter()
                    try:
                        with interrupt.abandoning():
                            collected = rollouts.get(step)
                    except RolloutsDown as down:
                        down.step = done
                        if done > start:
                            exit_hooks(done, StepDone())
                        raise
                    metrics, batch = loop.learn(collected, waited_s=time.perf_counter() - t0)
                    rollouts.publish()
                    # read once: a signal that arrives later in this step is acted on after the
                    # next; across processes, process 0's (so that all stop after the same step)
                    stop = agree(interrupt.requested)
                    flags, warnings = health.observe(step, metrics)
                    metrics.update(flags)
                    log.log(step, metrics)
                    for warning in warnings:
                        logger.warning("step %d: %s", step, warning.message)
                    if loop.skipped_in_a_row >= loop.cfg.max_skipped_updates:
                        raise NonFiniteUpdates(step, loop.skipped_in_a_row)
                    last, done = StepDone(metrics, batch), step
                    run_hooks(hooks, step, last, stop or step == steps, interrupt, rollouts)
                    bar.set_postfix(
                        reward=f"{metrics.get('train/reward', 0):.3f}",
                        acc=f"{metrics.get('train/accuracy', 0):.3f}",
                        tools=f"{metrics.get('train/tool_use_rate', 0):.2f}",
                        health=",".join(w.signal for w in warnings) or "ok",
                    )
                    if stop:  # process 0's signal: this process may have had none
                        raise Interrupted(step, interrupt.signum or signal.SIGTERM)
        except StepAbandoned as abandoned:
            exit_hooks(done, last if done > start else StepDone())
            raise Interrupted(done, abandoned.signum) from None
    bar.close()
    return metrics


def run_hooks(
    hooks: Sequence[Hook],
    step: int,
    last: StepDone,
    ending: bool,
    interrupt: StopSignals,
    rollouts: RolloutPipeline,
) -> None:
    """The hooks after `step`, in their order. When it is the last step fit runs (the last of
    the run, or a stop), the at_exit ones, told so (`exiting`), and no sampling hook; otherwise
    each one due, a sampling hook with the rollouts paused and cut short by a stop signal
    (StepAbandoned)."""
    for hook in hooks:
        if hook.at_exit and ending:
            hook.run(step, dataclasses.replace(last, exiting=True))
        elif hook.samples and hook.due(step) and not ending:
            with interrupt.abandoning(), rollouts.paused():
                hook.run(step, last)
        elif not hook.samples and hook.due(step):
            hook.run(step, last)


def agree(flag: bool) -> bool:
    """Process 0's `flag` in every process (a collective); `flag` itself in a single one."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))
