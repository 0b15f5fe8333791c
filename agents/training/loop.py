"""One GRPO step: collect a batch, optionally refill zero-variance groups (DAPO's dynamic
sampling), update the adapter, push it to the sampler.

    loop = GRPOLoop(model, state, grpo_cfg, rollouts, problems_per_step=8, dynamic_sampling=True)
    metrics, batch = loop.step(ProblemOrder(len(problems), seed=0), seed=1)
"""

from __future__ import annotations

import dataclasses
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
        """Exactly problems_per_step groups of group_size episodes, whatever the rewards (one batch
        shape, so the train step compiles once), and the collection's stats.

        With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage, no
        gradient) are set aside and up to max_refills further collections of problems_per_step
        new problems look for informative ones. The batch is the first problems_per_step
        informative groups (extra ones are dropped); when fewer were found it is completed with
        set-aside groups whose loss_mask (and sampler_logprobs) are zeroed: filler that adds no
        term to the loss. Filler rows come last; stats["filler_groups"] counts them."""
        def play(round_seed: int) -> RolloutBatch:
            return self.rollouts.collect([next(problems) for _ in range(self.problems_per_step)],
                                         seed=round_seed, adapter_version=self.adapter_version)

        batch = play(seed)
        # the first collection's, before zero-variance groups are dropped: a collapse detector
        stats = {"collected_groups": self.problems_per_step,
                 "distinct_completions": batch.distinct_completions()}
        if not self.dynamic_sampling:
            return batch, stats
        informative, uniform = [], []
        refills = 0
        while True:
            rows = batch.informative_rows()
            informative.append(batch.select(rows))
            uniform.append(batch.select(~rows))
            found = sum(group_count(b) for b in informative)
            if found >= self.problems_per_step or refills == self.max_refills:
                break
            refills += 1
            batch = play(seed + 7919 * refills)
            stats["collected_groups"] += self.problems_per_step
        filler = max(self.problems_per_step - found, 0)
        stats.update(refills=refills, filler_groups=filler, informative_groups=min(
            found, self.problems_per_step))
        if not found:  # every group was uniform: the step is still taken (a zero-loss update)
            stats["all_groups_uniform"] = 1  # so that optimizer steps and loop steps stay one count
        pad_id = self.rollouts.tokenizer.pad_token_id or 0
        parts = [first_groups(RolloutBatch.concat([b for b in informative if len(b.rewards)],
                                                  pad_id), self.problems_per_step)] if found else []
        if filler:
            parts.append(without_loss(first_groups(RolloutBatch.concat(
                [b for b in uniform if len(b.rewards)], pad_id), filler)))
        return RolloutBatch.concat(parts, pad_id), stats

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
        real = len(batch.rewards) - stats.get("filler_groups", 0) * self.rollouts.cfg.group_size
        episodes = batch.select(np.arange(len(batch.rewards)) < real) if real else batch
        metrics = {f"train/{k}": v for k, v in episodes.metrics().items()}
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics.update({f"train/{k}": v for k, v in self.update(batch).items()})
        metrics["time/rollout_s"], metrics["time/update_s"] = t1 - t0, time.perf_counter() - t1
        return metrics, batch


def group_count(batch: RolloutBatch) -> int:
    return len(np.unique(batch.group_ids))


def first_groups(batch: RolloutBatch, k: int) -> RolloutBatch:
    """The rows of the first `k` groups of `batch`, in the order the groups appear."""
    _, first = np.unique(batch.group_ids, return_index=True)
    keep = batch.group_ids[np.sort(first)][:k]
    return batch.select(np.isin(batch.group_ids, keep))


def without_loss(batch: RolloutBatch) -> RolloutBatch:
    """`batch` with loss_mask and sampler_logprobs zeroed: rows that add nothing to the loss."""
    return dataclasses.replace(batch, loss_mask=np.zeros_like(batch.loss_mask),
                               sampler_logprobs=np.zeros_like(batch.sampler_logprobs))


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
