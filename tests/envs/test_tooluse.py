"""ToolUse-v0: several tools (the real sandbox, a real bm25s index built here, a user's function)
in Qwen2.5's call format, Gymnasium's checker, a weighted mixture of sources, text answers, and
tool-specific rewards computed by hand."""

import json

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import toolgrpo.envs  # noqa: F401 - registers the environments
from toolgrpo.envs.answers import answers_match, exact_match, f1_score, normalize_text
from toolgrpo.envs.mixture import ProblemMixture, ProblemSource
from toolgrpo.envs.problems import Problem
from toolgrpo.envs.rewards import CallRecord, RewardWeights, retrieval_hit_reward
from toolgrpo.envs.tooluse import ToolUseEnv


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLGRPO_CACHE", str(tmp_path / "cache"))  # the index's cache
    path = tmp_path / "corpus.jsonl"
    rows = [("Zorblax", "Q04211"), ("Mirutea", "Q77310"), ("Kalovia", "Q00042")]
    with open(path, "w") as f:
        for i, (name, code) in enumerate(rows):
            text = f"{name} is a small town. The registry code of {name} is {code}."
            f.write(json.dumps({"id": f"e{i}", "title": name, "text": text}) + "\n")
    return str(path)


def shop_price(item: str) -> str:
    """The price of an item in the shop.

    Args:
        item: The item's name.
    """
    return {"apple": "3"}.get(item, "unknown item")


QA = [Problem("z", "What is the registry code of Zorblax?", "Q04211", "text")]
MATH = [Problem("m", "Compute 123 × 456.", "56088", "integer")]


def test_check_env_with_every_kind_of_tool_and_a_mixture(corpus):
    """(check_env makes the env again from its spec's deep-copied arguments: the process's
    shared sandbox, not the module's, which holds locks.)"""
    sources = [
        ProblemSource("math", MATH, expected_tools=("python",)),
        ProblemSource("qa", QA, weight=2.0, expected_tools=("search",)),
    ]
    env = gym.make(
        "ToolUse-v0",
        tools=["python", "search", shop_price],
        problems=sources,
        corpus=corpus,
    )
    check_env(env.unwrapped, skip_render_check=False)
    env.close()


def test_an_episode_with_two_calls_in_a_turn_then_a_text_answer(corpus, sandbox):
    env = ToolUseEnv(tools=["python", "search"], problems=QA, corpus=corpus, sandbox=sandbox)
    obs, info = env.reset(options={"index": 0})
    assert "registry code of Zorblax" in obs and info["stop"] == [] and info["protocol"] == "qwen"
    assert [t["function"]["name"] for t in info["tools"]] == ["python", "search"]
    turn = "Two tools at once.\n" + call("search", query="Zorblax code") + "\n"
    turn += call("python", code="print(6 * 7)")
    obs, reward, terminated, truncated, info = env.step(turn)
    assert (reward, terminated, truncated) == (0.0, False, False)
    search_out, python_out = info["tool_outputs"]
    assert "Q04211" in search_out and python_out == "42" and obs == f"{search_out}\n42"
    assert [m["role"] for m in info["messages"]][-3:] == ["assistant", "tool", "tool"]
    assert info["messages"][-3]["content"] == "Two tools at once."
    assert [c["function"]["name"] for c in info["messages"][-3]["tool_calls"]] == [
        "search",
        "python",
    ]
    calls = info["calls"]
    assert [(c["turn"], c["name"], c["status"], c["error"]) for c in calls] == [
        (1, "search", "ok", None),
        (1, "python", "ok", None),
    ]
    assert calls[0]["arguments"] == {"query": "Zorblax code"} and calls[1]["latency_s"] > 0
    assert info["tool"] == {"calls": 2, "ok": 2, "errors": 0, "timeouts": 0, "parse_failures": 0}
    _, reward, terminated, truncated, info = env.step("It is \\boxed{q04211.}")
    assert terminated and not truncated and info["correct"] and info["answer_f1"] == 1.0
    assert info["reward_components"] == {
        "correctness": 1.0,
        "format": 1.0,
        "tool_use": 1.0,
        "python_ran": 1.0,
        "search_ran": 1.0,
        "bad_calls": 0.0,
        "calls": 2.0,
        "retrieval_hit": 1.0,
    }
    assert reward == pytest.approx(
        1.2
    )  # the default weights: correctness 1, format and tool use 0.1
    env.close()


def test_bad_calls_are_observations_and_a_reward_component(sandbox):
    weights = RewardWeights(bad_call=-0.1, call_cost=-0.01, tool_ran=0.5, selection=0.3)
    problems = [Problem("m", "Compute 123 × 456.", "56088", "integer", expected_tools=("python",))]
    env = ToolUseEnv(
        tools=["python", shop_price], problems=problems, sandbox=sandbox, reward_weights=weights
    )
    env.reset(options={"index": 0})
    turn = "<tool_call>\n{not json}\n</tool_call>" + call("calculator", x=1)
    turn += call("shop_price", item=3) + call("python", code="1/0")
    obs, reward, terminated, truncated, info = env.step(turn)
    assert not (terminated or truncated)
    assert [c["status"] for c in info["calls"]] == [
        "malformed",
        "unknown_tool",
        "bad_arguments",
        "error",
    ]
    malformed, unknown, bad, error = info["tool_outputs"]
    assert "not valid JSON" in malformed and "no tool named 'calculator'" in unknown
    assert "bad arguments for 'shop_price'" in bad and "ZeroDivisionError" in error
    assert info["calls"][3]["error"] == error
    assert info["tool"] == {"calls": 1, "ok": 0, "errors": 1, "timeouts": 0, "parse_failures": 3}
    _, reward, _, _, info = env.step(call("python", code="print(123 * 456)"))
    _, reward, terminated, _, info = env.step("\\boxed{56088}")
    components = info["reward_components"]
    assert components["bad_calls"] == 3 and components["calls"] == 5
    assert components["python_ran"] == 1 and components["shop_price_ran"] == 0
    assert components["selection"] == 0.0  # the first call was not a python call
    assert "retrieval_hit" not in components  # no search tool
    # 1 (correct) + 0.1 (boxed) + 0.1 (a call ran) + 0.5 (python ran) - 0.3 - 0.05
    assert reward == pytest.approx(1 + 0.1 + 0.1 + 0.5 - 0.1 * 3 - 0.01 * 5)
    env.close()


