import json
import os
import re
import signal
import time

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest
from scripted import ScriptedSampler

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.agents.rollout import RolloutConfig, RolloutError, Rollouts
from toolgrpo.agents.sampler import JaxSampler
from toolgrpo.envs.problems import Problem
from toolgrpo.envs.sandbox import PythonSandbox
from toolgrpo.envs.toolmath import ToolMathEnv
from toolgrpo.learners.grpo import token_logprobs


def solve_with_tool(text: str, turn: int) -> str:
    """Turn 0: compute the product with python; turn 1: box the output."""
    if turn == 0:
        a, b = re.findall(r"Compute (\d+) × (\d+)", text)[-1]
        return f"I will compute it.\n```python\nprint({a} * {b})\n```\n"
    output = re.findall(r"```output\n(.*?)\n```", text)[-1]
    return f"So \\boxed{{{output}}}.<|im_end|>"


def product_env(**kw):
    problems = [
        Problem(f"p{i}", f"Compute {a} × {b}.", str(a * b), "integer")
        for i, (a, b) in enumerate([(12, 34), (56, 78), (91, 23)])
    ]
    return ToolMathEnv(problems=problems, **kw)


def spans(row, mask):
    """Maximal runs of equal mask value: [(value, start, end)]."""
    out, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or mask[t] != mask[start]:
            out.append((int(mask[start]), start, t))
            start = t
    return out


@pytest.mark.parametrize("protocol", ["markdown", "qwen"])
def test_scripted_tool_episodes_have_exact_tokens_and_masks(chat_tokenizer, protocol):
    tok = chat_tokenizer

    def script(text, turn):
        if protocol == "markdown":
            return solve_with_tool(text, turn)
        if turn == 0:
            a, b = re.findall(r"Compute (\d+) × (\d+)", text)[-1]
            call = {"name": "python", "arguments": {"code": f"print({a} * {b})"}}
            return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        output = re.findall(r"<tool_response>\n(.*?)\n", text)[-1]
        return f"\\boxed{{{output}}}<|im_end|>"

    sampler = ScriptedSampler(tok, script, adapter_version=3)
    with Rollouts(
        lambda: product_env(protocol=protocol), sampler, tok, RolloutConfig(group_size=2, pad_to=16)
    ) as rollouts:
        batch = rollouts.collect([0, 2], seed=1)
    assert batch.tokens.shape[0] == 4 and batch.tokens.shape[1] % 16 == 0
    assert list(batch.group_ids) == [0, 0, 1, 1] and set(batch.adapter_version) == {3}
    np.testing.assert_allclose(batch.rewards, 1.2)  # correct + boxed + tool ran
    for i, ep in enumerate(batch.episodes):
        assert ep.correct and ep.tool_calls == 1 and ep.turns == 2 and ep.truncated is None
        n = batch.lengths[i]
        row, mask = batch.tokens[i, :n], batch.loss_mask[i, :n]
        assert not batch.loss_mask[i, n:].any() and not batch.sampler_logprobs[i, n:].any()
        runs = spans(row, mask)
        assert [v for v, _, _ in runs] == [0, 1, 0, 1]  # prompt, call, tool output, answer
        prompt, call, output, answer = (
            tok.decode(row[s:e], skip_special_tokens=False) for _, s, e in runs
        )
        a, b = [(12, 34), (91, 23)][ep.group]
        assert prompt.endswith("<|im_start|>assistant\n") and f"Compute {a} × {b}." in prompt
        assert str(a * b) in output and str(a * b) not in call
        if protocol == "markdown":
            assert output == f"```output\n{a * b}\n```\n"
        else:
            assert output.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
            assert output.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
        assert answer.replace("So ", "").replace(".<", "<") == f"\\boxed{{{a * b}}}<|im_end|>"
        np.testing.assert_allclose(batch.sampler_logprobs[i, :n][mask == 1], -0.5)
        # the token sequence is the chat template's rendering of the episode's messages; the
        # transcript puts the verdict, the reward, its components and both answers first
        header, text = batch.transcripts[i].split("\n\n", 1)
        assert text == tok.decode(row, skip_special_tokens=False)
        assert f": correct; reward {ep.reward:g} (correctness 1" in header
        assert f"answer '{a * b}', gold '{a * b}'" in header


