"""The GRPO train step: optax AdamW on the LoRA parameters only, gradient accumulation over
micro-batches, several optimisation passes (PPO epochs) over one rollout batch.

    state = init_state(model, cfg)                 # LoRA params, frozen base, optimizer state
    state, metrics = grpo_step(state, batch, cfg)  # batch: a TrainBatch (DESIGN.md's contract)

With several passes the old log-probabilities of the clipped ratio are computed once, before the
first, so the ratio is exactly 1 on the first pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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
    """Episodes per forward/backward; gradients are accumulated over the batch (which must be a
    multiple of it, or smaller). None: the whole batch at once."""
    ppo_epochs: int = 1
    """Optimisation passes over one rollout batch."""
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
    tis_cap: float | None = None
    """Truncated importance sampling against sampler_logprobs, capped at this weight. None: off."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        if self.aggregation not in grpo.AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {grpo.AGGREGATIONS}, "
                             f"got {self.aggregation!r}")
        if self.aggregation == "seq-mean-token-sum-norm" and not self.max_tokens:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_tokens")
        if self.learning_rate <= 0 or self.ppo_epochs < 1 or (self.total_steps or 1) < 1:
            raise ValueError("learning_rate, ppo_epochs and total_steps must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                             f"{self.eps_high}")


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

    tokens: np.ndarray
    loss_mask: np.ndarray
    rewards: np.ndarray
    group_ids: np.ndarray
    sampler_logprobs: np.ndarray | None = dataclasses.field(default=None, kw_only=True)


jax.tree_util.register_dataclass(TrainBatch, data_fields=[f.name for f in dataclasses.fields(
    TrainBatch)], meta_fields=[])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class _UpdateBatch:
    """The arrays of one update pass (micro-batched along B): a TrainBatch's, plus advantages [B]
    and the log-probabilities a pass compares with (None where not used)."""

    tokens: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    old_logprobs: jax.Array | None = None
    ref_logprobs: jax.Array | None = None
    sampler_logprobs: jax.Array | None = None


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        if cfg.total_steps is None:
            raise ValueError("the cosine schedule needs GRPOConfig.total_steps (the run's steps x "
                             "ppo_epochs); GRPOLoop sets it")
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                max(cfg.total_steps, cfg.warmup_steps + 1),
                                                end_value=0.1 * cfg.learning_rate)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate,
                                                         max(cfg.warmup_steps, 1)),
                                   optax.constant_schedule(cfg.learning_rate)],
                                  [max(cfg.warmup_steps, 1)])
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(lr, weight_decay=cfg.weight_decay))


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """Everything a GRPO update changes, plus the frozen rest of the model. `updates` counts the
    grpo_step calls applied (one per loop step, whatever ppo_epochs): the adapter's version."""

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


def sequence_logprobs(state: TrainState, tokens, attention_mask, adapters: bool = True):
    """Per-token log-probabilities [B, T] of the policy (or of the base model, adapters off)."""
    model = model_of(state)
    if adapters:
        return grpo.token_logprobs(model(tokens, attention_mask), tokens)
    with lora_disabled(model):
        return grpo.token_logprobs(model(tokens, attention_mask), tokens)


def _loss(lora, state: TrainState, mb: _UpdateBatch, cfg: GRPOConfig):
    model = nnx.merge(state.graphdef, lora, state.rest)
    logits = model(mb.tokens, mb.attention_mask)
    logprobs = grpo.token_logprobs(logits, mb.tokens)
    # one update per batch: the old policy is the current one, so its log-probabilities are the
    # current ones held constant (ratio exactly 1, the gradient of the plain policy gradient)
    old = mb.old_logprobs if mb.old_logprobs is not None else jax.lax.stop_gradient(logprobs)
    return grpo.policy_loss(
        logprobs, old, mb.advantages, mb.loss_mask, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, aggregation=cfg.aggregation, max_tokens=cfg.max_tokens,
        ref_logprobs=mb.ref_logprobs, beta=cfg.beta,
        sampler_logprobs=mb.sampler_logprobs, tis_cap=cfg.tis_cap,
        entropy=jax.lax.stop_gradient(grpo.token_entropy(logits)))


def _update(state: TrainState, batch: _UpdateBatch, cfg: GRPOConfig):
    """One optimizer step: gradients accumulated over micro-batches (mean of their losses)."""
    b = batch.tokens.shape[0]
    mbs = min(cfg.micro_batch_size or b, b)
    if b % mbs:
        raise ValueError(f"batch size {b} is not a multiple of micro_batch_size {mbs}")
    micro = jax.tree.map(lambda x: x.reshape(b // mbs, mbs, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(_loss, has_aux=True)

    def body(acc, mb):
        (loss, aux), grads = grad_fn(state.lora, state, mb, cfg)
        return jax.tree.map(jnp.add, acc, (grads, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, state.lora)
    aux0 = jax.eval_shape(lambda: grad_fn(state.lora, state, jax.tree.map(lambda x: x[0], micro),
                                          cfg)[0][1])
    (grads, aux), _ = jax.lax.scan(body, (zeros, jax.tree.map(jnp.zeros_like, aux0)), micro)
    n = b // mbs
    grads = jax.tree.map(lambda g: g / n, grads)
    aux = jax.tree.map(lambda a: a / n, aux)
    updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)
    aux["grad_norm"] = optax.tree_utils.tree_norm(grads)
    return dataclasses.replace(state, lora=lora, opt_state=opt_state), aux


_update_jit = jax.jit(_update, static_argnames="cfg")
_logprobs_jit = jax.jit(sequence_logprobs, static_argnames="adapters")


def grpo_step(state: TrainState, batch: TrainBatch, cfg: GRPOConfig):
    """Advantages, old (and reference) log-probabilities, then `ppo_epochs` updates; returns the
    new state (`updates` one higher) and the metrics of the last pass. With one epoch there is no
    separate old-log-probability pass: the update's own log-probabilities, held constant, are the
    old ones (what TRL does)."""
    tokens = jnp.asarray(batch.tokens, jnp.int32)
    # right padding: real tokens never attend to the padding after them, so no mask is needed
    attention_mask = jnp.ones_like(tokens)
    advantages = grpo.group_advantages(batch.rewards, batch.group_ids, cfg.scale_by_std)
    _, _, zero_var = grpo.group_stats(batch.rewards, batch.group_ids)
    old = ref = None
    if cfg.ppo_epochs > 1:  # later epochs compare with the policy before the first one
        old = _logprobs_jit(state, tokens, attention_mask, adapters=True)
    if cfg.beta:
        ref = _logprobs_jit(state, tokens, attention_mask, adapters=False)
    sampler = (None if batch.sampler_logprobs is None
               else jnp.asarray(batch.sampler_logprobs, jnp.float32))
    full = _UpdateBatch(tokens, attention_mask, jnp.asarray(batch.loss_mask, jnp.float32),
                        advantages, old, ref, sampler)
    metrics = []
    for _ in range(cfg.ppo_epochs):
        state, aux = _update_jit(state, full, cfg)
        metrics.append(aux)
    state = dataclasses.replace(state, updates=state.updates + 1)
    out = {k: float(v) for k, v in metrics[-1].items()}
    out["zero_variance_groups"] = float(jnp.mean(zero_var))
    out["first_pass_ratio_mean"] = float(metrics[0]["ratio_mean"])
    return state, out
