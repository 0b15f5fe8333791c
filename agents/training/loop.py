"""One GRPO step: collect a batch, optionally refill zero-variance groups (DAPO's dynamic
sampling), update the adapter, push it to the sampler.

    loop = GRPOLoop(model, state, grpo_cfg, rollouts, problems_per_step=8, dynamic_sampling=True)
    metrics, batch = loop.step(ProblemOrder(len(problems), seed=0), seed=1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from flax import nnx

from agents.batch import RolloutBatch
from agents.rollout import Rollouts
from learners.train import GRPOConfig, TrainState, grpo_step


@dataclass
class GRPOLoop:
    """The state of a run between steps: the model the sampler reads, the learner's TrainState,
    the rollouts that play the training problems."""

    model: Any
    state: TrainState
    cfg: GRPOConfig
    rollouts: Rollouts
    problems_per_step: int
    dynamic_sampling: bool = False
    max_refills: int = 2

    @property
    def adapter_version(self) -> int:
        """The updates the adapter has had: the version that tags the samples it makes."""
        return int(self.state.updates)

    def collect(self, problems: Iterator[int], seed: int) -> tuple[RolloutBatch, dict]:
        """problems_per_step groups (with dynamic sampling, only groups whose rewards differ, as
        many as max_refills further collections find) and the collection's stats."""
        def play(round_seed: int) -> RolloutBatch:
            return self.rollouts.collect([next(problems) for _ in range(self.problems_per_step)],
                                         seed=round_seed, adapter_version=self.adapter_version)

        batch = play(seed)
        # the first collection's, before zero-variance groups are dropped: a collapse detector
        stats = {"collected_groups": self.problems_per_step,
                 "distinct_completions": batch.distinct_completions()}
        if not self.dynamic_sampling:
            return batch, stats
        kept = [batch.select(batch.informative_rows())]
        refills = 0
        n_groups = lambda: sum(len(np.unique(b.group_ids)) for b in kept)  # noqa: E731
        while n_groups() < self.problems_per_step and refills < self.max_refills:
            refills += 1
            more = play(seed + 7919 * refills)
            kept.append(more.select(more.informative_rows()))
            stats["collected_groups"] += self.problems_per_step
        kept = [b for b in kept if len(b.rewards)]
        stats["refills"] = refills
        if not kept:  # every group was uniform: its advantages, hence its gradient, are zero;
            # the step is still taken so that optimizer steps and loop steps stay one count
            return batch, {**stats, "all_groups_uniform": 1}
        return RolloutBatch.concat(kept, self.rollouts.tokenizer.pad_token_id or 0), stats

    def update(self, batch: RolloutBatch) -> dict:
        """One GRPO update of the adapter; the sampler gets the new version."""
        self.state, metrics = grpo_step(self.state, batch, self.cfg)
        nnx.update(self.model, self.state.lora)  # the in-process sampler reads the live model
        self.rollouts.sampler.sync_adapter(self.model, self.adapter_version)
        return metrics

    def step(self, problems: Iterator[int], seed: int) -> tuple[dict, RolloutBatch]:
        """collect, then update: ("train/..." and "time/..." metrics, the batch trained on)."""
        t0 = time.perf_counter()
        batch, stats = self.collect(problems, seed)
        t1 = time.perf_counter()
        metrics = {f"train/{k}": v for k, v in batch.metrics().items()}
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics.update({f"train/{k}": v for k, v in self.update(batch).items()})
        metrics["time/rollout_s"], metrics["time/update_s"] = t1 - t0, time.perf_counter() - t1
        return metrics, batch


class ProblemOrder:
    """Problem indices in a seeded random order (a new permutation each pass over `size`
    problems, or 0, 1, 2, ... when `size` is None); `position` counts the indices handed out, so
    that a resumed run continues where it stopped."""

    def __init__(self, size: int | None, seed: int = 0, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch, self._order = -1, None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        i, self.position = self.position, self.position + 1
        if self.size is None:
            return i
        epoch, offset = divmod(i, self.size)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return int(self._order[offset])
