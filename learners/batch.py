"""The batch a GRPO update trains on (`TrainBatch`) and its cut into micro-batches.

    mbs, totals, stats = micro_batches(batch, cfg)   # numpy, on the host

Episodes are sorted by length and cut into micro-batches (`plan_micro_batches`) padded to one of
a few lengths (`LENGTHS`), so that memory follows the work rather than the longest episode and a
run compiles a few shapes; `totals` are the whole batch's counts that make each micro-batch's
loss its exact share of the batch's. toolgrpo.learners.train.grpo_step runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax
import numpy as np

from toolgrpo.learners import grpo

if TYPE_CHECKING:
    from toolgrpo.learners.grpo_config import GRPOConfig


@dataclass(frozen=True)
class TrainBatch:
    """What a GRPO update trains on: one row per episode, right-padded to a common length T.
    toolgrpo.agents.batch.RolloutBatch is one, with the episodes' stats besides.

    tokens            int32 [B, T]   the whole episode as the policy saw it: prompt, assistant
                                     turns and tool observations, then padding
    loss_mask         int32 [B, T]   1 exactly on the tokens the policy sampled (assistant turns);
                                     0 on the prompt, tool observations and padding
    rewards           float32 [B]    one scalar reward per episode
    group_ids         int32 [B]      episodes of one problem share an id: advantages are relative
                                     to the group (toolgrpo.learners.grpo.group_advantages)
    sampler_logprobs  float32 [B, T] the sampler's log-probability of each sampled token at its
                                     position (0 off the mask), or None

    The log-probability of token t is taken from the model's output at t - 1, so a row's tokens
    after its last sampled one never matter (`needed_lengths`), nor does what pads it.
    """

    tokens: np.ndarray | jax.Array
    loss_mask: np.ndarray | jax.Array
    rewards: np.ndarray | jax.Array
    group_ids: np.ndarray | jax.Array
    sampler_logprobs: np.ndarray | jax.Array | None = dataclasses.field(default=None, kw_only=True)


jax.tree_util.register_dataclass(
    TrainBatch, data_fields=[f.name for f in dataclasses.fields(TrainBatch)], meta_fields=[]
)


MicroArray = np.ndarray | jax.Array | jax.ShapeDtypeStruct
"""A MicroBatch's arrays: numpy as `micro_batches` cuts them, jax.Arrays once on the devices,
shapes alone where `lower_passes` lowers the programs."""


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward's rows of a TrainBatch, the longest first, cut to a padded length
    from LENGTHS (so that a run compiles a few shapes, not one per batch), plus the advantages
    [R] and the log-probabilities a pass compares with (None where not used). Rows past the
    batch's episodes are filler: all-zero loss mask."""

    tokens: MicroArray  # int32 [R, L]
    loss_mask: MicroArray  # float32 [R, L]
    advantages: MicroArray  # float32 [R]
    sampler_logprobs: MicroArray | None = None
    old_logprobs: MicroArray | None = None
    ref_logprobs: MicroArray | None = None


LENGTHS = tuple(sorted({m * 2**k for k in range(4, 20) for m in (2, 3)}))
"""Padded lengths of micro-batches: 32, 48, 64, 96, ...: two a doubling, so that padding is at
most a third of a row and a run meets at most two new shapes per doubling of its episodes."""


def padded_length(n: int) -> int:
    return next(x for x in LENGTHS if x >= n)


def plan_micro_batches(lengths, cfg: GRPOConfig) -> list[tuple[np.ndarray, int, int]]:
    """How a batch whose episodes need `lengths` [B] tokens (up to their last sampled one) is cut
    into micro-batches: [(episode indices, rows, padded length)], longest episodes first.
    Episodes without a sampled token are left out (they carry no loss). Rows are
    micro_batch_size (the batch's size at most), or with micro_batch_tokens as many as the
    budget allows at that length; a micro-batch with fewer episodes than rows is filled."""
    lengths = np.asarray(lengths)
    b = len(lengths)
    order = [int(i) for i in np.argsort(-lengths, kind="stable") if lengths[i] > 0]
    plan = []
    while order:
        length = padded_length(int(lengths[order[0]]))
        if cfg.micro_batch_tokens is not None:
            rows = max(1, min(cfg.micro_batch_tokens // length, b))
        else:
            rows = min(cfg.micro_batch_size or b, b)
        plan.append((np.array(order[:rows]), rows, length))
        order = order[rows:]
    return plan


def needed_lengths(loss_mask) -> np.ndarray:
    """Tokens each row needs: up to and including its last sampled one (0 for none); what
    follows cannot change the log-probability of a sampled token."""
    mask = np.asarray(loss_mask) > 0
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(1), last, 0)


def _rows(x: np.ndarray, index: np.ndarray, rows: int, length: int) -> np.ndarray:
    """x[index, :length], zero-padded to [rows, length]."""
    out = np.zeros((rows, length) + x.shape[2:], x.dtype)
    width = min(length, x.shape[1])
    out[: len(index), :width] = x[index, :width]
    return out


def micro_batches(batch: TrainBatch, cfg: GRPOConfig) -> tuple[list[MicroBatch], tuple, dict]:
    """The batch cut as `plan_micro_batches` says (numpy, on the host), the batch's totals
    (masked tokens, rows with any), and statistics: what the cut costs in padding, and the
    advantages' mean and standard deviation."""
    loss_mask = np.asarray(batch.loss_mask, np.float32)
    tokens = np.asarray(batch.tokens, np.int32)
    advantages = np.asarray(
        grpo.group_advantages(
            batch.rewards, batch.group_ids, cfg.scale_by_std, baseline=cfg.baseline
        ),
        np.float32,
    )
    sampler = (
        None if batch.sampler_logprobs is None else np.asarray(batch.sampler_logprobs, np.float32)
    )
    lengths = needed_lengths(loss_mask)
    plan = plan_micro_batches(lengths, cfg) or [(np.zeros(0, int), 1, LENGTHS[0])]
    out = []
    for index, rows, length in plan:
        adv = np.zeros(rows, np.float32)
        adv[: len(index)] = advantages[index]
        out.append(
            MicroBatch(
                _rows(tokens, index, rows, length),
                _rows(loss_mask, index, rows, length),
                adv,
                None if sampler is None else _rows(sampler, index, rows, length),
            )
        )
    totals = (
        np.float32(max(loss_mask.sum(), 1.0)),
        np.float32(max((loss_mask.sum(-1) > 0).sum(), 1)),
    )
    computed = sum(rows * length for _, rows, length in plan)
    stats = {
        "micro_batches": len(plan),
        "padding_frac": 1.0 - float(lengths.sum()) / computed if computed else 0.0,
        "advantage_mean": float(advantages.mean()),
        "advantage_std": float(advantages.std()),
    }
    return out, totals, stats