def test_rendered_conversation_matches_the_chat_template(chat_tokenizer):
    tok = chat_tokenizer
    env = product_env(protocol="qwen")
    _, first = env.reset(options={"index": 1})
    _, _, _, _, info = env.step(
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(56 * 78)"}}\n</tool_call>'
    )
    sampler = ScriptedSampler(
        tok,
        lambda text, turn: (
            '<tool_call>\n{"name": "python", "arguments": {"code": "print(56 * 78)"}}\n</tool_call>'
            if turn == 0
            else "\\boxed{4368}<|im_end|>"
        ),
    )
    with Rollouts(
        lambda: product_env(protocol="qwen"), sampler, tok, RolloutConfig(group_size=1)
    ) as rollouts:
        batch = rollouts.collect([1])
    # the rollout's text up to the second turn = the template applied to the env's messages
    expected = tok.apply_chat_template(
        info["messages"], tools=first["tools"], tokenize=False, add_generation_prompt=True
    )
    assert batch.transcripts[0].split("\n\n", 1)[1].startswith(expected)
    env.close()


def test_context_overflow_truncates_instead_of_crashing(chat_tokenizer):
    tok = chat_tokenizer
    looping = ScriptedSampler(tok, lambda text, turn: "```python\nprint('x' * 300)\n```\n")
    cfg = RolloutConfig(group_size=2, max_total_tokens=160, max_turn_tokens=40)
    with Rollouts(lambda: product_env(max_turns=50), looping, tok, cfg) as rollouts:
        batch = rollouts.collect([0])
    for i, ep in enumerate(batch.episodes):
        assert ep.truncated == "context" and ep.reward == 0.0 and not ep.correct
        assert batch.lengths[i] <= 160 and ep.total_tokens == batch.lengths[i]
    assert batch.metrics()["truncated_context"] == 1.0


def test_turn_limit_is_reported_apart_from_context(chat_tokenizer):
    tok = chat_tokenizer
    looping = ScriptedSampler(tok, lambda text, turn: "```python\nprint(1)\n```\n")
    with Rollouts(
        lambda: product_env(max_turns=2), looping, tok, RolloutConfig(group_size=1)
    ) as rollouts:
        batch = rollouts.collect([0])
    ep = batch.episodes[0]
    assert ep.truncated == "turns" and ep.turns == 2 and ep.tool_calls == 2
    assert batch.loss_mask[0].sum() == ep.sampled_tokens


def test_a_slow_tool_call_does_not_stall_the_other_episodes(chat_tokenizer):
    tok = chat_tokenizer
    problems = [
        Problem("slow", "Compute 1 × 1.", "1", "integer"),
        Problem("fast", "Compute 2 × 2.", "4", "integer"),
    ]
    finished = []

    def script(text, turn):
        slow = "Compute 1 × 1." in text
        if turn < (1 if slow else 3):
            return (
                "```python\nimport time; time.sleep(1.5); print(1)\n```\n"
                if slow
                else "```python\nprint(2 * 2)\n```\n"
            )
        finished.append("slow" if slow else "fast")
        return "\\boxed{1}<|im_end|>" if slow else "\\boxed{4}<|im_end|>"

    with Rollouts(
        lambda: ToolMathEnv(problems=problems, max_turns=5),
        ScriptedSampler(tok, script),
        tok,
        RolloutConfig(group_size=1),
    ) as rollouts:
        batch = rollouts.collect([0, 1])
    assert [e.correct for e in batch.episodes] == [True, True]
    assert batch.episodes[1].tool_calls == 3
    # three fast calls (a few ms each, ~0.1 s on a loaded machine) end during the slow one (1.5 s);
    # played in lockstep, the fast episode would end after the slow one
    assert finished == ["fast", "slow"]


def test_sync_rounds_make_batches_that_do_not_depend_on_tool_timing(chat_tokenizer):
    tok = chat_tokenizer
    problems = [
        Problem("slow", "Compute 1 × 1.", "1", "integer"),
        Problem("fast", "Compute 2 × 2.", "4", "integer"),
    ]

    def script(text, turn):
        slow = "Compute 1 × 1." in text
        if turn < (1 if slow else 3):
            return (
                "```python\nimport time; time.sleep(0.3); print(1)\n```\n"
                if slow
                else "```python\nprint(2 * 2)\n```\n"
            )
        return "\\boxed{1}<|im_end|>" if slow else "\\boxed{4}<|im_end|>"

    class Recording(ScriptedSampler):
        def generate(self, prompts, params, adapter_version=None, seeds=None, max_new_tokens=None):
            sizes.append(len(prompts))
            return super().generate(prompts, params, adapter_version, seeds, max_new_tokens)

    sizes = []
    with Rollouts(
        lambda: ToolMathEnv(problems=problems, max_turns=5),
        Recording(tok, script),
        tok,
        RolloutConfig(group_size=1, sync_rounds=True),
    ) as rollouts:
        batch = rollouts.collect([0, 1])
    assert [e.correct for e in batch.episodes] == [True, True]
    assert sizes == [2, 2, 1, 1]  # without sync_rounds: [2, 1, 1, 1, 1], the fast calls first


