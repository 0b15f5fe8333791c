"""The GRPO train step: optax AdamW on the LoRA parameters only, gradient accumulation over
micro-batches, several optimisation passes (PPO epochs) over one rollout batch.

    state = init_state(model, cfg)                 # LoRA params, frozen base, optimizer state
    state, metrics = grpo_step(state, batch, cfg)  # batch: a TrainBatch (DESIGN.md's contract)
    programs = lower_passes(abstract_state, cfg, rows=8, length=4096)   # a memory plan

Memory scales with the work, not with the batch: episodes are sorted by length and cut into
micro-batches padded to one of a few lengths (`plan_micro_batches`); each adds its exact share of
the batch's loss and gradient; log-probabilities come from the hidden states a chunk of positions
at a time (never the [B, T, V] logits); with one pass there is no separate old-log-probability
pass, with several the old log-probabilities are computed once, before the first, so the ratio
is exactly 1 on the first pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from learners import grpo
from learners.lora import lora_disabled


@dataclass(frozen=True)
class GRPOConfig:
    """Optimisation and loss settings of GRPO."""

    learning_rate: float = 5e-5
    """Peak learning rate of AdamW (on the LoRA parameters)."""
    warmup_steps: int = 10
    """Linear warm-up from 0 to the peak, in optimizer steps."""
    total_steps: int | None = None
    """Optimizer steps of the whole run (the cosine schedule's horizon). None: a training loop
    sets it from its number of steps x ppo_epochs; the optimizer needs it set."""
    schedule: str = "cosine"
    """"cosine" (decay to 10% of the peak after warm-up) or "constant"."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping."""
    micro_batch_size: int | None = 8
    """Episodes per forward/backward (rows of a micro-batch); gradients are accumulated over the
    batch. None: the whole batch at once."""
    micro_batch_tokens: int | None = None
    """Token budget of a micro-batch instead: rows x padded length <= this, so that a
    micro-batch of short episodes takes more of them (at most the batch). None: micro_batch_size
    rows whatever their length."""
    logprob_chunk: int = 1024
    """Positions whose full-vocabulary logits are computed at once (the loss never holds the
    [B, T, V] logits of a micro-batch)."""
    ppo_epochs: int = 1
    """Optimisation passes over one rollout batch."""
    target_kl: float | None = None
    """Stop a step's PPO epochs early: a pass whose approx_kl (the k3 estimate of KL(old ||
    current) over the batch's tokens, learners.grpo.approx_kl) exceeds this is not applied, and
    the step ends (the first pass, at KL 0, always is). None: every epoch runs (as before).
    Only matters with ppo_epochs > 1; 0.01 to 0.05 is usual (Stable-Baselines3, OpenAI's PPO)."""
    max_log_ratio: float = grpo.MAX_LOG_RATIO
    """Bound of |logp - logp_old| before exp in the ratio (learners.grpo.bounded_log_ratio): a
    policy that drifted over several epochs gives a finite loss. 20 (as verl) changes nothing
    short of a ratio of exp(20)."""
    eps_low: float = 0.2
    """Lower clip of the ratio (1 - eps_low)."""
    eps_high: float = 0.28
    """Upper clip (1 + eps_high); DAPO's clip-higher uses 0.28."""
    beta: float = 0.0
    """Weight of the k3 KL penalty to the base model (DeepSeekMath: 0.04; recent work: 0)."""
    aggregation: str = "seq-mean-token-mean"
    """Loss aggregation: one of learners.grpo.AGGREGATIONS."""
    max_tokens: int | None = None
    """Constant normaliser of "seq-mean-token-sum-norm" (the generation budget)."""
    scale_by_std: bool = True
    """Divide advantages by the group's std (False: Dr. GRPO)."""
    baseline: Literal["mean", "leave-one-out"] = "mean"
    """What an episode's reward is compared with: its group's mean (GRPO), or the mean of the
    other episodes of its group ("leave-one-out": RLOO, an unbiased baseline; the advantages
    are the mean's times G / (G - 1)). learners.grpo.group_advantages."""
    importance_ratio: Literal["token", "sequence"] = "token"
    """The PPO ratio per token (GRPO), or per episode ("sequence": GSPO's length-normalised
    sequence ratio, learners.grpo.sequence_log_ratio; set eps_low/eps_high to a few 1e-4 as the
    paper does). Equal with one epoch (the ratio is 1); they differ with ppo_epochs > 1 or
    pipelined rollouts."""
    tis_cap: float | None = None
    """Truncated importance sampling against sampler_logprobs, capped at this weight. None: off."""
    max_skipped_updates: int = 3
    """An update whose loss or gradient is not finite is skipped; this many in a row stop the run
    (agents.training.loop.NonFiniteUpdates), with nothing of them saved."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {grpo.AGGREGATIONS}, got {self.aggregation!r}"
            )
        if self.aggregation == "seq-mean-token-sum-norm" and not self.max_tokens:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_tokens")
        if self.learning_rate <= 0 or self.ppo_epochs < 1 or (self.total_steps or 1) < 1:
            raise ValueError("learning_rate, ppo_epochs and total_steps must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(
                f"micro_batch_tokens must be >= 1 or None, got {self.micro_batch_tokens}"
            )
        if self.max_skipped_updates < 1:
            raise ValueError(f"max_skipped_updates must be >= 1, got {self.max_skipped_updates}")
        if self.logprob_chunk < 1:
            raise ValueError(f"logprob_chunk must be >= 1, got {self.logprob_chunk}")
        if self.baseline not in grpo.BASELINES:
            raise ValueError(f"baseline must be one of {grpo.BASELINES}, got {self.baseline!r}")
        if self.importance_ratio not in grpo.IMPORTANCE_RATIOS:
            raise ValueError(
                f"importance_ratio must be one of {grpo.IMPORTANCE_RATIOS}, got "
                f"{self.importance_ratio!r}"
            )
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.max_log_ratio <= 0:
            raise ValueError(f"max_log_ratio must be > 0, got {self.max_log_ratio}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(
                f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}"
            )


@dataclass(frozen=True)
class TrainBatch:
    """What a GRPO update trains on (DESIGN.md's rollout contract): one row per episode,
    right-padded. agents.batch.RolloutBatch is one, with the episodes' stats besides.

    tokens            int32 [B, T]   prompt, assistant turns and tool observations
    loss_mask         int32 [B, T]   1 exactly on the tokens the policy sampled
    rewards           float32 [B]
    group_ids         int32 [B]      episodes of one problem share an id
    sampler_logprobs  float32 [B, T] the sampler's log-probabilities (0 off the mask), or None
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


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        if cfg.total_steps is None:
            raise ValueError(
                "the cosine schedule needs GRPOConfig.total_steps (the run's steps x "
                "ppo_epochs); GRPOLoop sets it"
            )
        lr = optax.warmup_cosine_decay_schedule(
            0.0,
            cfg.learning_rate,
            max(cfg.warmup_steps, 1),
            max(cfg.total_steps, cfg.warmup_steps + 1),
            end_value=0.1 * cfg.learning_rate,
        )
    else:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
                optax.constant_schedule(cfg.learning_rate),
            ],
            [max(cfg.warmup_steps, 1)],
        )
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm), optax.adamw(lr, weight_decay=cfg.weight_decay)
    )


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """Everything a GRPO update changes, plus the frozen rest of the model. `updates` counts the
    grpo_step calls (one per loop step, whatever ppo_epochs; skipped ones too): the adapter's
    version."""

    lora: Any
    rest: Any
    opt_state: Any
    updates: jax.Array
    graphdef: Any = dataclasses.field(metadata={"static": True})


