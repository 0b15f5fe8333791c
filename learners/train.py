"""The GRPO train step: optax AdamW on the LoRA parameters only, gradient accumulation over
micro-batches, several optimisation passes (PPO epochs) over one rollout batch.

    state = init_state(model, cfg)                 # LoRA params, frozen base, optimizer state
    state, metrics = grpo_step(state, batch, cfg)  # batch: a toolgrpo.learners.batch.TrainBatch
    programs = lower_passes(abstract_state, cfg, rows=8, length=4096)   # a memory plan

Memory scales with the work, not with the batch: episodes are sorted by length and cut into
micro-batches padded to one of a few lengths (toolgrpo.learners.batch); each adds its exact share of
the batch's loss and gradient; log-probabilities come from the hidden states a chunk of positions
at a time (never the [B, T, V] logits); with one pass there is no separate old-log-probability
pass, with several the old log-probabilities are computed once, before the first, so the ratio
is exactly 1 on the first pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from toolgrpo.learners import grpo
from toolgrpo.learners.batch import MicroBatch, TrainBatch, micro_batches
from toolgrpo.learners.grpo_config import GRPOConfig
from toolgrpo.learners.lora import lora_disabled


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
    if cfg.schedule == "cosine":
        if cfg.total_steps is None:
            raise ValueError(
                "the cosine schedule needs its horizon: GRPOConfig(total_steps=...), the "
                "optimizer steps of the whole run (a run's --steps x ppo_epochs), or "
                'schedule="constant"'
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
        raise ValueError(
            "the model has no LoRA parameters: toolgrpo.learners.lora.apply_lora() first"
        )
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


def _loss_and_grad(state: TrainState, mb: MicroBatch, totals, cfg: GRPOConfig):
    """((this micro-batch's share of the loss, its metrics), the gradient with respect to the
    LoRA parameters, state.lora)."""
    return jax.value_and_grad(_loss, has_aux=True)(state.lora, state, mb, totals, cfg)


_grad_jit = jax.jit(_loss_and_grad, static_argnames="cfg")
_apply_jit = jax.jit(_apply, static_argnames="cfg")
_logprobs_jit = jax.jit(sequence_logprobs, static_argnames=("adapters", "chunk"))


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
    micro-batch on the devices (for example toolgrpo.learners.sharding.shard_batch over a mesh)."""
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
            (_, aux), grads = _grad_jit(state, mb, totals, cfg)
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
    shardings (toolgrpo.learners.plan), with a `state` whose ShapeDtypeStructs carry theirs; the programs
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
        "update": _grad_jit.lower(state, mb, totals, cfg),
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
