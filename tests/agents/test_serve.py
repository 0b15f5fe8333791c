"""toolgrpo.agents.serve, the JAX-native server of the completions API, with the VLLMSampler as its client;
and the client's own failure paths (unreachable server, a server dying mid-rollout).

The vLLM path itself is tested against a real vLLM in test_vllm_server.py."""

import json
import urllib.error
import urllib.request

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scripted import force_two_rounds

import toolgrpo.envs  # noqa: F401
from toolgrpo.agents.rollout import RolloutConfig, RolloutError, Rollouts
from toolgrpo.agents.sampling import SamplingParams
from toolgrpo.agents.serve import CompletionService, serve
from toolgrpo.agents.vllm_client import ServerError, StaleAdapterError, VLLMSampler
from toolgrpo.agents.vllm_server import VLLMServer, python_serve_command
from toolgrpo.learners.grpo import token_logprobs
from toolgrpo.learners.lora import lora_disabled, merge_lora
from toolgrpo.learners.params import save_pretrained


@pytest.fixture(scope="module")
def server(chat_model, chat_tokenizer):
    service = CompletionService(
        _without_lora(chat_model), chat_tokenizer, "tiny-qwen", max_lora_rank=8
    )
    httpd = serve(service, port=0)
    yield f"http://127.0.0.1:{httpd.server_port}", service
    httpd.shutdown()


def _without_lora(model):
    """A copy of the base model: the adapters zeroed, then merged (which adds exactly nothing to
    the frozen kernels) and so removed."""
    copy = nnx.clone(model)
    nnx.update(copy, jax.tree.map(jnp.zeros_like, nnx.state(copy, nnx.LoRAParam)))
    return merge_lora(copy)


def post(url, path, body):
    req = urllib.request.Request(
        url + path,
        json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_rollouts_through_the_server_match_the_learner(
    server, chat_model, chat_tokenizer, tmp_path
):
    url, _service = server
    sampler = VLLMSampler(url, chat_tokenizer, adapter_dir=str(tmp_path))
    assert sampler.model == "tiny-qwen" and sampler.adapter_version == 0
    assert sampler.sync_adapter(chat_model, 1) == f"{sampler.prefix}-v1"
    assert sampler.prefix.startswith("toolgrpo-")
    sampler.sync_adapter(chat_model, 2)  # the old adapter is unloaded, the new one listed
    models = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]
    assert [(m["id"], m["parent"]) for m in models] == [
        ("tiny-qwen", None),
        (f"{sampler.prefix}-v2", "tiny-qwen"),
    ]
    cfg = RolloutConfig(group_size=2, max_turn_tokens=20, max_total_tokens=512)
    with Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, chat_tokenizer, cfg) as r:
        batch = r.collect([1, 2], seed=3)
    assert set(batch.adapter_version) == {2}
    tokens = jnp.asarray(batch.tokens)
    learner = np.asarray(token_logprobs(chat_model(tokens), tokens))  # the adapted policy
    mask = batch.loss_mask == 1
    assert mask.sum() > 0
    np.testing.assert_allclose(batch.sampler_logprobs[mask], learner[mask], atol=1e-4)
    with lora_disabled(chat_model):  # and the adapter mattered: the base model differs
        base = np.asarray(token_logprobs(chat_model(tokens), tokens))
    assert np.abs(base[mask] - learner[mask]).max() > 1e-3
    with pytest.raises(StaleAdapterError, match="version 1 was requested"):
        sampler.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), adapter_version=1)


