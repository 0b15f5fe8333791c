"""The same GRPO update on 8 fake CPU devices (data 2 x fsdp 4) and on one device."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from learners.lora import apply_lora
    from learners.qwen2 import Qwen2Config, Qwen2ForCausalLM
    from learners.sharding import make_mesh, shard_batch, shard_state
    from learners.train import GRPOConfig, grpo_step, init_state
    assert len(jax.devices()) == 8
    cfg = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant", ppo_epochs=2,
                     micro_batch_size=8)
    mcfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)
    def fresh():
        return init_state(apply_lora(Qwen2ForCausalLM(mcfg, rngs=nnx.Rngs(0)), rank=8, alpha=8), cfg)
    k1, k2 = jax.random.split(jax.random.key(0))
    batch = {"tokens": np.asarray(jax.random.randint(k1, (16, 12), 0, 64)),
             "loss_mask": np.ones((16, 12), np.float32),
             "rewards": np.asarray(jax.random.uniform(k2, (16,))),
             "group_ids": np.repeat(np.arange(4), 4)}
    single, m1 = grpo_step(fresh(), batch, cfg)
    mesh = make_mesh(data=2, fsdp=4)
    sharded = shard_state(fresh(), mesh)
    embed = jax.tree.leaves(sharded.rest)[0]
    assert len(embed.sharding.device_set) == 8 and embed.addressable_shards[0].data.shape[0] < 64
    sharded, m8 = grpo_step(sharded, shard_batch(batch, mesh), cfg)
    assert abs(m1["loss"] - m8["loss"]) < 1e-5, (m1["loss"], m8["loss"])
    for a, b in zip(jax.tree.leaves(single.lora), jax.tree.leaves(sharded.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    print("SAME", m1["loss"], m8["loss"])
""")


def test_eight_fake_devices_give_the_same_update_as_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and "SAME" in out.stdout, out.stderr[-3000:]
