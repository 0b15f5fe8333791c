"""VLLMPool: rollouts over two servers of the completions API (toolgrpo.agents.serve, the JAX server
that the VLLMSampler's tests run against; the real vLLM takes the same requests): the prompts of
a call are spread over both, every new adapter is on both before a sample carries its version,
and a server that refuses an adapter stops the sync with the pool still on the old version."""

import json
import urllib.request

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest
from scripted import count_prompts
from test_serve import _without_lora

import toolgrpo.envs  # noqa: F401
from toolgrpo.agents.rollout import RolloutConfig, Rollouts
from toolgrpo.agents.serve import CompletionService, serve
from toolgrpo.agents.vllm_client import ServerError, VLLMSampler
from toolgrpo.agents.vllm_pool import VLLMPool
from toolgrpo.learners.grpo import token_logprobs


@pytest.fixture(scope="module")
def two_servers(chat_model, chat_tokenizer):
    base = _without_lora(chat_model)
    services = [
        CompletionService(base, chat_tokenizer, "tiny-qwen", max_lora_rank=8) for _ in range(2)
    ]
    servers = [serve(s, port=0) for s in services]
    yield [f"http://127.0.0.1:{s.server_port}" for s in servers], services
    for s in servers:
        s.shutdown()


def adapters_on(url: str) -> list[str]:
    models = json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]
    return [m["id"] for m in models if m.get("parent")]


def test_rollouts_spread_over_two_servers_each_holding_the_adapter(
    two_servers, chat_model, chat_tokenizer, tmp_path
):
    urls, _ = two_servers
    clients = [VLLMSampler(url, chat_tokenizer) for url in urls]
    pool = VLLMPool(clients, adapter_dir=str(tmp_path))
    asked = count_prompts(clients)
    pool.sync_adapter(chat_model, 1)
    assert [adapters_on(url) for url in urls] == [[f"{c.prefix}-v1"] for c in clients]
    assert pool.adapter_version == 1 and all(c.adapter_version == 1 for c in clients)
    cfg = RolloutConfig(group_size=2, max_turn_tokens=12, max_total_tokens=512)
    with Rollouts(
        lambda: gym.make("ToolMath-Arith-v0", max_turns=1), pool, chat_tokenizer, cfg
    ) as r:
        batch = r.collect([1, 2, 3], seed=3, adapter_version=1)
    assert set(batch.adapter_version) == {1}
    assert asked == {urls[0]: 3, urls[1]: 3}  # six episodes, three a server
    # what came back, in prompt order, is the adapted policy's own sample: its log-probabilities
    tokens = jnp.asarray(batch.tokens)
    learner = np.asarray(token_logprobs(chat_model(tokens), tokens))
    mask = batch.loss_mask == 1
    assert mask.sum() > 0
    np.testing.assert_allclose(batch.sampler_logprobs[mask], learner[mask], atol=1e-4)
    for i, episode in enumerate(batch.episodes):  # each row is its own group's problem
        assert episode.group == i // 2


def test_an_adapter_one_server_refuses_leaves_the_pool_on_the_old_version(
    two_servers, chat_model, chat_tokenizer, tmp_path
):
    urls, services = two_servers
    pool = VLLMPool([VLLMSampler(url, chat_tokenizer) for url in urls], adapter_dir=str(tmp_path))
    pool.sync_adapter(chat_model, 1)
    services[1].max_lora_rank = 2  # below the model's rank 4: this server refuses the next one
    try:
        with pytest.raises(ServerError, match="max_lora_rank|max-lora-rank"):
            pool.sync_adapter(chat_model, 2)
    finally:
        services[1].max_lora_rank = 8
    assert pool.adapter_version == 1  # no sample is tagged 2
    pool.sync_adapter(chat_model, 3)
    assert pool.adapter_version == 3 and all(c.adapter_version == 3 for c in pool.clients)
