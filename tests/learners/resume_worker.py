"""Trains a tiny model by GRPO with a checkpoint every step; resumes from the directory if it
holds one; can SIGKILL itself after a given step. Used by test_checkpoint.py in a subprocess."""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tiny import tiny_model  # tests/ is on PYTHONPATH: test_checkpoint.py's subprocess_env

from toolgrpo.learners.batch import TrainBatch
from toolgrpo.learners.checkpoint import Checkpointer
from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

directory, total, kill_after, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = GRPOConfig(
    learning_rate=1e-2, warmup_steps=2, total_steps=10, ppo_epochs=2, micro_batch_size=2
)
state = init_state(tiny_model(), cfg)
ckpt = Checkpointer(directory, keep=2)
position, rng = 0, jax.random.key(42)
if ckpt.latest_step is not None:
    state, meta, rng = ckpt.restore(state)
    position = meta["data_position"]
while position < total:
    rng, k_tok, k_rew = jax.random.split(rng, 3)
    batch = TrainBatch(
        tokens=jax.random.randint(k_tok, (4, 8), 0, 32),
        loss_mask=jnp.ones((4, 8)).at[:, :3].set(0),
        rewards=jax.random.bernoulli(k_rew, 0.5, (4,)).astype(jnp.float32),
        group_ids=jnp.array([0, 0, 1, 1]),
    )
    state, _ = grpo_step(state, batch, cfg)
    position += 1
    ckpt.save(position, state, {"data_position": position}, rng)
    if position == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
np.savez(
    out,
    *[np.asarray(x) for x in jax.tree.leaves((state.lora, state.opt_state))],
    updates=np.asarray(state.updates),
)