def init_state(model, cfg: GRPOConfig) -> TrainState:
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("the model has no LoRA parameters: learners.lora.apply_lora() first")
    # the optimizer state's structure does not depend on the schedule's horizon
    optimizer = make_optimizer(dataclasses.replace(cfg, total_steps=cfg.total_steps or 1))
    return TrainState(lora, rest, optimizer.init(lora), jnp.zeros((), jnp.int32), graphdef)


def model_of(state: TrainState):
    return nnx.merge(state.graphdef, state.lora, state.rest)


def _logprobs(model, tokens, chunk: int, entropy: bool = False):
    """Per-token log-probabilities [B, T] (and entropies) of right-padded rows, in chunks."""
    # right padding: real tokens never attend to the padding after them, so no mask is needed
    hidden = model(tokens, jnp.ones_like(tokens), return_hidden=True)
    return grpo.token_logprobs_from_hidden(
        hidden, model.output_embedding(), tokens, chunk, entropy=entropy
    )


def sequence_logprobs(
    state: TrainState, tokens, attention_mask=None, adapters: bool = True, chunk: int = 1024
):
    """Per-token log-probabilities [B, T] of the policy (or of the base model, adapters off) for
    right-padded `tokens` (`attention_mask` is accepted for symmetry and not needed)."""
    model = model_of(state)
    if adapters:
        return _logprobs(model, tokens, chunk)[0]
    with lora_disabled(model):
        return _logprobs(model, tokens, chunk)[0]


