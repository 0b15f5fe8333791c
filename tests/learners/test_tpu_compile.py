"""The real GRPO update compiled for a TPU slice this machine does not have (toolgrpo.learners.plan): XLA's
TPU compiler (libtpu) runs on the CPU, over the compile-only devices of "v5e:2x2", with the main
job's mesh and the state and micro-batch sharded as the main job shards them. Qwen2.5-0.5B's
width (hidden 896, 14/2 heads, MLP 4864, vocabulary 151936) with 2 layers, LoRA rank 128: the
figures are checked for what they are (a program for 4 TPU chips, whose arguments on a chip are a
share of the whole), not for their values; nothing is timed."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow  # a venv of its own and two TPU compilations: about a minute

ROWS, LENGTH = 4, 128

PLAN = f"""
import json
import jax
from toolgrpo.learners.plan import abstract_state, plan_step
from toolgrpo.learners.qwen2_config import Qwen2Config
from toolgrpo.learners.train import GRPOConfig

model_cfg = Qwen2Config(
    vocab_size=151_936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=2,
    num_attention_heads=14,
    num_key_value_heads=2,
)
grpo_cfg = GRPOConfig(micro_batch_size={ROWS}, total_steps=100)
state = abstract_state(model_cfg, grpo_cfg, rank=128)
print("PLAN", json.dumps(plan_step(state, grpo_cfg, {ROWS}, {LENGTH}, target="tpu:v5e:2x2")))
"""


@pytest.fixture(scope="module")
def plan(tpu_compile_python, tmp_path_factory):
    """plan_step's figures, computed in the tpu-compile venv (libtpu is not in this one)."""
    done = subprocess.run(
        [tpu_compile_python, "-c", PLAN],
        capture_output=True,
        text=True,
        timeout=900,  # a guard against a hang: the two compilations take about 30 s here
        cwd=tmp_path_factory.mktemp("plan"),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PLAN "))
    return json.loads(line.removeprefix("PLAN "))


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
