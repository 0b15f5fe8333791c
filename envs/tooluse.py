"""ToolUseEnv: problems solved by calling tools (Python, search, your own functions) in Qwen2.5's
function-calling format, over a weighted mixture of problem sources, as a Gymnasium env.

    env = gym.make("ToolUse-v0", tools=["python", "search"], corpus="passages.jsonl",
                   problems=[ProblemSource("math", math_problems, expected_tools=("python",)),
                             ProblemSource("qa", qa_problems, answer_kind="text",
                                           expected_tools=("search",))])
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

from toolgrpo.envs.answers import answers_match, f1_score, last_boxed
from toolgrpo.envs.mixture import ProblemMixture, ProblemSource
from toolgrpo.envs.problems import ArithProblems, Problem, load_problems
from toolgrpo.envs.rewards import (
    CallRecord,
    RewardWeights,
    bad_calls_reward,
    correctness_reward,
    format_reward,
    retrieval_hit_reward,
    selection_reward,
    tool_ran_rewards,
)
from toolgrpo.envs.sandbox import PythonSandbox
from toolgrpo.envs.toolmath import UnicodeText, check_action
from toolgrpo.envs.tools import (
    BM25Index,
    HTTPRetriever,
    Tool,
    Toolbox,
    parse_tool_calls,
    python_tool,
    search_tool,
    tool_messages,
)

SYSTEM_PROMPT = (
    "You are a helpful assistant. Call the tools when they help, then put your final answer "
    "within \\boxed{}."
)

SEARCH_TOOLS = ("search",)
"""The built-in tools whose outputs count for the retrieval-hit reward."""


def build_tools(
    tools: Sequence[str | Tool | Callable],
    corpus: str | None = None,
    retriever_url: str | None = None,
    search_k: int = 3,
    sandbox: PythonSandbox | None = None,
    tool_timeout_s: float = 10.0,
    max_output_chars: int = 2_000,
) -> list[Tool]:
    """The tools named or given: "python" (a sandbox session of its own, until the episode
    ends), "search" (a BM25 index over the JSONL `corpus`, built once and cached on disk, or the
    retrieval server at `retriever_url`), a Tool as it is, or a typed, documented function
    (Tool.from_function)."""
    built: list[Tool] = []
    for tool in tools:
        if isinstance(tool, Tool):
            built.append(tool)
        elif tool == "python":
            built.append(python_tool(sandbox, tool_timeout_s, max_output_chars))
        elif tool == "search":
            if (corpus is None) == (retriever_url is None):
                raise ValueError("the search tool needs a corpus file or a retriever_url (one)")
            retriever = (
                HTTPRetriever(retriever_url)
                if retriever_url is not None
                else _index(*_file_key(str(corpus)))
            )
            built.append(search_tool(retriever, k=search_k))
        elif isinstance(tool, str):
            raise ValueError(
                f"unknown tool {tool!r}: the built-in tools are python and search (or give a "
                f"Tool or a typed, documented function)"
            )
        elif callable(tool):
            built.append(Tool.from_function(tool))
        else:
            raise TypeError(f"a tool is a name, a Tool or a function, got {type(tool).__name__}")
    return built


def _file_key(path: str) -> tuple[str, int, int]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"search corpus {path!r} does not exist")
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _index(path: str, mtime_ns: int, size: int) -> BM25Index:
    """One index a corpus file (as it is now) in a process: the environments of a rollout share
    it (each env builds its tools; the index is read-only)."""
    return BM25Index.from_corpus(path)


def as_problems(problems, data_seed: int = 0) -> Sequence[Problem]:
    """A problem sequence from what the environment takes: "arith", a name or path
    (load_problems), a list of Problems, or a list of ProblemSources / their dicts (a mixture)."""
    if problems == "arith":
        return ArithProblems(3, seed=data_seed)
    if isinstance(problems, str):
        return load_problems(problems)
    if isinstance(problems, ProblemMixture | ArithProblems):
        return problems
    items = list(problems)
    if items and all(isinstance(p, ProblemSource | dict) for p in items):
        sources = [p if isinstance(p, ProblemSource) else _source(p) for p in items]
        return ProblemMixture(sources, seed=data_seed)
    if not items or not all(isinstance(p, Problem) for p in items):
        raise ValueError(
            "problems must be a name, a path, a list of Problem or a list of ProblemSource"
        )
    return items


def _source(spec: dict) -> ProblemSource:
    spec = dict(spec)
    problems = spec.pop("problems", None)
    if isinstance(problems, str):
        problems = load_problems(problems, answer_kind=spec.get("answer_kind") or "auto")
    spec["expected_tools"] = tuple(spec.get("expected_tools", ()))
    return ProblemSource(problems=problems, **spec)


class ToolUseEnv(gym.Env):
    """Solve a problem by calling tools: the model's turns call them in Qwen2.5's format
    (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several a turn allowed), each
    call is answered by a "tool" message, and a turn without a call is the final answer (its
    last \\boxed{...}).

    ## Action Space
    `UnicodeText(max_chars)`: the text of one assistant turn (generate until the end of turn:
    `info["stop"]` is empty, so that a turn may hold several calls).

    ## Observation Space
    `UnicodeText(max_chars + max_output_chars + 64)`. After `reset`: the user message. After a
    turn with calls: their outputs, in order, one per line group (`info["tool_outputs"]` lists
    them; `info["messages"]` has one "tool" message each). After the episode ends: "".

    ## Starting State
    A problem drawn with the env's seeded generator, or `options={"index": i}`. `info` holds
    "messages" (chat form), "tools" (the schemas for the chat template's `tools=`), "stop",
    "protocol" ("qwen"), "problem_id", "source" and "expected_tools".

    ## Rewards
    0 until the episode ends; then the weighted sum (`reward_weights`: RewardWeights) of
    `info["reward_components"]`: correctness, format, tool_use (as ToolMath's), "<tool>_ran"
    for each tool, retrieval_hit (a search output held the gold answer), bad_calls (malformed
    calls, unknown tools, bad arguments), calls, and selection (the first call used a tool the
    problem's source expects; only where it names one). Text answers ("text" answer kind)
    compare by SQuAD's normalised exact match; `info["answer_f1"]` is their F1.

    ## Episode End
    Terminated on a final answer; truncated after `max_turns` turns or when the actions and
    observations exceed `max_chars` characters. `info["calls"]` lists every call: its turn,
    tool, arguments, status ("ok", "error", "malformed", "unknown_tool", "bad_arguments"),
    error (the output of one that did not succeed) and latency; `info["tool"]` counts them
    (calls run, ok, errors, parse failures: the calls that were not valid calls).

    ## Arguments
    * `tools`: names ("python", "search"), Tools or typed, documented functions (build_tools).
    * `problems`: "arith", a name or path, a list of Problem, or ProblemSources (or their dicts:
      name, problems, weight, expected_tools, answer_kind) for a weighted mixture.
    * `corpus` (a JSONL of id, title, text) or `retriever_url`: the search tool's passages;
      `search_k` (3) per query.
    * `max_turns` (4), `max_chars` (32000), `tool_timeout_s` (10), `max_output_chars` (2000),
      `reward_weights`, `system_prompt`, `sandbox`, `data_seed` (the mixture's draw).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012

    def __init__(
        self,
        tools: Sequence[str | Tool | Callable] = ("python",),
        problems: Any = "arith",
        corpus: str | None = None,
        retriever_url: str | None = None,
        search_k: int = 3,
        max_turns: int = 4,
        max_chars: int = 32_000,
        tool_timeout_s: float = 10.0,
        max_output_chars: int = 2_000,
        reward_weights: RewardWeights = RewardWeights(),
        system_prompt: str | None = None,
        sandbox: PythonSandbox | None = None,
        data_seed: int = 0,
        render_mode: str | None = None,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_chars < 100 or max_output_chars < 50:
            raise ValueError(
                f"max_chars ({max_chars}) must be >= 100 and max_output_chars "
                f"({max_output_chars}) >= 50"
            )
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.problems = as_problems(problems, data_seed)
        self.toolbox = Toolbox(
            build_tools(
                tools, corpus, retriever_url, search_k, sandbox, tool_timeout_s, max_output_chars
            ),
            max_output_chars=max_output_chars,
        )
        self.max_turns, self.max_chars = max_turns, max_chars
        self.max_output_chars = max_output_chars
        self.reward_weights = reward_weights
        self.system_prompt = system_prompt or SYSTEM_PROMPT
        self.render_mode = render_mode
        self.stop_sequences: list[str] = []
        self.action_space = UnicodeText(max_chars)
        self.observation_space = UnicodeText(max_chars + max_output_chars + 64)
        self._problem: Problem | None = None
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.toolbox.close()  # the last episode's sessions
        index = (options or {}).get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.problems)))
        elif not 0 <= int(index) < len(self.problems):
            raise IndexError(f"options['index']={index} is outside 0..{len(self.problems) - 1}")
        self._problem = problem = self.problems[int(index)]
        self._turns, self._chars, self._done = 0, 0, False
        self._calls: list[CallRecord] = []
        hint = " The answer is an integer." if problem.answer_kind == "integer" else ""
        user = f"{problem.question}\n\nPut your final answer within \\boxed{{}}.{hint}"
        self._messages: list[dict] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user},
        ]
        return user, self._info(tools=self.toolbox.schemas(), stop=[], protocol="qwen")

    def step(self, action: str):
        check_action(self._done, action)
        self._turns += 1
        turn = parse_tool_calls(action)
        self._messages.append(turn.assistant_message())
        if not turn.calls:
            return self._finish(last_boxed(turn.content), terminated=True)
        outcomes = self.toolbox.run(turn.calls)
        self._calls += [
            CallRecord(self._turns, o.name, o.arguments, o.status, o.output, o.latency_s)
            for o in outcomes
        ]
        self._messages += tool_messages(outcomes)
        outputs = [o.output for o in outcomes]
        observation = "\n".join(outputs)
        self._chars += len(action) + len(observation)
        if self._turns >= self.max_turns or self._chars > self.max_chars:
            _, reward, _, _, info = self._finish(None, terminated=False)
            return observation, reward, False, True, {**info, "tool_outputs": outputs}
        return observation, 0.0, False, False, self._info(tool_outputs=outputs)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{m['role']}]\n{m.get('content') or ''}" for m in self._messages)

    def close(self) -> None:
        self.toolbox.close()
        super().close()

    def reward_components(self, answer: str | None) -> dict[str, float]:
        """The components of the episode so far, had it ended with `answer` (class docstring)."""
        problem = self._current()
        correct = answers_match(answer, problem.answer, problem.answer_kind)
        calls = self._calls
        components = {
            "correctness": correctness_reward(correct),
            "format": format_reward(answer),
            "tool_use": float(any(c.status == "ok" for c in calls)),
            **tool_ran_rewards(calls, self.toolbox.names),
            "bad_calls": bad_calls_reward(calls),
            "calls": float(len(calls)),
        }
        searches = [n for n in self.toolbox.names if n in SEARCH_TOOLS]
        if searches:
            components["retrieval_hit"] = retrieval_hit_reward(calls, problem.answer, searches)
        if problem.expected_tools:
            components["selection"] = selection_reward(calls, problem.expected_tools)
        return components

    def _finish(self, answer: str | None, terminated: bool):
        problem = self._current()
        components = self.reward_components(answer)
        self._done = True
        self.toolbox.close()
        info = self._info()
        info.update(
            answer=answer,
            gold_answer=problem.answer,
            correct=bool(components["correctness"]),
            reward_components=components,
        )
        if problem.answer_kind == "text":
            info["answer_f1"] = f1_score(answer, problem.answer)
        return "", self.reward_weights.combine(components), terminated, not terminated, info

    def _current(self) -> Problem:
        if self._problem is None:
            raise RuntimeError("no episode yet: call reset() first")
        return self._problem

    def _info(self, **extra) -> dict:
        problem = self._current()
        ran = [c for c in self._calls if c.status in ("ok", "error")]
        return {
            "problem_id": problem.id,
            "source": problem.source,
            "expected_tools": list(problem.expected_tools),
            "turn": self._turns,
            "calls": [
                {
                    "turn": c.turn,
                    "name": c.name,
                    "arguments": c.arguments,
                    "status": c.status,
                    "error": None if c.status == "ok" else c.output,
                    "latency_s": c.latency_s,
                }
                for c in self._calls
            ],
            "tool": {
                "calls": len(ran),
                "ok": sum(c.status == "ok" for c in ran),
                "errors": sum(c.status == "error" for c in ran),
                "timeouts": 0,
                "parse_failures": len(self._calls) - len(ran),
            },
            "messages": json.loads(json.dumps(self._messages)),
            **extra,
        }
