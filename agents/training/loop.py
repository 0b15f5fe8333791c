"""One GRPO step: collect a batch, optionally refill zero-variance groups (DAPO's dynamic
sampling), update the adapter, push it to the sampler.

    loop = GRPOLoop(model=model, state=state, cfg=grpo_cfg, rollouts=rollouts,
                    problems_per_step=8, dynamic_sampling=True)
    metrics, batch = loop.step(ProblemOrder(len(problems), seed=0), seed=1)   # synchronous
    loop.restore(state, data_position=position)              # continue from a checkpoint

`toolgrpo.agents.training.pipeline.RolloutPipeline` collects the next steps' batches while this one
learns (`max_staleness` > 0, within the staleness bound RolloutPipeline.oldest_adapter states
and enforces); `fit` runs every step through it.

A collection whose rollout server failed (it died, stopped answering or lost its adapter) is
discarded whole: the sampler recovers (a server this job launched is restarted, one given by URL
waited for; the adapter reloaded at the same version), the problem order is rewound, and the
collection is replayed with the same problems and seed (`collect_batch`). A step never trains
on a short batch or on one that mixes episodes from before and after a failure. When the server
does not come back, or the replays run out (`max_replays`), RolloutsDown stops the run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from flax import nnx

from toolgrpo.agents.batch import RolloutBatch
from toolgrpo.agents.rollout import Rollouts
from toolgrpo.agents.sampling import Sampler
from toolgrpo.agents.training.errors import TrainingError
from toolgrpo.agents.vllm_client import ServerError, recoverable
from toolgrpo.learners.train import GRPOConfig, TrainState, grpo_step

if TYPE_CHECKING:
    from jax.sharding import Mesh

logger = logging.getLogger(__name__)

PIPELINED_TIS_CAP = 2.0
"""The truncated importance weight cap a pipelined run uses when its GRPOConfig sets none: its
samples come from an older adapter (the staleness bound: RolloutPipeline.oldest_adapter)."""


@dataclass(frozen=True)
class Collected:
    """One step's batch as the rollouts made it."""

    batch: RolloutBatch
    stats: dict
    position: int
    """ProblemOrder.position after this collection: what a checkpoint of its step records."""
    version: int
    """The adapter version that sampled every episode of the batch."""
    collect_s: float
    """Seconds the collection took."""


class NonFiniteUpdates(TrainingError, RuntimeError):
    """The updates of `count` steps in a row, up to `step`, had a non-finite loss or gradient
    (each was skipped, so the state holds none of them): the run stops rather than go on."""

    exit_code = 3  # rerunning does not help

    def __init__(self, step: int, count: int, checkpoint: int | None = None):
        self.step, self.count, self.checkpoint = step, count, checkpoint
        super().__init__(str(self))

    def __str__(self) -> str:
        kept = (
            f"checkpoint {self.checkpoint} is the last one"
            if self.checkpoint is not None
            else "no checkpoint was written"
        )
        return (
            f"the updates of steps {self.step - self.count + 1}-{self.step} had a non-finite "
            f"loss or gradient ({self.count} in a row, each skipped; grpo.max_skipped_updates): "
            f"stopped without saving them, {kept} (check the learning rate and the rewards)"
        )


class RolloutsDown(TrainingError, RuntimeError):
    """The rollout servers failed and did not come back: the run stops. `step` is the last
    step trained (fit sets it, once that step's checkpoint is saved)."""

    exit_code = 5  # resume once they answer

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def sampler_copy(model):
    """A model for the sampler that shares `model`'s arrays (no copy of the weights) but has
    its own variables, so that the learner can update its LoRA parameters while the sampler
    reads the previous ones (`GRPOLoop.sampler_model`). (nnx.merge(*nnx.split(model)) would
    not do: it returns the same variables.)"""
    return nnx.clone(model)