def test_completions_api_shape_and_stop_strings(server, chat_tokenizer):
    url, _ = server
    status, raw = post(
        url,
        "/v1/completions",
        {
            "model": "tiny-qwen",
            "prompt": [[5, 6, 7], [8]],
            "n": 2,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
    )
    reply = json.loads(raw)
    assert status == 200 and len(reply["choices"]) == 4
    c = reply["choices"][0]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
    assert c["finish_reason"] in ("stop", "length") and len(c["logprobs"]["token_logprobs"]) == len(
        c["token_ids"]
    )
    assert reply["choices"][0]["token_ids"] == reply["choices"][1]["token_ids"]  # greedy, n=2
    word = chat_tokenizer.decode(c["token_ids"][-1:])
    status, raw = post(
        url,
        "/v1/completions",
        {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "stop": [word]},
    )
    stopped = json.loads(raw)["choices"][0]
    assert stopped["stop_reason"] == word and not stopped["text"].endswith(word)


def test_server_errors_are_vllm_shaped(server, chat_tokenizer, tmp_path):
    url, _ = server
    status, raw = post(url, "/v1/completions", {"model": "nope", "prompt": [1]})
    assert status == 404 and json.loads(raw)["type"] == "NotFoundError"
    assert post(url, "/v1/completions", {"prompt": []})[0] == 400
    assert post(url, "/v1/completions", {"prompt": [10**6]})[0] == 400
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "ghost"})[0] == 404
    status, raw = post(
        url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")}
    )
    assert status == 404 and "cannot load" in json.loads(raw)["message"]


def test_adapter_rank_above_the_limit_and_servers_without_lora(
    chat_model, chat_tokenizer, tmp_path
):
    base = _without_lora(chat_model)
    httpd = serve(CompletionService(base, chat_tokenizer, "m", max_lora_rank=0), port=0)
    try:
        sampler = VLLMSampler(
            f"http://127.0.0.1:{httpd.server_port}", chat_tokenizer, adapter_dir=str(tmp_path)
        )
        with pytest.raises(ServerError, match="cannot load LoRA adapters at run time"):
            sampler.sync_adapter(chat_model, 1)
    finally:
        httpd.shutdown()
    httpd = serve(CompletionService(base, chat_tokenizer, "m", max_lora_rank=2), port=0)
    try:
        sampler = VLLMSampler(
            f"http://127.0.0.1:{httpd.server_port}", chat_tokenizer, adapter_dir=str(tmp_path)
        )
        with pytest.raises(
            ServerError, match="restart it with a larger one.*greater than max_lora_rank"
        ):
            sampler.sync_adapter(chat_model, 1)  # rank 4 > 2
    finally:
        httpd.shutdown()


def test_unreachable_server_is_a_clear_error(chat_tokenizer):
    from toolgrpo.agents.vllm_server import free_port

    with pytest.raises(ServerError, match="unreachable.*vllm.entrypoints.openai.api_server"):
        VLLMSampler(f"http://127.0.0.1:{free_port()}", chat_tokenizer, retries=1, backoff_s=0.01)


@pytest.mark.slow
def test_launcher_and_a_server_dying_mid_rollout(chat_model, chat_tokenizer, tmp_path):
    """VLLMServer starts `python -m toolgrpo.agents.serve` (vllm serve's flags); killing it mid-rollout
    ends the collection with a clear error and no batch."""
    model_dir = tmp_path / "model"
    save_pretrained(_without_lora(chat_model), str(model_dir))
    chat_tokenizer.save_pretrained(str(model_dir))
    server = VLLMServer(
        str(model_dir), max_lora_rank=8, command=python_serve_command(), startup_timeout_s=120
    )
    with server:
        assert "--enable-lora" in server.cmd and "--gpu-memory-utilization" in server.cmd
        sampler = VLLMSampler(
            server.url,
            chat_tokenizer,
            retries=2,
            backoff_s=0.05,
            adapter_dir=str(tmp_path / "adapters"),
        )
        sampler.sync_adapter(chat_model, 1)
        calls = []
        real = sampler.generate

        def generate_then_die(*args, **kwargs):
            if calls:
                server.stop()  # the process group this test started
            calls.append(1)
            return real(*args, **kwargs)

        sampler.generate = generate_then_die
        looping = RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=512)

        def make_env():
            return gym.make("ToolMath-Arith-v0", max_turns=10)

        with Rollouts(make_env, sampler, chat_tokenizer, looping) as rollouts:
            # a random model rarely ends its turn: force a second round with a tool-call script
            first = real([[1, 2, 3]], SamplingParams(max_new_tokens=2))
            assert first[0][0].adapter_version == 1
            sampler.generate = force_two_rounds(generate_then_die, chat_tokenizer)
            with pytest.raises(RolloutError, match="unreachable"):
                rollouts.collect([0])
    assert server.process is None
