"""Metrics per source and per tool: a mixed-source collection on ToolUse-v0 (the real sandbox
and a real bm25s index) by a scripted policy whose tool choices are known, every figure checked
by hand."""

import json
import re

from scripted import ScriptedSampler

from toolgrpo.agents.rollout import RolloutConfig, Rollouts
from toolgrpo.agents.training.evaluation import evaluate
from toolgrpo.envs.mixture import ProblemMixture, ProblemSource
from toolgrpo.envs.problems import Problem
from toolgrpo.envs.tooluse import ToolUseEnv


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def policy(text: str, turn: int) -> str:
    """Math: python, then the output boxed. QA: python first (the wrong tool, which fails), then
    search, then the code boxed."""
    if "Compute" in text:
        if turn == 0:
            a, b = re.findall(r"Compute (\d+) × (\d+)", text)[-1]
            return call("python", code=f"print({a} * {b})") + "<|im_end|>"
        out = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text)[-1]
        return f"\\boxed{{{out}}}<|im_end|>"
    if turn == 0:
        return call("python", code="lookup('Zorblax')") + "<|im_end|>"
    if turn == 1:
        return call("search", query="Zorblax registry code") + "<|im_end|>"
    return "\\boxed{Q04211}<|im_end|>"


def test_metrics_per_source_and_per_tool(chat_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLGRPO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"id": "e0", "title": "Zorblax", "text": "The registry code of Zorblax is Q04211."}\n'
        '{"id": "e1", "title": "Mirutea", "text": "The registry code of Mirutea is Q77310."}\n'
    )
    mixture = ProblemMixture(
        [
            ProblemSource(
                "math",
                [Problem("m", "Compute 12 × 34.", "408", "integer")],
                expected_tools=("python",),
            ),
            ProblemSource(
                "qa",
                [Problem("z", "What is the registry code of Zorblax?", "Q04211", "text")],
                expected_tools=("search",),
            ),
        ],
        size=50,
    )
    math_ids = [i for i in range(50) if mixture.source_of(i).name == "math"][:2]
    qa_ids = [i for i in range(50) if mixture.source_of(i).name == "qa"][:1]
    make = lambda: ToolUseEnv(
        tools=["python", "search"], problems=mixture, corpus=str(corpus), max_turns=4
    )
    sampler = ScriptedSampler(chat_tokenizer, policy)
    cfg = RolloutConfig(group_size=2, max_turn_tokens=200, max_total_tokens=1024)
    with Rollouts(make, sampler, chat_tokenizer, cfg) as rollouts:
        metrics = rollouts.collect(math_ids + qa_ids).metrics()
        held_out, _ = evaluate(rollouts, math_ids + qa_ids)
    # 6 episodes: 4 math (one python call each, ok), 2 QA (python fails, then search)
    assert metrics["accuracy"] == 1.0 and metrics["tool_calls"] == (4 + 2 * 2) / 6
    assert metrics["selection_accuracy"] == 4 / 6  # the QA episodes called python first
    assert metrics["tool/python/calls"] == 6 / 6 and metrics["tool/python/error_rate"] == 2 / 6
    assert metrics["tool/search/calls"] == 2 / 6 and metrics["tool/search/error_rate"] == 0
    assert metrics["source/math/selection_accuracy"] == 1.0
    assert metrics["source/qa/selection_accuracy"] == 0.0
    assert metrics["source/qa/tool_error_rate"] == 0.5 and metrics["source/qa/tool_calls"] == 2
    assert metrics["source/math/accuracy"] == metrics["source/qa/accuracy"] == 1.0
    assert metrics["reward/retrieval_hit"] == 2 / 6 and metrics["reward/selection"] == 4 / 6
    for key in ("selection_accuracy", "source/qa/selection_accuracy", "tool/search/calls"):
        assert held_out[key] == metrics[key], key  # evaluate.py reports them too