def test_the_turn_and_character_limits_truncate(sandbox):
    env = ToolUseEnv(tools=["python"], problems=MATH, sandbox=sandbox, max_turns=2)
    env.reset(options={"index": 0})
    env.step(call("python", code="x = 1"))
    _, reward, terminated, truncated, info = env.step(call("python", code="print(x)"))
    assert truncated and not terminated and info["tool_outputs"] == ["1"]
    assert info["answer"] is None and reward == pytest.approx(0.1)  # the calls ran: tool use
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("\\boxed{1}")
    env.close()


def test_a_mixture_draws_sources_by_weight_and_tags_each_problem():
    many = [Problem(f"m{i}", f"q{i}", str(i), "integer") for i in range(10)]
    mixture = ProblemMixture(
        [
            ProblemSource("math", many, weight=1.0, expected_tools=("python",)),
            ProblemSource("qa", QA, weight=3.0, answer_kind="text", expected_tools=("search",)),
        ],
        seed=0,
        size=4000,
    )
    counts = mixture.counts(range(4000))
    # binomial(4000, 1/4): mean 1000, sd 27; 5 sd either side
    assert abs(counts["math"] - 1000) < 5 * 27.4 and sum(counts.values()) == 4000
    p = next(mixture[i] for i in range(100) if mixture.source_of(i).name == "qa")
    assert (p.id, p.source, p.expected_tools, p.answer_kind) == ("qa/z", "qa", ("search",), "text")
    assert mixture[7] == mixture[7] and len(mixture) == 4000
    reseeded = ProblemMixture(mixture.sources, seed=1, size=4000)
    assert any(reseeded[i] != mixture[i] for i in range(20))  # the draw is the seed's
    with pytest.raises(IndexError):
        mixture[4000]


@pytest.mark.parametrize(
    "sources,message",
    [
        ([], "at least one source"),
        ([ProblemSource("a", MATH), ProblemSource("a", QA)], "same name"),
    ],
)
def test_bad_mixtures_are_refused(sources, message):
    with pytest.raises(ValueError, match=message):
        ProblemMixture(sources)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "", "problems": MATH}, "non-empty"),
        ({"name": "a", "problems": MATH, "weight": 0}, "weight must be > 0"),
        ({"name": "a", "problems": []}, "has no problems"),
        ({"name": "a", "problems": MATH, "answer_kind": "fuzzy"}, "answer_kind must be one of"),
    ],
)
def test_bad_sources_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProblemSource(**kwargs)


def test_bad_tools_are_refused(corpus):
    with pytest.raises(ValueError, match="unknown tool 'calculator'"):
        ToolUseEnv(tools=["calculator"], problems=MATH)
    with pytest.raises(ValueError, match="needs a corpus file or a retriever_url"):
        ToolUseEnv(tools=["search"], problems=MATH)
    with pytest.raises(FileNotFoundError, match="search corpus 'nowhere.jsonl' does not exist"):
        ToolUseEnv(tools=["search"], problems=MATH, corpus="nowhere.jsonl")
    with pytest.raises(ValueError, match="two tools are named 'python'"):
        ToolUseEnv(tools=["python", "python"], problems=MATH)


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_text("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower", "Eiffel Tower.") and not exact_match(None, "x")
    assert answers_match("An Apple", "apple", "text") and not answers_match(
        "apples", "apple", "text"
    )
    # prediction "eiffel tower paris" against "eiffel tower": precision 2/3, recall 1
    assert f1_score("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(0.8)
    assert f1_score("tower tower", "tower") == pytest.approx(2 * 0.5 * 1 / 1.5)  # counts clip
    assert f1_score("", "") == 1.0 and f1_score("the", "x") == 0.0 and f1_score("x y", "z") == 0.0


def test_a_retrieval_hit_is_the_gold_answer_in_a_search_output_that_ran():
    hit = CallRecord(1, "search", {"query": "q"}, "ok", "[1] Zorblax: ... code is Q04211.")
    miss = CallRecord(1, "search", {"query": "q"}, "ok", "[1] Mirutea: ... code is Q77310.")
    failed = CallRecord(1, "search", {"query": "q"}, "error", "Q04211")
    python = CallRecord(1, "python", {"code": "print('Q04211')"}, "ok", "Q04211")
    assert retrieval_hit_reward([miss, hit], "q04211", ["search"]) == 1.0
    assert retrieval_hit_reward([miss, failed, python], "Q04211", ["search"]) == 0.0
    assert retrieval_hit_reward([hit], "", ["search"]) == 0.0
