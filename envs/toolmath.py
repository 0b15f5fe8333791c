"""ToolMathEnv: math problems solved by writing, running and reading Python, as a Gymnasium env."""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Sequence
from typing import Any

import gymnasium as gym

from toolgrpo.envs.answers import answers_match
from toolgrpo.envs.problems import ArithProblems, Problem, load_problems
from toolgrpo.envs.protocols import (
    FinalAnswer,
    ParseFailure,
    ToolCall,
    cut_traceback,
    get_protocol,
    truncate_middle,
)
from toolgrpo.envs.rewards import RewardWeights, ToolStats, reward_components
from toolgrpo.envs.sandbox import PythonSandbox, SandboxError, SandboxSession, shared_sandbox

logger = logging.getLogger(__name__)

CRASHED_OUTPUT = "SandboxError: the Python sandbox crashed; this session's state is lost"
"""The tool output of a call whose sandbox server died under it."""


class UnicodeText(gym.spaces.Text):
    """Any Unicode string of `min_length` to `max_length` characters. (Gymnasium's Text space
    admits only a fixed character set; model text is arbitrary.) Samples are printable ASCII."""

    def __init__(self, max_length: int, min_length: int = 0, seed=None):
        super().__init__(max_length, min_length=min_length, charset=string.printable, seed=seed)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


