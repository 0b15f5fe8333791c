"""The same GRPO update on 8 fake CPU devices (data 2 x fsdp 4) and on one device.

What sharding may change is the order of float32 sums, so the test bounds what that can do:
- gradients agree to GRAD_RTOL of their largest element (a sum of a few hundred float32 terms
  is off by about sqrt(n) * 6e-8 of its scale, ~1e-6; a shard left out of a reduction is off by
  tens of percent);
- parameters agree to what Adam makes of such a gradient error: its update
  lr * m_hat / (sqrt(v_hat) + eps) moves by about lr * delta / sqrt(v_hat) for a gradient error
  delta, which is large only where the gradient is about zero (there the first update is
  ~lr * sign(g), and the sign of a rounding error decides it), and never more than the
  update itself, about lr a step.
"""

import subprocess
import sys
import textwrap

import pytest
from tiny import subprocess_env

SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from toolgrpo.learners import grpo
    from tiny import tiny_model
    from toolgrpo.learners.sharding import make_mesh, shard_batch, shard_state
    from toolgrpo.learners.batch import TrainBatch
    from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state, sequence_logprobs
    GRAD_RTOL = 1e-5
    assert len(jax.devices()) == 8
    cfg = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant", ppo_epochs=2,
                     micro_batch_size=8)
    def fresh():
        model = tiny_model(lora_rank=8, lora_alpha=8, lora_seed=1, vocab_size=64,
                           intermediate_size=64)
        # B != 0, so that every LoRA matrix has a gradient on the first pass
        for path, p in nnx.iter_graph(model):
            if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
                p.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), p.shape))
        return init_state(model, cfg)
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = TrainBatch(tokens=np.asarray(jax.random.randint(k1, (16, 12), 0, 64)),
                       loss_mask=np.ones((16, 12), np.float32),
                       rewards=np.asarray(jax.random.uniform(k2, (16,))),
                       group_ids=np.repeat(np.arange(4), 4))
    advantages = grpo.group_advantages(batch.rewards, batch.group_ids)

    def pg_loss(lora, state, b):  # the first pass's objective (ratio 1)
        logp = sequence_logprobs(dataclasses.replace(state, lora=lora), b.tokens,
                                 jnp.ones_like(b.tokens))
        return grpo.policy_loss(logp, jax.lax.stop_gradient(logp), advantages, b.loss_mask,
                                eps_low=cfg.eps_low, eps_high=cfg.eps_high)[0]

    mesh = make_mesh(data=2, fsdp=4)
    one, eight = fresh(), shard_state(fresh(), mesh)
    embed = jax.tree.leaves(eight.rest)[0]
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape[0] < 64
    sharded_batch = shard_batch(batch, mesh)
    g1 = jax.grad(pg_loss)(one.lora, one, batch)
    g8 = jax.grad(pg_loss)(eight.lora, eight, sharded_batch)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    delta = GRAD_RTOL * scale
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=delta)

    single, m1 = grpo_step(one, batch, cfg)
    sharded, m8 = grpo_step(eight, sharded_batch, cfg)
    for key in ("loss", "grad_norm", "first_pass_ratio_mean"):
        assert abs(m1[key] - m8[key]) <= 1e-5 * max(1.0, abs(m1[key])), (key, m1[key], m8[key])
    # Adam's sensitivity to a gradient error delta, element by element, over ppo_epochs steps
    nu = optax.tree_utils.tree_get(single.opt_state, "nu")
    steps, lr, b2 = cfg.ppo_epochs, cfg.learning_rate, 0.999
    for a, b, v in zip(jax.tree.leaves(single.lora), jax.tree.leaves(sharded.lora),
                       jax.tree.leaves(nu)):
        v_hat = np.asarray(v) / (1 - b2 ** steps)
        tol = np.minimum(4 * steps * lr * delta / np.sqrt(v_hat + 1e-30), 2 * steps * lr) + 1e-6
        err = np.abs(np.asarray(a) - np.asarray(b))
        assert (err <= tol).all(), (err.max(), tol[err.argmax()])
    print("SAME", m1["loss"], m8["loss"], "grad scale", scale)
""")


@pytest.mark.slow
def test_eight_fake_devices_give_the_same_update_as_one():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0 and "SAME" in out.stdout, out.stderr[-3000:]