def test_jax_sampler_rollout_logprobs_match_the_learner(chat_tokenizer, chat_model):
    sampler = JaxSampler(
        chat_model, chat_tokenizer, bucket=32, eos_token_ids=[chat_tokenizer.eos_token_id]
    )
    cfg = RolloutConfig(group_size=3, max_turn_tokens=24, max_total_tokens=512)
    with Rollouts(lambda: gym.make("ToolMath-Arith-v0"), sampler, chat_tokenizer, cfg) as r:
        batch = r.collect([4, 9], seed=2, adapter_version=5)
    assert set(batch.adapter_version) == {5} and batch.tokens.shape[0] == 6
    tokens = jnp.asarray(batch.tokens)
    learner = np.asarray(token_logprobs(chat_model(tokens), tokens))
    mask = batch.loss_mask == 1
    assert mask.sum() == sum(e.sampled_tokens for e in batch.episodes) > 0
    np.testing.assert_allclose(batch.sampler_logprobs[mask], learner[mask], atol=1e-4)
    assert not batch.sampler_logprobs[~mask].any()
    for i, ep in enumerate(batch.episodes):  # the prompt is the masked-out head of each row
        first = int(np.argmax(mask[i]))
        assert (
            chat_tokenizer.decode(batch.tokens[i, :first]).endswith("<|im_start|>assistant\n")
            and ep.turns >= 1
        )


def test_a_failing_environment_gives_an_error_and_no_batch(chat_tokenizer):
    class Broken(ToolMathEnv):
        def step(self, action):
            raise OSError("disk on fire")

    sampler = ScriptedSampler(chat_tokenizer, solve_with_tool)
    with Rollouts(
        lambda: Broken(problems=product_env().problems),
        sampler,
        chat_tokenizer,
        RolloutConfig(group_size=2),
    ) as rollouts:
        with pytest.raises(RolloutError, match="no batch was made: disk on fire"):
            rollouts.collect([0])
        with pytest.raises(ValueError, match="at least one problem"):
            rollouts.collect([])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, read from /proc (the processes it started, and theirs)."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in (
            os.listdir(f"/proc/{tree[i]}/task") if os.path.exists(f"/proc/{tree[i]}") else []
        ):
            try:
                with open(f"/proc/{tree[i]}/task/{task}/children") as f:
                    tree += [int(c) for c in f.read().split()]
            except OSError:
                pass
        i += 1
    return tree


