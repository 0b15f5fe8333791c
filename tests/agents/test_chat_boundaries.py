"""Token in, token out with Qwen2.5's real vocabulary and chat format (tests/qwen_vocab.py):
at every boundary the chat template draws (tool-call fences, an end of turn right after a call,
newlines before <|im_end|>, tool responses), an episode's tokens decode to exactly the template's
rendering of the environment's conversation (RolloutConfig.check_template)."""

import re

import pytest
from qwen_vocab import qwen25_tokenizer
from scripted import ScriptedSampler

from toolgrpo.agents.rollout import RolloutConfig, RolloutError, Rollouts
from toolgrpo.envs.problems import Problem
from toolgrpo.envs.toolmath import ToolMathEnv

FENCE = "```"


@pytest.fixture(scope="module")
def qwen():
    return qwen25_tokenizer()


def product_env(**kw):
    problems = [Problem("p0", "Compute 12 × 34.", "408", "integer")]
    return ToolMathEnv(problems=problems, **kw)


def markdown_call(end: str) -> str:
    return f"I will compute it.\n{FENCE}python\nprint(12 * 34)\n{FENCE}{end}"


def qwen_call(end: str) -> str:
    return (
        'Let me call the tool.\n<tool_call>\n{"name": "python", "arguments": {"code": '
        f'"print(12 * 34)"}}}}\n</tool_call>{end}'
    )


CASES = {  # protocol, first turn, answer turn
    "fence then newline (the stop sequence)": (
        "markdown",
        markdown_call("\n"),
        "So \\boxed{408}.<|im_end|>",
    ),
    "fence then end of turn": (
        "markdown",
        markdown_call("<|im_end|>"),
        "So \\boxed{408}.<|im_end|>",
    ),
    "newline before the end of turn": (
        "markdown",
        markdown_call("\n"),
        "The answer is\n\\boxed{408}\n<|im_end|>",
    ),
    "answer cut by the turn budget": (
        "markdown",
        markdown_call("\n"),
        (
            "So \\boxed{408}, and that is all there is to say about this "
            "problem, which was a product of two numbers"
        ),
    ),
    "tool call, then the tool response": ("qwen", qwen_call(""), "\\boxed{408}<|im_end|>"),
    "tool call then end of turn": ("qwen", qwen_call("<|im_end|>"), "\\boxed{408}<|im_end|>"),
}


@pytest.mark.parametrize("case", CASES)
def test_tokens_are_the_templates_rendering_at_every_boundary(qwen, case):
    protocol, first, answer = CASES[case]
    sampler = ScriptedSampler(qwen, lambda text, turn: first if turn == 0 else answer)
    cfg = RolloutConfig(
        group_size=2,
        max_turn_tokens=24 if "budget" in case else 64,
        max_total_tokens=2048,
        check_template=True,
    )
    with Rollouts(lambda: product_env(protocol=protocol), sampler, qwen, cfg) as rollouts:
        batch = rollouts.collect([0])
    ep = batch.episodes[0]
    assert ep.tool_calls == 1 and ep.tool_errors == 0, ep
    assert ep.correct
    if "budget" in case:  # the last turn never sampled its end of turn
        assert batch.tokens[0, batch.lengths[0] - 1] != qwen.eos_token_id
    text = qwen.decode(batch.tokens[0, : batch.lengths[0]], skip_special_tokens=False)
    assert "408" in re.findall(r"(?:output\n|<tool_response>\n)(\d+)", text)
    assert 151644 in batch.tokens[0]  # <|im_start|>, the real id


def test_the_check_catches_tokens_that_are_not_the_conversation(qwen, monkeypatch):
    """Re-tokenizing the model's text (what the rollout never does) merges across the boundary
    the model's own tokens kept: the check says where."""
    sampler = ScriptedSampler(
        qwen, lambda text, turn: markdown_call("\n") if turn == 0 else "So \\boxed{408}.<|im_end|>"
    )
    cfg = RolloutConfig(group_size=1, check_template=True)
    with Rollouts(lambda: product_env(protocol="markdown"), sampler, qwen, cfg) as rollouts:
        real = rollouts._observation_tokens
        monkeypatch.setattr(
            rollouts,
            "_observation_tokens",
            lambda ep, obs, ended: real(ep, obs.replace("\n", " ", 1), ended),
        )
        with pytest.raises(RolloutError, match="not the chat template's rendering"):
            rollouts.collect([0])


def test_a_turn_with_several_calls_is_the_templates_rendering(qwen, tmp_path, monkeypatch):
    """ToolUse-v0: one turn calls search and python (ended by the model's end of turn, no stop
    string), both answered in one user turn of two <tool_response>s, then the answer."""
    from toolgrpo.envs.tooluse import ToolUseEnv

    monkeypatch.setenv("TOOLGRPO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"id": "e0", "title": "Zorblax", "text": "The registry code of Zorblax is 42."}\n'
        '{"id": "e1", "title": "Mirutea", "text": "The registry code of Mirutea is 77."}\n'
    )
    problems = [Problem("z", "Twice the registry code of Zorblax?", "84", "integer")]
    calls = (
        "Both tools.\n<tool_call>\n"
        '{"name": "search", "arguments": {"query": "Zorblax registry code"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(2 * 42)"}}\n</tool_call>'
        "<|im_end|>"
    )
    sampler = ScriptedSampler(
        qwen, lambda text, turn: calls if turn == 0 else "\\boxed{84}<|im_end|>"
    )
    cfg = RolloutConfig(
        group_size=2, max_turn_tokens=96, max_total_tokens=2048, check_template=True
    )
    make = lambda: ToolUseEnv(tools=["python", "search"], problems=problems, corpus=str(corpus))
    with Rollouts(make, sampler, qwen, cfg) as rollouts:
        batch = rollouts.collect([0])
    ep = batch.episodes[0]
    assert ep.correct and ep.tool_calls == 2 and ep.tool_errors == 0 and ep.turns == 2, ep
    text = qwen.decode(batch.tokens[0, : batch.lengths[0]], skip_special_tokens=False)
    responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.DOTALL)
    assert len(responses) == 2 and "Zorblax" in responses[0] and responses[1] == "84"
    assert text.count("<|im_start|>user") == 2  # the problem, then both responses in one turn