def _loss(lora, state: TrainState, mb: MicroBatch, totals, cfg: GRPOConfig):
    """This micro-batch's share of the batch's loss (`totals`: the batch's masked tokens and
    rows with any), and its share of every metric."""
    model = nnx.merge(state.graphdef, lora, state.rest)
    logprobs, entropy = _logprobs(model, mb.tokens, cfg.logprob_chunk, entropy=True)
    # one update per batch: the old policy is the current one, so its log-probabilities are the
    # current ones held constant (ratio exactly 1, the gradient of the plain policy gradient)
    old = mb.old_logprobs if mb.old_logprobs is not None else jax.lax.stop_gradient(logprobs)
    n_tokens, n_seqs = totals
    return grpo.policy_loss(
        logprobs,
        old,
        mb.advantages,
        mb.loss_mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        aggregation=cfg.aggregation,
        max_tokens=cfg.max_tokens,
        ref_logprobs=mb.ref_logprobs,
        beta=cfg.beta,
        sampler_logprobs=mb.sampler_logprobs,
        tis_cap=cfg.tis_cap,
        entropy=entropy,
        n_tokens=n_tokens,
        n_seqs=n_seqs,
        max_log_ratio=cfg.max_log_ratio,
        importance_ratio=cfg.importance_ratio,
    )


@jax.jit
def _add(acc, more):
    return jax.tree.map(jnp.add, acc, more)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _apply(state: TrainState, grads, loss, cfg: GRPOConfig):
    """One optimizer step with the batch's gradient: (state, gradient norm, skipped). Where the
    loss, the gradient, the new parameters or the new optimizer state are not all finite (a NaN
    loss, an overflow, a NaN learning rate) the step is skipped: parameters and optimizer state
    come back as they were, bit for bit."""
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((lora, opt_state))
    keep = lambda new, old: jnp.where(finite, new, old)
    return (
        dataclasses.replace(
            state,
            lora=jax.tree.map(keep, lora, state.lora),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        ),
        grad_norm,
        ~finite,
    )


_grad_jit = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnames="cfg")
_apply_jit = jax.jit(_apply, static_argnames="cfg")
_logprobs_jit = jax.jit(sequence_logprobs, static_argnames=("adapters", "chunk"))


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


