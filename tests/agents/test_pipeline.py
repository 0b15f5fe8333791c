"""Pipelined rollouts (toolgrpo.agents.training.pipeline): max_staleness 0 is the synchronous loop bit for
bit; max_staleness 1 trains each batch one adapter version after the one that sampled it (the
sampler reading its own copy of the adapter); Ctrl-C and resume lose and repeat no problem."""

import dataclasses
import os
import signal

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_loop import StubRollouts

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.agents.rollout import RolloutConfig, Rollouts
from toolgrpo.agents.sampler import JaxSampler
from toolgrpo.agents.training import GRPOLoop, Hook, Interrupted, ProblemOrder, evaluate, fit
from toolgrpo.agents.training.loop import PIPELINED_TIS_CAP, sampler_copy
from toolgrpo.learners.grpo import token_logprobs
from toolgrpo.learners.train import GRPOConfig, grpo_step, init_state

STEPS, PROBLEMS, SEED = 3, 2, 5
CFG = GRPOConfig(learning_rate=5e-2, warmup_steps=1, schedule="constant", micro_batch_size=2)
ROLL = RolloutConfig(group_size=2, max_turn_tokens=8, max_total_tokens=512, sync_rounds=True)


class Record:
    """A RunLog that keeps what it is given."""

    def __init__(self):
        self.metrics: dict[int, dict] = {}

    def log(self, step, metrics):
        self.metrics.setdefault(step, {}).update(metrics)

    def transcripts(self, step, texts, tag="train"):
        pass


class LengthReward(gym.Wrapper):
    """The untrained model never answers right, so its rewards would all be 0 and its updates
    nothing: reward the length of the turn's text instead, which varies within a group."""

    def step(self, action):
        observation, _, terminated, truncated, info = self.env.step(action)
        return observation, len(action) / 8, terminated, truncated, info


def arith_rollouts(sampler, tokenizer, group_size=2):
    make = lambda: LengthReward(gym.make("ToolMath-Arith-v0", max_turns=1))
    return Rollouts(make, sampler, tokenizer, dataclasses.replace(ROLL, group_size=group_size))


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.lora, state.opt_state))]