class ToolMathEnv(gym.Env):
    """Solve a math problem with a Python tool: write code, run it, read its output, answer.

    ## Description
    Each episode is one problem. The agent (a language model) answers in turns. A turn that holds a
    tool call (a ```python block by default) runs that code in a sandboxed Python session owned by
    the episode, whose variables persist across turns, and the output is the next observation. A
    turn without a tool call is the final answer: its last \\boxed{...} is compared with the
    reference (as integers for AIME and Arith, by math-verify otherwise).

    ## Action Space
    `UnicodeText(max_chars)`: the text of one assistant turn. Agents should generate with
    `info["stop"]` (also `env.unwrapped.stop_sequences`) as stop sequences so that generation
    pauses at a tool call; the stop string may be included in the action or not.

    ## Observation Space
    `UnicodeText(max_chars + max_output_chars + 64)`. After `reset`: the user message (problem and answer instructions).
    After a tool call: the tool output formatted by the protocol ("```output ...```" continuing the
    assistant turn for "markdown"; the plain output of a "tool" message for "qwen"). After a parse
    failure: an explanation of the expected format. After the episode ends: "".

    ## Starting State
    A problem drawn with the env's seeded generator, or `options={"index": i}`. `info` holds
    "messages" (chat form, as chat templates take it: system prompt with the tool instructions,
    user problem), "problem_id", "stop", "tools" (function schema for the "qwen" protocol) and
    "protocol".

    ## Rewards
    0 until the episode ends; then the weighted sum of `info["reward_components"]`: correctness (a
    right final answer), format (a \\boxed{} answer given) and tool_use (at least one call ran
    without error). Weights: `reward_weights`.

    ## Episode End
    Terminated on a final answer. Truncated after `max_turns` turns, or when the actions and
    observations exceed `max_chars` characters, or when the sandbox server dies under a tool call
    (the call's output says so, `info["crashed"]` is True, `info["tool"]["crashes"]` counts it;
    the next episode's session comes from a restarted server). `info["tool"]` counts calls,
    errors, timeouts, crashes and parse failures; the last `info` also holds "answer",
    "gold_answer" and "correct".

    ## Arguments
    * `problems`: "aime" (AIME 1983-2024 train, AIME 2025 test), "arith" (generated), a hub id
      ("name" or "name:config"), a local JSON/JSONL/CSV/Parquet file, or a sequence of `Problem`s.
    * `split`: data set split ("train"/"test"). `difficulty`, `data_seed`: for "arith".
    * `protocol`: "markdown" (default) or "qwen". `max_turns` (4), `max_chars` (32000).
    * `tool_timeout_s` (10): per call. `max_output_chars` (2000): output shown to the model, head
      and tail kept. `reward_weights`: `toolgrpo.envs.rewards.RewardWeights`.
    * `traceback_lines` (20): a failed call's traceback is cut to its header and its last this
      many lines, with "[... N lines cut ...]" where the cut is (`toolgrpo.envs.protocols.cut_traceback`),
      before `max_output_chars` applies; None: whole.
    * `sandbox`: a `PythonSandbox` (default: one shared by the process).
    * `system_prompt`: replaces the protocol's instructions (which explain the tool format).

    ## Version History
    * v0: initial release.
    """

    # gym.Env declares `metadata` a plain dict attribute, which a ClassVar may not override
    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # noqa: RUF012

    def __init__(
        self,
        problems: str | Sequence[Problem] = "aime",
        split: str = "train",
        protocol: str = "markdown",
        max_turns: int = 4,
        max_chars: int = 32_000,
        tool_timeout_s: float = 10.0,
        max_output_chars: int = 2_000,
        reward_weights: RewardWeights = RewardWeights(),
        difficulty: int = 3,
        data_seed: int = 0,
        sandbox: PythonSandbox | None = None,
        system_prompt: str | None = None,
        render_mode: str | None = None,
        traceback_lines: int | None = 20,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if max_chars < 100 or max_output_chars < 50:
            raise ValueError(
                f"max_chars ({max_chars}) must be >= 100 and max_output_chars "
                f"({max_output_chars}) >= 50"
            )
        if traceback_lines is not None and traceback_lines < 1:
            raise ValueError(f"traceback_lines must be >= 1 or None, got {traceback_lines}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if problems == "arith":
            self.problems: Sequence[Problem] = ArithProblems(difficulty, seed=data_seed)
        elif isinstance(problems, str):
            self.problems = load_problems(problems, split)
        else:
            # a lazy Sequence (like ArithProblems, 2**31 long) is used as it is and checked by
            # its first item; anything else is listed and checked whole
            lazy = isinstance(problems, Sequence) and not isinstance(problems, (list, tuple))
            self.problems = problems if lazy else list(problems)
            checked = self.problems
            if lazy:
                checked = [self.problems[0]] if len(self.problems) else []
            if not checked or not all(isinstance(p, Problem) for p in checked):
                raise ValueError("problems must be a name, a path or a non-empty list of Problem")
        self.protocol = get_protocol(protocol)
        self.stop_sequences = list(self.protocol.stop_sequences)
        self.max_turns, self.max_chars = max_turns, max_chars
        self.tool_timeout_s, self.max_output_chars = tool_timeout_s, max_output_chars
        self.traceback_lines = traceback_lines
        self.reward_weights = reward_weights
        self.render_mode = render_mode
        self.system_prompt = system_prompt or self.protocol.system_prompt()
        self.action_space = UnicodeText(max_chars)
        # the longest observation: a problem, or a tool output with the protocol's wrapping
        self.observation_space = UnicodeText(max_chars + max_output_chars + 64)
        self._sandbox = sandbox
        self._session: SandboxSession | None = None
        self._problem: Problem | None = None
        self._done = True

    # -- Gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._release()
        index = (options or {}).get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.problems)))
        elif not 0 <= int(index) < len(self.problems):
            raise IndexError(f"options['index']={index} is outside 0..{len(self.problems) - 1}")
        self._problem = self.problems[int(index)]
        self._turns, self._chars, self._done, self._crashed = 0, 0, False, False
        self._stats = ToolStats()
        user = self._user_message(self._problem)
        self._messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user},
        ]
        info = {
            "problem_id": self._problem.id,
            "messages": self._copy_messages(),
            "stop": list(self.stop_sequences),
            "protocol": self.protocol.name,
            "tools": [dict(t) for t in getattr(self.protocol, "tools", ())],
        }
        return user, info

    def step(self, action: str):
        check_action(self._done, action)
        self._turns += 1
        parsed = self.protocol.parse(action)
        if isinstance(parsed, FinalAnswer):
            self._append(action, parsed, None)
            return self._finish(parsed.answer, terminated=True)
        if isinstance(parsed, ParseFailure):
            self._stats = _bump(self._stats, parse_failures=1)
            output = parsed.reason
        else:
            output = self._run_tool(parsed)
        observation = self.protocol.format_output(output, action)
        self._append(action, parsed, observation)
        self._chars += len(action) + len(observation)
        if self._crashed:  # the session is gone: the episode cannot go on
            _, reward, _, _, info = self._finish(None, terminated=False)
            return observation, reward, False, True, {**info, "crashed": True}
        if self._turns >= self.max_turns or self._chars > self.max_chars:
            _obs, reward, terminated, truncated, info = self._finish(None, terminated=False)
            return observation, reward, terminated, truncated, info
        return observation, 0.0, False, False, self._info()

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(f"[{m['role']}]\n{m.get('content') or ''}" for m in self._messages)

    def close(self) -> None:
        self._release()
        super().close()

    # -- internals --------------------------------------------------------------------------------
    def _user_message(self, problem: Problem) -> str:
        hint = " The answer is an integer." if problem.answer_kind == "integer" else ""
        return f"{problem.question}\n\nPut your final answer within \\boxed{{}}.{hint}"

    def _run_tool(self, call: ToolCall) -> str:
        try:
            if self._session is None:
                self._session = (self._sandbox or shared_sandbox()).session()
            result = self._session.run(call.code, timeout_s=self.tool_timeout_s)
        except SandboxError as exc:  # the server died (or cannot start): not the code's fault
            logger.warning("problem %s: the sandbox crashed: %s", self._current().id, exc)
            self._release()
            self._crashed = True
            self._stats = _bump(self._stats, calls=1, errors=1, crashes=1)
            return CRASHED_OUTPUT
        self._stats = _bump(
            self._stats,
            calls=1,
            ok=int(result.ok),
            errors=int(result.status in ("error", "memory", "crashed")),
            timeouts=int(result.status == "timeout"),
        )
        text = (result.stdout + result.stderr).rstrip("\n")
        if self.traceback_lines is not None and result.status in ("error", "memory"):
            text = cut_traceback(text, self.traceback_lines)
        return truncate_middle(text, self.max_output_chars)

    def _append(self, action: str, parsed, observation: str | None) -> None:
        """Record the turn in chat form (a call's arguments as a mapping, as templates take it)."""
        if self.protocol.observation_role == "assistant":
            if self._messages[-1]["role"] != "assistant":
                self._messages.append({"role": "assistant", "content": ""})
            self._messages[-1]["content"] += action + (observation or "")
            return
        head, sep, _ = action.partition("<tool_call>")
        # Hugging Face's chat form: the text before the call (the template puts the newline
        # before <tool_call> back) and the call's arguments as a mapping, as Qwen's template
        # renders them (`arguments | tojson`); a model that writes the call that way gets its
        # own text back from the template
        content = head.removesuffix("\n") if sep else action
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if observation is not None:
            call_id = f"call_{self._turns}"
            code = parsed.code if isinstance(parsed, ToolCall) else ""
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "python", "arguments": {"code": code}},
                }
            ]
            self._messages += [
                message,
                {"role": "tool", "tool_call_id": call_id, "content": observation},
            ]
        else:
            self._messages.append(message)

    def _current(self) -> Problem:
        """The episode's problem, which reset() drew."""
        if self._problem is None:
            raise RuntimeError("no episode yet: call reset() first")
        return self._problem

    def _finish(self, answer: str | None, terminated: bool):
        problem = self._current()
        correct = answers_match(answer, problem.answer, problem.answer_kind)
        components = reward_components(correct, answer, self._stats)
        reward = self.reward_weights.combine(components)
        self._done = True
        self._release()
        info = self._info()
        info.update(
            answer=answer, gold_answer=problem.answer, correct=correct, reward_components=components
        )
        return "", reward, terminated, not terminated, info

    def _info(self) -> dict:
        return {
            "problem_id": self._current().id,
            "turn": self._turns,
            "tool": dict(vars(self._stats)),
            "messages": self._copy_messages(),
        }

    def _copy_messages(self) -> list[dict]:
        return json.loads(json.dumps(self._messages))

    def _release(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def _bump(stats: ToolStats, **deltas: int) -> ToolStats:
    return ToolStats(**{k: v + deltas.get(k, 0) for k, v in vars(stats).items()})


def check_action(done: bool, action) -> None:
    """What a step of a ToolGRPO environment refuses: a step after the episode ended, an action
    that is not text."""
    if done:
        raise RuntimeError("the episode is over: call reset() before step()")
    if not isinstance(action, str):
        raise TypeError(f"an action is the text of an assistant turn, got {type(action).__name__}")


def problems_of(env: gym.Env) -> Sequence[Problem]:
    """The problems of a ToolMath or ToolUse environment under gym.make's wrappers."""
    problems = getattr(env.unwrapped, "problems", None)
    if problems is None:
        raise TypeError(f"not a ToolGRPO environment: {type(env.unwrapped).__name__}")
    return problems