def grpo_step(state: TrainState, batch: TrainBatch, cfg: GRPOConfig, place=None):
    """Advantages, old (and reference) log-probabilities, then `ppo_epochs` updates; returns the
    new state (`updates` one higher) and the metrics of the last pass applied, with
    "approx_kl_pass_k" (k >= 1, the drift from the old policy at the start of pass k) for each
    later pass computed and "ppo_epochs_done". With `target_kl`, a pass whose approx_kl exceeds
    it is not applied and ends the step. An update whose loss,
    gradient or result is not finite is skipped (`_apply`): the state keeps its parameters and
    optimizer state, and metrics["skipped_updates"] is 1 (else 0). With one epoch there is no
    separate old-log-probability pass: the update's own log-probabilities, held constant, are the
    old ones (what TRL does). Every pass runs micro-batch by micro-batch (`micro_batches`), each
    adding its exact share of the batch's loss and gradient. `place`, when given, puts each
    micro-batch on the devices (for example learners.sharding.shard_batch over a mesh)."""
    mbs, totals, stats = micro_batches(batch, cfg)
    place = place or (lambda mb: jax.tree.map(jnp.asarray, mb))
    mbs = [place(mb) for mb in mbs]
    if cfg.ppo_epochs > 1:  # later epochs compare with the policy before the first one
        mbs = [
            dataclasses.replace(
                mb,
                old_logprobs=_logprobs_jit(
                    state, mb.tokens, adapters=True, chunk=cfg.logprob_chunk
                ),
            )
            for mb in mbs
        ]
    if cfg.beta:
        mbs = [
            dataclasses.replace(
                mb,
                ref_logprobs=_logprobs_jit(
                    state, mb.tokens, adapters=False, chunk=cfg.logprob_chunk
                ),
            )
            for mb in mbs
        ]
    metrics, kls, before = [], {}, state
    for epoch in range(cfg.ppo_epochs):
        acc = None
        for mb in mbs:
            (_, aux), grads = _grad_jit(state.lora, state, mb, totals, cfg)
            acc = (grads, aux) if acc is None else _add(acc, (grads, aux))
        assert acc is not None  # micro_batches cuts at least one
        grads, aux = acc
        if epoch:
            kls[f"approx_kl_pass_{epoch}"] = float(aux["approx_kl"])
            if cfg.target_kl is not None and kls[f"approx_kl_pass_{epoch}"] > cfg.target_kl:
                break  # the policy moved far enough from the one that sampled: stop here
        state, aux["grad_norm"], aux["skipped"] = _apply_jit(state, grads, aux["loss"], cfg)
        metrics.append(aux)
    # a pass that was not finite skips the whole update: the earlier passes' too
    skipped = any(bool(m.pop("skipped")) for m in metrics)
    state = dataclasses.replace(before if skipped else state, updates=state.updates + 1)
    out = {k: float(v) for k, v in metrics[-1].items()}
    out["skipped_updates"] = float(skipped)
    out["ppo_epochs_done"] = float(len(metrics))
    out.update(kls)
    _, _, zero_var = grpo.group_stats(batch.rewards, batch.group_ids)
    out.update(
        stats,
        zero_variance_groups=float(jnp.mean(zero_var)),
        first_pass_ratio_mean=float(metrics[0]["ratio_mean"]),
    )
    return state, out


def lower_passes(
    state: TrainState,
    cfg: GRPOConfig,
    rows: int,
    length: int,
    sampler_logprobs: bool = False,
    place=None,
) -> dict:
    """The programs one step of `cfg` runs on a micro-batch of [rows, length], lowered for the
    current backend (nothing runs; `state` may hold jax.ShapeDtypeStructs): "update" (forward
    and backward of one micro-batch), "apply" (the optimizer step) and, where the step has them,
    "old_logprobs" (ppo_epochs > 1) and "ref_logprobs" (beta > 0). Compile them and read
    `.memory_analysis()` for what a step needs. `place`, as grpo_step's, takes the micro-batch
    (of jax.ShapeDtypeStructs) to the one the devices get: for a mesh, ShapeDtypeStructs with
    shardings (learners.plan), with a `state` whose ShapeDtypeStructs carry theirs; the programs
    then compile for the mesh's devices."""
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    tokens = spec((rows, length), jnp.int32)
    per_token = spec((rows, length), jnp.float32)
    mb = MicroBatch(
        tokens,
        per_token,
        spec((rows,), jnp.float32),
        per_token if sampler_logprobs else None,
        per_token if cfg.ppo_epochs > 1 else None,
        per_token if cfg.beta else None,
    )
    if place is not None:
        mb = place(mb)
        tokens = mb.tokens
    totals = (spec((), jnp.float32), spec((), jnp.float32))
    programs = {
        "update": _grad_jit.lower(state.lora, state, mb, totals, cfg),
        "apply": _apply_jit.lower(state, state.lora, spec((), jnp.float32), cfg),
    }
    if cfg.ppo_epochs > 1:
        programs["old_logprobs"] = _logprobs_jit.lower(
            state, tokens, adapters=True, chunk=cfg.logprob_chunk
        )
    if cfg.beta:
        programs["ref_logprobs"] = _logprobs_jit.lower(
            state, tokens, adapters=False, chunk=cfg.logprob_chunk
        )
    return programs
