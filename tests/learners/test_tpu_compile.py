"""The real GRPO update compiled for a TPU slice this machine does not have (learners.plan): XLA's
TPU compiler (libtpu) runs on the CPU, over the compile-only devices of "v5e:2x2", with the main
job's mesh and the state and micro-batch sharded as the main job shards them. Qwen2.5-0.5B's
width (hidden 896, 14/2 heads, MLP 4864, vocabulary 151936) with 2 layers, LoRA rank 128: the
figures are checked for what they are (a program for 4 TPU chips, whose arguments on a chip are a
share of the whole), not for their values; nothing is timed."""

import importlib.util

import jax
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (XLA's TPU compiler) is not installed: the tpu-compile group installs it on "
    "x86-64 Linux only",
)

ROWS, LENGTH = 4, 128


@pytest.fixture(scope="module")
def plan():
    from learners.plan import abstract_state, plan_step
    from learners.qwen2 import Qwen2Config
    from learners.train import GRPOConfig

    model_cfg = Qwen2Config(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
    )
    grpo_cfg = GRPOConfig(micro_batch_size=ROWS, total_steps=100)
    # the tests' conftest asks for "highest" float32 matmuls; the main job runs with the default
    with jax.default_matmul_precision("default"):
        state = abstract_state(model_cfg, grpo_cfg, rank=128)
        return plan_step(state, grpo_cfg, ROWS, LENGTH, target="tpu:v5e:2x2")


def test_compiles_for_four_v5e_chips(plan):
    assert (plan["backend"], plan["devices"]) == ("tpu", 4)
    assert "v5" in plan["device"].lower(), plan["device"]  # "TPU v5 lite"
    assert plan["mesh"] == {"data": 1, "fsdp": 4}  # the main job's mesh: fsdp takes the devices
    assert plan["hbm_bytes"] == 16 * 2**30
    assert list(plan["programs"]) == ["update", "apply"]  # one PPO epoch, no KL term
    for name, program in plan["programs"].items():
        assert program["platform"] == "tpu", name
        assert program["compile_s"] > 0, name


def test_memory_per_chip_is_a_share(plan):
    """Every figure is there and positive, and a chip's arguments are a share of the whole: the
    state is split over the 4 chips (a replicated state would weigh its whole on each)."""
    update = plan["programs"]["update"]
    for figure in ("temp_bytes", "argument_bytes", "output_bytes"):
        assert update[figure] > 0, figure
    whole = update["unsharded_argument_bytes"]
    # the frozen base alone is 2 layers and the 151936 x 896 bf16 embedding: > 300 MB
    assert whole > plan["state_bytes"] > 300e6
    # vectors (norms, biases) stay replicated, so a chip holds a little more than a quarter
    assert update["argument_bytes"] < whole / 2, (update["argument_bytes"], whole)
    apply = plan["programs"]["apply"]
    assert apply["argument_bytes"] > 0 and apply["output_bytes"] > 0
    assert apply["argument_bytes"] < apply["unsharded_argument_bytes"] / 2
