"""One process of a GRPO learner run by test_multihost.py: `jax.distributed` over processes of this
machine (or none: a single process), the tiny model's state and each step's batch sharded over
the mesh of every process's devices, a checkpoint every step, resumed when the directory holds
one. Process 0 writes each step's loss and gradient norm and the gathered final LoRA parameters
and Adam second moments to OUT.npz.

    python multihost_worker.py CKPT_DIR STEPS OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import sys

import jax
import numpy as np
import optax
from flax import nnx
from tiny import tiny_model  # tests/ is on PYTHONPATH (test_multihost.py's subprocess_env)

from toolgrpo.agents.training.distributed import DistConfig, initialize, is_main
from toolgrpo.learners.batch import TrainBatch
from toolgrpo.learners.checkpoint import Checkpointer
from toolgrpo.learners.sharding import gather, shard_batch, shard_state
from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

directory, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4:
    coordinator, n, rank = sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
    dist = DistConfig(coordinator=coordinator, num_processes=n, process_id=rank, data=2)
else:
    dist = DistConfig()
mesh = initialize(dist)
assert jax.process_count() == (n if dist.enabled else 1)

CFG = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant", micro_batch_size=4)
model = tiny_model(lora_rank=4, lora_seed=1, vocab_size=64, intermediate_size=64)
for path, p in nnx.iter_graph(model):  # B != 0, so that every matrix has a gradient
    if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
        p.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), p.shape))
state = shard_state(init_state(model, CFG), mesh)


def batch_of(step: int) -> TrainBatch:
    """Step `step`'s batch: the same numpy arrays in every process (as if broadcast)."""
    rng = np.random.default_rng(step)
    mask = np.ones((8, 12), np.float32)
    mask[:, :4] = 0
    return TrainBatch(
        tokens=rng.integers(0, 64, (8, 12)).astype(np.int32),
        loss_mask=mask,
        rewards=rng.random(8).astype(np.float32),
        group_ids=np.repeat(np.arange(2), 4).astype(np.int32),
    )


ckpt = Checkpointer(directory, keep=3)
start, history = 0, []
if ckpt.latest_step is not None:
    state, meta, _ = ckpt.restore(state)  # each process reads its shards into the template's
    start, history = ckpt.latest_step, list(meta["history"])
    assert int(gather(state.updates)) == start
    print("RESUMED", start)
for step in range(start + 1, steps + 1):
    state, metrics = grpo_step(state, batch_of(step), CFG, place=lambda mb: shard_batch(mb, mesh))
    history.append([metrics["loss"], metrics["grad_norm"]])
    ckpt.save(step, state, {"history": history})
lora = gather(state.lora)  # every process takes part; process 0 writes
nu = gather(optax.tree_utils.tree_get(state.opt_state, "nu"))
if is_main():
    np.savez(
        out,
        history=np.asarray(history),
        devices=len(jax.devices()),
        spanned=max(len(x.sharding.device_set) for x in jax.tree.leaves(state.lora)),
        **{f"lora_{i}": x for i, x in enumerate(jax.tree.leaves(lora))},
        **{f"nu_{i}": x for i, x in enumerate(jax.tree.leaves(nu))},
    )
print("DONE", jax.process_index(), history)
