"""Faults of the rollout side, made by killing the real server processes by pid mid-collection:
a rollout server this job launched is restarted, its adapter reloaded and the collection replayed
whole (the same problems and seeds: the batch an unbroken collection makes); one given by URL that
does not come back stops the run with RolloutsDown after the last step's checkpoint.

The server is toolgrpo.agents.serve (vLLM's flags and API, launched by VLLMServer); test_vllm_server.py
kills a real vLLM server the same way."""

import os
import signal

import gymnasium as gym
import jax
import numpy as np
import pytest
from flax import nnx
from test_serve import _without_lora

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.agents.rollout import RolloutConfig, Rollouts
from toolgrpo.agents.training import GRPOLoop, Hook, ProblemOrder, RolloutsDown, fit
from toolgrpo.agents.vllm_client import VLLMSampler
from toolgrpo.agents.vllm_server import VLLMServer, python_serve_command
from toolgrpo.learners.params import save_pretrained
from toolgrpo.learners.train import GRPOConfig, init_state

CFG = GRPOConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant", micro_batch_size=4)
ROLL = RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=512, sync_rounds=True)


@pytest.fixture
def launched(chat_model, chat_tokenizer, tmp_path):
    """A VLLMServer running toolgrpo.agents.serve on the tiny model (its process group is this test's)."""
    directory = tmp_path / "model"
    save_pretrained(_without_lora(chat_model), str(directory))
    chat_tokenizer.save_pretrained(str(directory))
    server = VLLMServer(
        str(directory), max_lora_rank=8, command=python_serve_command(), startup_timeout_s=300
    )
    with server:
        yield server


def loop_over(sampler, model, tokenizer) -> GRPOLoop:
    rollouts = Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, tokenizer, ROLL)
    return GRPOLoop(
        model=model, state=init_state(model, CFG), cfg=CFG, rollouts=rollouts, problems_per_step=2
    )


def kill_after_first_reply(sampler, server):
    """SIGKILL the server's process (by the pid VLLMServer started) once the first request of
    the next collection has its reply: the others of that collection fail."""
    complete, killed = sampler._complete, []

    def then_kill(*args, **kwargs):
        reply = complete(*args, **kwargs)
        if not killed:
            killed.append(server.process.pid)
            os.kill(server.process.pid, signal.SIGKILL)
        return reply

    sampler._complete = then_kill
    return killed


@pytest.mark.slow
def test_a_launched_server_killed_mid_collection_is_restarted_and_the_collection_replayed(
    launched, chat_model, chat_tokenizer, tmp_path
):
    sampler = VLLMSampler(
        launched.url,
        chat_tokenizer,
        retries=1,
        backoff_s=0.05,
        adapter_dir=str(tmp_path / "a"),
        server=launched,
    )
    loop = loop_over(sampler, chat_model, chat_tokenizer)
    lora = nnx.state(chat_model, nnx.LoRAParam)
    unbroken = loop.collect_batch(ProblemOrder(None, position=10), seed=7, version=1, lora=lora)
    problems = ProblemOrder(None, position=10)
    killed = kill_after_first_reply(sampler, launched)
    replayed = loop.collect_batch(problems, seed=7, version=1, lora=lora)
    assert killed and launched.process.pid != killed[0]  # a new server process
    assert problems.position == 12  # the same two problems, drawn once
    # the whole batch, every episode from adapter 1 on the restarted server: what the unbroken
    # collection made, token for token (the base model would have sampled other tokens)
    assert len(replayed.batch.episodes) == 4 and set(replayed.batch.adapter_version) == {1}
    assert replayed.version == 1 and sampler.adapter_version == 1
    np.testing.assert_array_equal(replayed.batch.tokens, unbroken.batch.tokens)
    np.testing.assert_allclose(
        replayed.batch.sampler_logprobs, unbroken.batch.sampler_logprobs, atol=1e-5
    )
    assert f"{sampler.prefix}-v1" in sampler._served()
    loop.collector.close()


@pytest.mark.slow
def test_a_server_given_by_url_that_stays_down_stops_the_run_after_the_last_checkpoint(
    launched, chat_model, chat_tokenizer, tmp_path
):
    """Killed during step 2's collection and never restarted (the sampler was given its URL
    only): the sampler waits recover_s with backoff, then fit raises RolloutsDown after
    checkpointing step 1."""
    sampler = VLLMSampler(
        launched.url,
        chat_tokenizer,
        retries=1,
        backoff_s=0.05,
        adapter_dir=str(tmp_path / "a"),
        recover_s=2.0,
    )
    model = nnx.clone(chat_model)
    loop = loop_over(sampler, model, chat_tokenizer)
    saved, armed = [], []

    def checkpoint(step, done):
        saved.append((step, done.exiting, loop.adapter_version))
        if step == 1:  # step 2's collection starts after this (max_staleness 0)
            armed.append(kill_after_first_reply(sampler, launched))

    class Log:
        def log(self, step, metrics):
            pass

        def transcripts(self, step, texts, tag="train"):
            pass

    with pytest.raises(RolloutsDown, match="did not answer again within 2 s") as stop:
        fit(
            loop,
            ProblemOrder(None),
            Log(),
            start=0,
            steps=3,
            seed=0,
            hooks=[Hook(checkpoint, at_exit=True)],
        )
    assert armed[0] and stop.value.step == 1
    assert saved == [(1, False, 1), (1, True, 1)]  # the forced checkpoint of the last step
    assert loop.adapter_version == 1 and loop.data_position == 2  # step 2 never trained
    assert jax.tree.leaves(loop.local_lora)  # the adapter of step 1 is intact
    loop.collector.close()