def gone(pid: int) -> bool:
    """The process has exited (it may be a zombie that its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` (a process this test's sandbox started) and wait until every process of
    its tree has exited, its sessions included (they die with the server)."""
    tree = process_tree(pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # a hang guard: they are gone within a second
    while not all(gone(p) for p in tree):
        assert time.monotonic() < deadline, f"processes {tree} outlived the sandbox server"
        time.sleep(0.02)


def test_a_sandbox_server_dying_mid_episode_crashes_its_callers_and_the_run_goes_on(
    chat_tokenizer,
):
    """The sandbox server is killed by pid between two rounds: the episodes whose next turn is a
    tool call end as "crashed" (a tool-error output, no loss), the others finish; the next
    collection runs on a restarted server."""
    sandbox = PythonSandbox(pool_size=1)
    killed = []

    def script(text: str, turn: int) -> str:
        if turn == 1 and "56 ×" in text:  # problem p1 calls the tool again: its server is gone
            return "Once more.\n```python\nprint(2)\n```\n"
        return solve_with_tool(text, turn)

    sampler = ScriptedSampler(chat_tokenizer, script)
    generate = sampler.generate

    def kill_before_round_two(prompts, *args, **kwargs):
        if sampler.calls == 1 and not killed:
            assert sandbox.pid is not None  # the first round started the server
            killed.append(sandbox.pid)
            kill_tree(sandbox.pid)
        return generate(prompts, *args, **kwargs)

    sampler.generate = kill_before_round_two
    cfg = RolloutConfig(group_size=2, sync_rounds=True, check_template=True)
    try:
        with Rollouts(
            lambda: product_env(sandbox=sandbox), sampler, chat_tokenizer, cfg
        ) as rollouts:
            batch = rollouts.collect([0, 1])
            assert killed
            ends = [(e.problem_id, e.truncated, e.correct) for e in batch.episodes]
            assert ends == [("p0", None, True)] * 2 + [("p1", "crashed", False)] * 2
            crashed = [e for e in batch.episodes if e.truncated == "crashed"]
            assert all(e.tool_errors == 1 and e.tool_calls == 2 for e in crashed)
            assert "the Python sandbox crashed" in batch.transcripts[2]
            assert not batch.loss_mask[2:].any() and batch.loss_mask[:2].any()
            assert batch.metrics()["crashed"] == 0.5
            again = rollouts.collect([0, 2])  # the run goes on, on a new server
            assert all(e.correct for e in again.episodes)
            assert sandbox.pid != killed[0]
    finally:
        sandbox.close()


def test_void_turns_are_counted_and_masked_as_configured(chat_tokenizer):
    """p0 solves with the tool (no void turn); p1 answers without \\boxed{} (void); p2 writes an
    empty python block (a parse failure: void) and then answers right. With mask_void_turns the
    rows of p1 and p2 carry no loss, and their rewards are kept."""
    tok = chat_tokenizer

    def script(text, turn):
        if "Compute 56 × 78" in text:
            return "I think it is big.<|im_end|>"
        if "Compute 91 × 23" in text:
            return "```python\n\n```\n" if turn == 0 else "So \\boxed{2093}.<|im_end|>"
        return solve_with_tool(text, turn)

    batches = {}
    for mask_void in (False, True):
        cfg = RolloutConfig(group_size=2, mask_void_turns=mask_void)
        with Rollouts(product_env, ScriptedSampler(tok, script), tok, cfg) as rollouts:
            batches[mask_void] = rollouts.collect([0, 1, 2])
    for batch in batches.values():
        assert [e.void_turns for e in batch.episodes] == [0, 0, 1, 1, 1, 1]
        assert [e.correct for e in batch.episodes] == [True, True, False, False, True, True]
        assert batch.metrics()["void_episodes"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(batches[True].rewards, batches[False].rewards)
    assert batches[False].loss_mask.sum(1).min() > 0
    assert batches[True].loss_mask[:2].sum() == batches[False].loss_mask[:2].sum() > 0
    assert not batches[True].loss_mask[2:].any() and not batches[True].sampler_logprobs[2:].any()
    # a turn cut by its token budget is one void turn (cut, and an answer without \boxed{})
    cfg = RolloutConfig(group_size=1, max_turn_tokens=3)
    with Rollouts(product_env, ScriptedSampler(tok, script), tok, cfg) as rollouts:
        cut = rollouts.collect([0])
    assert cut.episodes[0].void_turns == 1 and cut.episodes[0].truncated is None


def test_truncated_episodes_masked_and_the_overlong_penalty(chat_tokenizer):
    """A context budget 5 tokens past the prompt truncates every episode ("context"):
    mask_truncated "context" drops their loss. With a budget that fits, overlong_buffer puts the
    linear penalty ((max - buffer) - L) / buffer * factor on the reward of each episode of L
    tokens past max - buffer (DAPO), and names it in the reward components."""
    from toolgrpo.agents.chat import prompt_tokens

    tok = chat_tokenizer
    prompt = len(prompt_tokens(product_env(), tok, 0)[0])
    for kind, expect_loss in (("none", True), ("context", False), ("all", False)):
        cfg = RolloutConfig(group_size=2, max_total_tokens=prompt + 5, mask_truncated=kind)
        sampler = ScriptedSampler(tok, solve_with_tool)
        with Rollouts(product_env, sampler, tok, cfg) as rollouts:
            batch = rollouts.collect([0])
        assert [e.truncated for e in batch.episodes] == ["context"] * 2
        assert bool(batch.loss_mask.any()) == expect_loss, kind
    with Rollouts(
        product_env, ScriptedSampler(tok, solve_with_tool), tok, RolloutConfig(group_size=2)
    ) as rollouts:
        plain = rollouts.collect([0])
    length = int(plain.lengths[0])
    max_total, buffer, factor = length + 10, 40, 0.5  # the episode ends 10 tokens short
    cfg = RolloutConfig(
        group_size=2, max_total_tokens=max_total, overlong_buffer=buffer, overlong_penalty=factor
    )
    with Rollouts(product_env, ScriptedSampler(tok, solve_with_tool), tok, cfg) as rollouts:
        penalised = rollouts.collect([0])
    expect = ((max_total - buffer) - length) / buffer * factor  # -(30 / 40) * 0.5
    assert expect == pytest.approx(-0.375)
    np.testing.assert_allclose(penalised.rewards, plain.rewards + expect, rtol=1e-6)
    assert penalised.episodes[0].reward_components["overlong"] == pytest.approx(expect)
    assert "overlong" not in plain.episodes[0].reward_components
    with pytest.raises(ValueError, match="overlong_buffer"):
        RolloutConfig(max_total_tokens=100, overlong_buffer=101)