@pytest.mark.slow
def test_max_staleness_0_reproduces_the_synchronous_loop_bit_for_bit(chat_model, chat_tokenizer):
    """fit's pipeline with max_staleness 0 (its thread, evaluations pausing it) against the loop
    written out: collect with the current adapter, update, sync, evaluate. The same computation
    in the same order on the CPU: equal bits, not merely close ones."""
    eos = [chat_tokenizer.eos_token_id]

    # the synchronous loop, written out
    model = nnx.clone(chat_model)
    sampler = JaxSampler(model, chat_tokenizer, eos_token_ids=eos, bucket=32)
    state, order, ref_metrics, ref_tokens, ref_eval = (
        init_state(model, CFG),
        ProblemOrder(50, seed=1),
        [],
        [],
        [],
    )
    with (
        arith_rollouts(sampler, chat_tokenizer) as train,
        arith_rollouts(sampler, chat_tokenizer, group_size=2) as held_out,
    ):
        for step in range(1, STEPS + 1):
            batch = train.collect(
                [next(order) for _ in range(PROBLEMS)],
                seed=SEED * 1_000_003 + step,
                adapter_version=step - 1,
            )
            state, metrics = grpo_step(state, batch, CFG)
            nnx.update(model, state.lora)
            sampler.sync_adapter(model, step)
            ref_metrics.append(metrics)
            ref_tokens.append(batch.tokens)
            if step < STEPS:
                ref_eval.append(evaluate(held_out, range(2), seed=step)[0])

    # fit, through the pipeline
    model = nnx.clone(chat_model)
    sampler = JaxSampler(model, chat_tokenizer, eos_token_ids=eos, bucket=32)
    log, tokens, evals = Record(), [], []
    with (
        arith_rollouts(sampler, chat_tokenizer) as train,
        arith_rollouts(sampler, chat_tokenizer, group_size=2) as held_out,
    ):
        loop = GRPOLoop(
            model=model,
            state=init_state(model, CFG),
            cfg=CFG,
            rollouts=train,
            problems_per_step=PROBLEMS,
            max_staleness=0,
        )
        loop_update = loop.update
        loop.update = lambda batch: tokens.append(batch.tokens) or loop_update(batch)
        fit(
            loop,
            ProblemOrder(50, seed=1),
            log,
            start=0,
            steps=STEPS,
            seed=SEED,
            hooks=[
                Hook(
                    lambda step, done: evals.append(evaluate(held_out, range(2), seed=step)[0]),
                    samples=True,
                )
            ],
        )
    assert loop.cfg == CFG  # no importance weights added to a synchronous loop
    for a, b in zip(ref_tokens, tokens, strict=True):
        np.testing.assert_array_equal(a, b)
    for step, ref in enumerate(ref_metrics, 1):
        got = log.metrics[step]
        assert {k: got[f"train/{k}"] for k in ref} == ref, step  # float equality: same bits
        assert got["train/staleness"] == 0
    assert evals == ref_eval and len(evals) == STEPS - 1
    for a, b in zip(leaves(state), leaves(loop.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loop.data_position == STEPS * PROBLEMS and sampler.adapter_version == STEPS
    assert all(m["grad_norm"] > 0 for m in ref_metrics)  # every step learned something


@pytest.mark.slow
def test_max_staleness_1_trains_each_batch_one_version_after_its_sampler(
    chat_model, chat_tokenizer
):
    """Batch 1 and 2 come from adapter 0, batch s from adapter s - 2 after that: its
    sampler_logprobs are that adapter's log-probabilities (its copy of the parameters, one
    version behind the learner's), not the learner's at the time of the update."""
    model = nnx.clone(chat_model)
    behind = sampler_copy(model)
    sampler = JaxSampler(
        behind, chat_tokenizer, eos_token_ids=[chat_tokenizer.eos_token_id], bucket=32
    )
    log, batches = Record(), {}
    with arith_rollouts(sampler, chat_tokenizer) as train:
        with pytest.raises(ValueError, match="needs a sampler_model"):
            GRPOLoop(
                model=model,
                state=init_state(model, CFG),
                cfg=CFG,
                rollouts=train,
                problems_per_step=PROBLEMS,
                max_staleness=1,
            )
        loop = GRPOLoop(
            model=model,
            state=init_state(model, CFG),
            cfg=CFG,
            rollouts=train,
            problems_per_step=PROBLEMS,
            max_staleness=1,
            sampler_model=behind,
        )
        assert loop.cfg.tis_cap == PIPELINED_TIS_CAP  # importance weights on by default
        # the LoRA parameters of each version: the arrays (init_state's holds the variables)
        params = {0: jax.tree.map(lambda x: x, loop.state.lora)}

        def checkpoint(step, done):
            batches[step] = log_batch[-1]
            params[step] = loop.state.lora

        log_batch = []
        loop_update = loop.update
        loop.update = lambda batch: log_batch.append(batch) or loop_update(batch)
        fit(loop, ProblemOrder(50), log, start=0, steps=4, seed=SEED, hooks=[Hook(checkpoint)])
    assert [log.metrics[s]["train/staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert [set(batches[s].adapter_version) for s in (1, 2, 3, 4)] == [{0}, {0}, {1}, {2}]
    assert "train/tis_weight_mean" in log.metrics[2]
    for step in (2, 3, 4):
        b = batches[step]
        mask = b.loss_mask == 1
        tokens = jnp.asarray(b.tokens)

        def logprobs(version, tokens=tokens, mask=mask):
            scored = nnx.clone(model)
            nnx.update(scored, params[version])
            return np.asarray(token_logprobs(scored(tokens), tokens))[mask]

        sampled_by, trained_by = step - 2, step - 1
        np.testing.assert_allclose(b.sampler_logprobs[mask], logprobs(sampled_by), atol=1e-4)
        if step == 2:  # update 1 ran at the warm-up's learning rate of 0: v1 is v0
            continue
        # update 2 and 3 moved the log-probabilities well beyond that tolerance
        assert np.abs(logprobs(trained_by) - logprobs(sampled_by)).max() > 1e-2
    # after fit the sampler's copy holds the learner's final adapter, as a synchronous loop's
    assert sampler.adapter_version == 4
    for a, b in zip(
        jax.tree.leaves(nnx.state(behind, nnx.LoRAParam)),
        jax.tree.leaves(nnx.state(model, nnx.LoRAParam)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class VersionedStub(StubRollouts):
    """StubRollouts with a sampler that records the versions it is given."""

    def __init__(self, varied):
        super().__init__(varied)
        outer = self

        class Sampler:
            adapter_version = 0

            def sync_adapter(self, model, version):
                outer.synced.append(version)
                self.adapter_version = version

        self.sampler, self.synced = Sampler(), []


@pytest.mark.slow
def test_ctrl_c_and_resume_of_a_pipelined_run_lose_and_repeat_no_problem():
    """A Ctrl-C during step 2 ends the run after step 3, whose batch 4 was collected ahead; the
    checkpoint of step 3 records the position after batch 3, so the resumed run's steps 4 and 5
    train on the problems the uninterrupted run's did."""
    from tiny import tiny_model

    cfg = GRPOConfig(learning_rate=1e-3, schedule="constant", micro_batch_size=2)

    def run(start, steps, position, interrupt_at=None):
        rollouts = VersionedStub(varied=set(range(0, 100, 3)))
        model = tiny_model(lora_seed=1)
        loop = GRPOLoop(
            model=model,
            state=init_state(model, cfg),
            cfg=cfg,
            rollouts=rollouts,  # ty: ignore[invalid-argument-type] - a stub of Rollouts
            problems_per_step=4,
            max_staleness=1,
            sampler_model=sampler_copy(model),
        )
        loop.state = jax.tree.map(lambda x: x, loop.state)
        loop.state.updates = jnp.asarray(start, jnp.int32)  # as restored from a checkpoint
        trained, saved = [], {}
        loop_update = loop.update
        loop.update = lambda batch: (
            trained.append([int(e.problem_id) for e in batch.episodes[::2]]) or loop_update(batch)
        )

        def checkpoint(step, done):
            saved[step] = loop.data_position
            if step == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)

        try:
            fit(
                loop,
                ProblemOrder(40, seed=3, position=position),
                Record(),
                start=start,
                steps=steps,
                seed=0,
                hooks=[Hook(checkpoint, at_exit=True)],
            )
        except Interrupted as stop:
            return trained, saved, stop.step, rollouts.asked
        return trained, saved, None, rollouts.asked

    whole, _, _, _ = run(0, 5, 0)
    first, saved, stopped, asked = run(0, 5, 0, interrupt_at=2)
    # the signal came during step 2's checkpoint: the wait for batch 3 is cut short at once
    assert stopped == 2 and len(first) == 2
    # batch 3 (collected during step 2) and perhaps 4 (after its publish) were made ahead and
    # dropped with the run
    assert len(asked) in (3, 4)
    resumed, _, _, _ = run(2, 5, saved[2])
    assert first + resumed == whole
    flat = [p for problems in whole for p in problems]
    assert len(flat) == 20 and len(set(flat)) == 20  # 5 steps x 4 problems of 40, each once
