"""Qwen2.5's function calling: parse an assistant turn's <tool_call>s, run them, answer each.

    toolbox = Toolbox([Tool.from_function(add), search_tool(index)])
    text = tokenizer.apply_chat_template(messages, tools=toolbox.schemas(), ...)
    turn = parse_tool_calls(model_text)    # every <tool_call>{"name": ..., "arguments": ...}</tool_call>
    outcomes = toolbox.run(turn.calls)     # one ToolOutcome a call, in order; never raises
    messages += [turn.assistant_message(), *tool_messages(outcomes)]

The model writes each call as a JSON object between <tool_call> and </tool_call> (the format the
Qwen2.5 chat template declares in its "# Tools" block); a turn may hold several. Each call is
answered by a message of role "tool", which the template renders inside <tool_response> tags
(consecutive tool messages share one user turn). A call that is not valid JSON, names no tool or
an unknown one, or whose arguments do not fit the schema, is answered too: with an explanation
the model can act on (its ToolOutcome's status says which), never with an exception.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from toolgrpo.envs.protocols import truncate_middle
from toolgrpo.envs.tools.tool import Tool, ToolArgumentError, ToolFailure

CALL_FORMAT = (
    '<tool_call>\n{"name": <tool name>, "arguments": {<argument>: <value>, ...}}\n</tool_call>'
)

_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCallRequest:
    """A well-formed call: a tool name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class MalformedCall:
    """A <tool_call> block that is not a call: `text` is what the model wrote between the tags,
    `reason` what is wrong with it."""

    text: str
    reason: str


Call = ToolCallRequest | MalformedCall


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn: its text before the first call, and its calls in order."""

    content: str
    calls: tuple[Call, ...] = ()

    def assistant_message(self) -> dict[str, Any]:
        """The turn in Hugging Face's chat form (the well-formed calls as `tool_calls`, their
        arguments a mapping, as chat templates take them)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        requests = [c for c in self.calls if isinstance(c, ToolCallRequest)]
        if requests:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in requests
            ]
        return message


def _parse_one(raw: str) -> Call:
    body = raw.strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        return MalformedCall(
            raw, f"the tool call is not valid JSON ({exc.msg} at position {exc.pos})"
        )
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return MalformedCall(raw, 'the tool call must be a JSON object with a string "name"')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models encode the arguments twice
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return MalformedCall(
            raw, f'the "arguments" of a tool call must be a JSON object, got {arguments!r:.80}'
        )
    return ToolCallRequest(call["name"], arguments)


def parse_tool_calls(text: str) -> ParsedTurn:
    """Every <tool_call> block of an assistant turn, in order. A last block cut at its closing
    tag (generation stopped at "</tool_call>", which the text may or may not include) counts.
    A turn without a block has no calls: it is a final answer."""
    head, sep, _ = text.partition("<tool_call>")
    content = head.removesuffix("\n") if sep else text
    return ParsedTurn(content, tuple(_parse_one(m.group(1)) for m in _CALL.finditer(text)))


Status = Literal["ok", "malformed", "unknown_tool", "bad_arguments", "error"]


@dataclass(frozen=True)
class ToolOutcome:
    """What one call did: `output` is the text the model sees (the tool's result, or what was
    wrong); `status` is "ok", "malformed" (not a call), "unknown_tool", "bad_arguments" or
    "error" (the tool raised, or ran and failed: ToolFailure); `latency_s` the time the tool took (0 when it did not run)."""

    name: str | None
    arguments: dict[str, Any] | None
    status: Status
    output: str
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def tool_messages(outcomes: Iterable[ToolOutcome]) -> list[dict[str, str]]:
    """The "tool" messages that answer a turn's calls, in order (the chat template wraps each in
    <tool_response>)."""
    return [{"role": "tool", "content": o.output} for o in outcomes]


@dataclass
class Toolbox:
    """The tools of an environment, by name: their schemas for the chat template, and the
    runner of a turn's calls."""

    tools: Sequence[Tool]
    max_output_chars: int | None = None
    """A tool's output longer than this keeps its head and tail (None: no limit)."""
    _by_name: dict[str, Tool] = field(init=False, repr=False)

    def __post_init__(self):
        self._by_name = {}
        for tool in self.tools:
            if tool.name in self._by_name:
                raise ValueError(f"two tools are named {tool.name!r}; tool names must be unique")
            self._by_name[tool.name] = tool
        if not self._by_name:
            raise ValueError("a Toolbox needs at least one tool")

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools=` argument of `tokenizer.apply_chat_template`."""
        return [tool.schema() for tool in self.tools]

    def run(self, calls: Iterable[Call]) -> list[ToolOutcome]:
        """Run calls in order; every call gets a ToolOutcome, none raises."""
        return [self.run_one(call) for call in calls]

    def run_one(self, call: Call) -> ToolOutcome:
        if isinstance(call, MalformedCall):
            return ToolOutcome(
                None, None, "malformed", f"Error: {call.reason}. Write each call as {CALL_FORMAT}"
            )
        tool = self._by_name.get(call.name)
        if tool is None:
            return ToolOutcome(
                call.name,
                call.arguments,
                "unknown_tool",
                f"Error: there is no tool named {call.name!r}; the tools are: "
                f"{', '.join(self._by_name)}.",
            )
        start = time.perf_counter()
        try:
            output, status = tool(call.arguments), "ok"
        except ToolFailure as exc:  # the tool ran and failed: its message is the observation
            output, status = str(exc), "error"
        except ToolArgumentError as exc:
            output, status = f"Error: bad arguments for {call.name!r}: {exc}.", "bad_arguments"
        except Exception as exc:  # the tool's own failure is the model's observation
            output, status = f"Error: {call.name!r} failed: {type(exc).__name__}: {exc}", "error"
        limit = self.max_output_chars
        return ToolOutcome(
            call.name,
            call.arguments,
            status,
            output if limit is None else truncate_middle(output, limit),
            time.perf_counter() - start,
        )

    def close(self) -> None:
        for tool in self.tools:
            tool.close()
