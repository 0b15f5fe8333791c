"""Supervised fine-tuning (a warm start before RL): masked next-token cross-entropy, AdamW on
every parameter of the model (or on the LoRA parameters only, with `wrt=nnx.LoRAParam`).

    step = SFTStep(model, learning_rate=1e-3)
    for batch in batches:            # tokens [B, T], loss_mask [B, T] (1 on tokens to learn)
        loss = step(batch)           # updates `model` in place
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from toolgrpo.learners.grpo import token_logprobs


def sft_loss(model, tokens, loss_mask):
    """Mean negative log-likelihood of the tokens where loss_mask is 1 (right padding)."""
    logprobs = token_logprobs(model(tokens), tokens)
    mask = loss_mask.astype(jnp.float32)
    return -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)


class SFTStep:
    """A jitted AdamW step on `model` (in place), warm-up then constant learning rate;
    `scale_learning_rate(f)` multiplies the learning rate by f from the next step on."""

    def __init__(
        self,
        model,
        learning_rate: float = 1e-3,
        warmup_steps: int = 20,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        wrt=nnx.Param,
    ):
        schedule = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
        tx = optax.chain(
            optax.clip_by_global_norm(max_grad_norm),
            optax.adamw(schedule, weight_decay=weight_decay),
            optax.inject_hyperparams(optax.scale)(step_size=1.0),
        )
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        self.model = model

        @nnx.jit
        def step(model, optimizer, tokens, loss_mask):
            loss, grads = nnx.value_and_grad(sft_loss, argnums=nnx.DiffState(0, wrt))(
                model, tokens, loss_mask
            )
            optimizer.update(model, grads)
            return loss

        self._step = step

    def scale_learning_rate(self, factor: float) -> None:
        self.optimizer.opt_state[2].hyperparams["step_size"][...] = factor

    def __call__(self, batch: dict) -> float:
        return float(
            self._step(
                self.model,
                self.optimizer,
                jnp.asarray(batch["tokens"]),
                jnp.asarray(batch["loss_mask"]),
            )
        )
