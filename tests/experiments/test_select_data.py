"""The tool-selection demo's data: its demonstrations replayed through the real ToolUse-v0
(the sandbox, a bm25s index over the generated corpus) score as they claim, their environment
text is what the rollout inserts, and their first tool carries no information about the kind."""

import random

import gymnasium as gym
import numpy as np
import pytest
from select_data import (
    FIRST_TOOL,
    KINDS,
    World,
    call_text,
    demonstration,
    random_tool_demonstrations,
)

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.agents.chat import tool_message_text, tool_turn_text
from toolgrpo.envs.mixture import ProblemMixture
from toolgrpo.envs.tools import BM25Index, parse_tool_calls
from toolgrpo.envs.tools.calls import ToolCallRequest
from toolgrpo.envs.tools.search import format_passages
from toolgrpo.learners.tokenizer import train_chat_tokenizer


@pytest.fixture(scope="module")
def world_env(tmp_path_factory):
    corpus = str(tmp_path_factory.mktemp("select") / "corpus.jsonl")
    world = World.generate(400, seed=0)
    world.write_corpus(corpus)
    mixture = ProblemMixture(world.sources("train", seed=1), seed=0)
    env = gym.make(
        "ToolUse-v0",
        tools=["python", "search"],
        problems=mixture,
        corpus=corpus,
        search_k=2,
        max_turns=3,
    )
    index = BM25Index.from_corpus(corpus)
    yield world, mixture, env, lambda q: format_passages(index.search([q], 2)[0])
    env.close()


def test_the_world_names_each_entity_once_and_holds_out_half_of_them():
    world = World.generate(1000, seed=3)
    assert len(set(world.names)) == 1000 and all(100 <= c < 1000 for c in world.codes)
    train, heldout = world.entities("train"), world.entities("heldout")
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 1000
    sums = world.problems("sum", "heldout", seed=0)
    for i in range(50):
        e, f = sums[i].meta["entities"]
        assert e in heldout and f in heldout and e != f
        assert sums[i].answer == str(world.codes[e] + world.codes[f])
    with pytest.raises(ValueError, match="unknown kind"):
        world.problems("divide", "train", seed=0)


def test_demonstrations_replayed_through_the_environment_score_as_they_claim(world_env):
    """Every demonstration's turns, stepped through ToolUse-v0: the right first tool solves the
    problem (correct, selection 1), the other does not (selection 0); and the environment's
    text in a demonstration is the rollout's (the tool outputs in the template's boundary)."""
    world, mixture, env, search = world_env
    tokenizer = train_chat_tokenizer(["x"], vocab_size=300)
    boundary = tool_turn_text(tokenizer)
    rng = random.Random(0)
    seen = set()
    for i in range(60):
        problem = mixture[i]
        kind = problem.meta["kind"]
        for tool in ("python", "search"):
            _, info = env.reset(options={"index": i})
            segments = demonstration(problem, tool, search, boundary, rng)
            model_turns, env_texts, text = [], [], ""
            for piece, part in segments:
                if part:  # the model's (learned or not)
                    text += piece
                else:
                    model_turns.append(text)
                    env_texts.append(piece)
                    text = ""
            model_turns.append(text)
            for turn, expected in zip(model_turns, [*env_texts, None]):
                action = turn.removesuffix("<|im_end|>")
                _, reward, terminated, truncated, info = env.step(action)
                if expected is not None:
                    assert not (terminated or truncated)
                    assert boundary is not None
                    got = tool_message_text(tokenizer, boundary, info["tool_outputs"], True)
                    assert got == expected
            assert terminated
            right = tool == FIRST_TOOL[kind]
            assert info["correct"] == right, (kind, tool, info)
            assert info["reward_components"]["selection"] == float(right)
            assert info["calls"][0]["name"] == tool and info["calls"][0]["status"] == "ok"
            seen.add(kind)
    assert seen == set(KINDS)


def test_the_warm_start_data_picks_the_first_tool_by_a_coin_toss_on_every_kind(world_env):
    world, mixture, env, search = world_env
    boundary = tool_turn_text(train_chat_tokenizer(["x"], vocab_size=300))
    prompts = [[{"role": "user", "content": mixture[i].question}] for i in range(900)]
    demos = random_tool_demonstrations(mixture, prompts, search, boundary, random.Random(1))
    for kind in KINDS:
        firsts = [
            getattr(parse_tool_calls(segs[0][0] + segs[1][0] + segs[2][0]).calls[0], "name", None)
            for _, segs, k in demos
            if k == kind
        ]
        n = len(firsts)
        python = sum(f == "python" for f in firsts)
        # Binomial(n, 1/2): 4 standard deviations either side
        assert abs(python - n / 2) < 4 * np.sqrt(n) / 2, (kind, python, n)
        assert set(firsts) == {"python", "search"}


def test_a_call_is_qwen_function_calling_json():
    calls = parse_tool_calls(call_text("search", "Vidune Bakori").removesuffix("<|im_end|>"))
    (call,) = calls.calls
    assert isinstance(call, ToolCallRequest)
    assert (call.name, call.arguments) == ("search", {"query": "Vidune Bakori"})