@dataclass(kw_only=True)
class GRPOLoop:
    """The state of a run between steps: the model the learner updates, the learner's
    TrainState, the rollouts that play the training problems. Its fields are the learner
    thread's; the one exception is the sampler's adapter (`sync_sampler`), which a
    RolloutPipeline's producer thread syncs too."""

    model: nnx.Module
    state: TrainState
    cfg: GRPOConfig
    rollouts: Rollouts | None
    """None in the processes of a multi-process learner but process 0, which alone collects."""
    problems_per_step: int
    dynamic_sampling: bool = False
    max_refills: int = 2
    max_staleness: int = 0
    """Updates the adapter that samples a step's batch may lag the one it trains (0: the
    synchronous loop; the bound: RolloutPipeline.oldest_adapter). Above 0 the sampler needs a
    model of its own (`sampler_model`) and the update weights tokens by truncated importance
    sampling (cfg.tis_cap, PIPELINED_TIS_CAP unless set)."""
    sampler_model: nnx.Module | None = None
    """The model the sampler reads (the JAX sampler's; the one whose adapter goes to vLLM):
    None means `model` itself, which only a synchronous loop may share."""
    data_position: int = 0
    """ProblemOrder.position after the last batch trained on (checkpoints record it)."""
    mesh: Mesh | None = None
    """The mesh the state is sharded over (toolgrpo.learners.sharding.shard_state): each update's
    micro-batches are placed over it too. None: one device."""
    max_replays: int = 3
    """Replays of one collection whose rollout server failed (each after the sampler's
    recover()) before RolloutsDown stops the run."""
    local_lora: nnx.State = field(init=False, repr=False)
    """The adapter's LoRA parameters as the model holds them (whole in this process: gathered
    from the mesh when it spans several processes)."""
    skipped_in_a_row: int = field(default=0, init=False)
    """Updates skipped in a row, up to the last one (non-finite: toolgrpo.learners.train._apply)."""
    _synced: int | None = field(default=None, init=False, repr=False)
    """The adapter version the sampler holds: written by sync_sampler only, under
    _sampler_lock."""
    _sampler_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.sampler_model is None:
            self.sampler_model = self.model
        if self.max_staleness and self.sampler_model is self.model:
            raise ValueError(
                "max_staleness > 0 needs a sampler_model apart from the learner's "
                "model (toolgrpo.agents.training.loop.sampler_copy(model)), which the "
                "sampler must read"
            )
        if self.max_staleness and self.cfg is not None and self.cfg.tis_cap is None:
            self.cfg = dataclasses.replace(self.cfg, tis_cap=PIPELINED_TIS_CAP)
        self._synced = None if self.rollouts is None else self.sampler.adapter_version
        self.local_lora = self.state.lora

    @property
    def collector(self) -> Rollouts:
        """`rollouts`, in the one process that collects."""
        if self.rollouts is None:
            raise RuntimeError("this process of the learner has no rollouts: process 0 collects")
        return self.rollouts

    @property
    def sampler(self) -> Sampler:
        """The sampler of `rollouts` (process 0's): the one whose adapter sync_sampler sets."""
        return self.collector.sampler

    @property
    def adapter_version(self) -> int:
        """The updates the adapter has had: the version that tags the samples it makes."""
        return int(self.state.updates)

    def sync_sampler(self, version: int | None = None, lora: nnx.State | None = None) -> None:
        """Give the sampler adapter `version` with LoRA parameters `lora` (default: the
        learner's latest, for the learner's thread), unless it holds that version already.

        Any thread may call it: the version the sampler holds (`_synced`) and the sampler
        model's LoRA are written here only, under `_sampler_lock`. A RolloutPipeline's producer
        thread syncs each collection's adapter through collect_batch; the learner's thread its
        latest one (the pipeline's pause keeps the two from touching the sampler at once)."""
        if version is None:
            version, lora = self.adapter_version, self.local_lora
        if self.rollouts is None:
            return
        with self._sampler_lock:
            if version == self._synced:
                return
            if self.sampler_model is not self.model:
                nnx.update(self.sampler_model, lora)
            self.sampler.sync_adapter(self.sampler_model, version)
            self._synced = version

    def restore(self, state: TrainState, data_position: int) -> None:
        """Continue from `state` (as toolgrpo.learners.checkpoint restored it) at problem position
        `data_position` (what the checkpoint of its step recorded): the learner's state and
        model take its adapter (gathered whole from the mesh when the state is sharded), and
        the sampler gets it. Every process of a multi-process learner calls it (the gather is
        a collective)."""
        from toolgrpo.learners.sharding import gather

        self.state = state
        self.local_lora = state.lora if self.mesh is None else gather(state.lora)
        nnx.update(self.model, self.local_lora)
        self.data_position = data_position
        self.sync_sampler()

    def collect_batch(
        self,
        problems: ProblemOrder,
        seed: int,
        version: int | None = None,
        lora: nnx.State | None = None,
    ) -> Collected:
        """One step's batch by adapter `version` with LoRA parameters `lora` (default: the
        learner's latest): sync the sampler, collect. A collection whose server failed is
        discarded, the sampler recovered and the collection replayed from the same problem
        position with the same seed (module docstring); RolloutsDown when that cannot be."""
        if version is None:
            version, lora = self.adapter_version, self.local_lora
        start = problems.position
        for replay in range(self.max_replays + 1):
            t0 = time.perf_counter()
            try:
                self.sync_sampler(version, lora)
                batch, stats = self.collect(problems, seed, version)
                return Collected(batch, stats, problems.position, version, time.perf_counter() - t0)
            except Exception as exc:
                fault = recoverable(exc)
                if fault is None or not hasattr(self.sampler, "recover"):
                    raise
                if replay == self.max_replays:
                    raise RolloutsDown(
                        f"the rollout server failed in {replay + 1} collections in a row: "
                        f"{first_line(fault)}"
                    ) from exc
            problems.position = start  # the same problems again, none skipped or repeated
            logger.warning(
                "collection of %d problems failed (%s): discarded; recovering the sampler "
                "and replaying it",
                self.problems_per_step,
                first_line(fault),
            )
            try:
                self.sampler.recover()
            except ServerError as down:
                raise RolloutsDown(f"the rollout server is down: {first_line(down)}") from down
        raise AssertionError("unreachable")

    def collect(
        self, problems: Iterator[int], seed: int, adapter_version: int | None = None
    ) -> tuple[RolloutBatch, dict]:
        """Exactly problems_per_step groups of group_size episodes, whatever the rewards (one batch
        shape, so the train step compiles once), and the collection's stats.

        With dynamic sampling (DAPO), groups whose rewards are all equal (zero advantage, no
        gradient) are set aside and up to max_refills further collections of problems_per_step
        new problems look for informative ones. The batch is the first problems_per_step
        informative groups (extra ones are dropped); when fewer were found it is completed with
        set-aside groups whose loss_mask (and sampler_logprobs) are zeroed: filler that adds no
        term to the loss. Filler rows come last; stats["filler_groups"] counts them.
        `adapter_version` (default: the learner's) is the version the sampler holds."""
        version = self.adapter_version if adapter_version is None else adapter_version

        def play(round_seed: int) -> RolloutBatch:
            return self.collector.collect(
                [next(problems) for _ in range(self.problems_per_step)],
                seed=round_seed,
                adapter_version=version,
            )

        batch = play(seed)
        # the first collection's, before zero-variance groups are dropped: a collapse detector
        stats = {
            "collected_groups": self.problems_per_step,
            "distinct_completions": batch.distinct_completions(),
        }
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
        stats.update(
            refills=refills,
            filler_groups=filler,
            informative_groups=min(found, self.problems_per_step),
        )
        if not found:  # every group was uniform: the step is still taken (a zero-loss update)
            stats["all_groups_uniform"] = 1  # so that optimizer steps and loop steps stay one count
        pad_id = self.collector.tokenizer.pad_token_id or 0
        parts = (
            [
                first_groups(
                    RolloutBatch.concat([b for b in informative if len(b.rewards)], pad_id),
                    self.problems_per_step,
                )
            ]
            if found
            else []
        )
        if filler:
            parts.append(
                without_loss(
                    first_groups(
                        RolloutBatch.concat([b for b in uniform if len(b.rewards)], pad_id), filler
                    )
                )
            )
        return RolloutBatch.concat(parts, pad_id), stats

    def update(self, batch: RolloutBatch) -> dict:
        """One GRPO update of the adapter (the learner's model gets it; the sampler's does
        through sync_sampler)."""
        from toolgrpo.learners.sharding import gather, place_batch

        mesh = self.mesh
        place = None if mesh is None else (lambda mb: place_batch(mb, mesh))
        self.state, metrics = grpo_step(self.state, batch, self.cfg, place=place)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if metrics["skipped_updates"] else 0
        # whole in this process (across processes a collective that every process joins), so
        # that the model, which the sampler and the exports read, is not spread over the mesh
        self.local_lora = self.state.lora if self.mesh is None else gather(self.state.lora)
        nnx.update(self.model, self.local_lora)
        return metrics

    def learn(self, collected: Collected, waited_s: float) -> tuple[dict, RolloutBatch]:
        """The update on a collected batch: ("train/..." and "time/..." metrics, the batch).
        train/staleness is the mean over episodes of (learner version - sampler version); a
        batch that breaks the staleness bound (RolloutPipeline.oldest_adapter, which never
        makes one) is refused."""
        batch, stats = collected.batch, collected.stats
        staleness = self.adapter_version - batch.adapter_version
        if staleness.max(initial=0) > self.max_staleness:
            raise RuntimeError(
                f"a batch sampled by adapter {collected.version} reached the update "
                f"of adapter {self.adapter_version} (max_staleness "
                f"{self.max_staleness})"
            )
        metrics = {}
        if batch.episodes:  # (a process but 0 of a multi-process learner has only the arrays)
            filler = stats.get("filler_groups", 0) * self.collector.cfg.group_size
            real = len(batch.rewards) - filler
            episodes = batch.select(np.arange(len(batch.rewards)) < real) if real else batch
            metrics = {f"train/{k}": v for k, v in episodes.metrics().items()}
        metrics.update({f"train/{k}": v for k, v in stats.items()})
        metrics["train/staleness"] = float(np.mean(staleness))
        t0 = time.perf_counter()
        metrics.update({f"train/{k}": v for k, v in self.update(batch).items()})
        self.data_position = collected.position
        metrics["time/update_s"] = time.perf_counter() - t0
        metrics["time/rollout_s"], metrics["time/collect_s"] = waited_s, collected.collect_s
        return metrics, batch

    def step(self, problems: ProblemOrder, seed: int) -> tuple[dict, RolloutBatch]:
        """Synchronously: collect, update, sync the sampler ("train/..." and "time/..." metrics,
        the batch trained on). time/rollout_s is the collection's time."""
        t0 = time.perf_counter()
        collected = self.collect_batch(problems, seed)
        out = self.learn(collected, time.perf_counter() - t0)
        self.sync_sampler()
        return out


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (a server's may end with its log)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def group_count(batch: RolloutBatch) -> int:
    return len(np.unique(batch.group_ids))


def first_groups(batch: RolloutBatch, k: int) -> RolloutBatch:
    """The rows of the first `k` groups of `batch`, in the order the groups appear."""
    _, first = np.unique(batch.group_ids, return_index=True)
    keep = batch.group_ids[np.sort(first)][:k]
    return batch.select(np.isin(batch.group_ids, keep))


def without_loss(batch: RolloutBatch) -> RolloutBatch:
    """`batch` with loss_mask and sampler_logprobs zeroed: rows that add nothing to the loss."""
    return dataclasses.replace(
        batch,
        loss_mask=np.zeros_like(batch.loss_mask),
        sampler_logprobs=np.zeros_like(batch.sampler_logprobs),
    )


class ProblemOrder:
    """Problem indices in a seeded random order (a new permutation each pass over `size`
    problems, or 0, 1, 2, ... when `size` is None); `position` counts the indices handed out, so
    that a resumed run continues where it stopped."""

    def __init__(self, size: int | None, seed: int = 0, position: int = 0):
        self.size, self.seed, self.position = size, seed, position
        self._epoch = -1  # no permutation drawn yet: the first index draws epoch 0's
        self._order = np.arange(0)

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
