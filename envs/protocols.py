"""Tool protocols: how a model asks for code to be run, and how the output comes back.

* `MarkdownProtocol` (default): what Qwen2.5-Instruct writes unprompted and the original ToolGRPO
  used. The model writes a ```python block; generation pauses at the closing fence; the output is
  appended to the same assistant turn as a ```output block, and the model continues.
* `QwenToolCallProtocol`: Qwen's native function calling. The model writes
  `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>`; the output comes back
  as a message of role "tool" (the chat template wraps it in <tool_response>).

A protocol is pure text handling: it parses an assistant turn into a `ToolCall`, a `FinalAnswer`
or a `ParseFailure`, formats tool output, and names the stop sequences an agent should generate
with so that generation pauses at a tool call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from toolgrpo.envs.answers import last_boxed

PYTHON_TOOL: dict[str, Any] = {  # a JSON schema: values of every JSON type
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a persistent session (variables, imports and functions "
        "persist between calls; numpy and sympy are available) and return what it "
        "prints. The value of a final expression is shown too.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
        },
    },
}


@dataclass(frozen=True)
class ToolCall:
    code: str


@dataclass(frozen=True)
class FinalAnswer:
    answer: str | None
    """The last \\boxed{} content of the turn (outside code), or None when there is none."""


@dataclass(frozen=True)
class ParseFailure:
    reason: str
    """Shown to the model as the observation."""


Action = ToolCall | FinalAnswer | ParseFailure


def truncate_middle(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its head and tail with a marker between."""
    if len(text) <= limit:
        return text
    marker = f"\n... [{len(text) - limit} characters omitted] ...\n"
    head = (limit - len(marker)) // 2
    tail = max(0, limit - len(marker) - head)
    return text[:head] + marker + (text[-tail:] if tail else "")


TRACEBACK_HEADER = "Traceback (most recent call last):"


def cut_traceback(text: str, keep_lines: int) -> str:
    """`text` (a failed call's output) with its error report cut to the header line and the
    last `keep_lines` lines, the cut shown where it was:

        <output before the traceback, unchanged>
        Traceback (most recent call last):
        [... N lines cut ...]
        <the last keep_lines lines: the innermost frames and the exception>

    N = (lines from the first traceback header to the end) - 1 - keep_lines; nothing changes
    when N <= 0 or the text holds no traceback. Chained exceptions count as one report, from
    the first header on. As ToRL (arXiv 2503.23383, "error message processing") keeps only an
    error's last line: the frames deep inside a library are context the model cannot act
    on."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if line == TRACEBACK_HEADER), None)
    if start is None:
        return text
    report = lines[start + 1 :]
    cut = len(report) - keep_lines
    if cut <= 0:
        return text
    kept = report[cut:]
    return "\n".join([*lines[: start + 1], f"[... {cut} lines cut ...]", *kept])


class MarkdownProtocol:
    """```python blocks answered with ```output blocks in the same assistant turn."""

    name = "markdown"
    observation_role = "assistant"
    """Observations continue the assistant's own message."""
    stop_sequences = ("\n```\n", "```output")
    """The closing fence of a code block (and "```output", which some models write themselves)."""

    _block = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:\n```|\Z)", re.DOTALL)
    _any_block = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)

    def system_prompt(self) -> str:
        return (
            "You are a helpful assistant who solves problems by reasoning step by step and "
            "running Python code. To run code, write it in a ```python code block; it runs in "
            "a persistent Python session with numpy and sympy available, and its output "
            "appears in a ```output block. Use print() to see results. When you are sure, "
            "give the final answer as \\boxed{answer}."
        )

    def parse(self, text: str) -> Action:
        body = text[: -len("```output")] if text.rstrip().endswith("```output") else text
        blocks = list(self._block.finditer(body))
        boxed_at = body.rfind("\\boxed")
        if blocks and not (boxed_at > blocks[-1].end()):
            code = "\n".join(b.group(1) for b in blocks)
            if not code.strip():
                return ParseFailure(
                    "The ```python block is empty. Write the code to run inside it."
                )
            return ToolCall(code)
        return FinalAnswer(last_boxed(self._any_block.sub("", body)))

    def format_output(self, output: str, previous_text: str) -> str:
        lead = "" if previous_text.endswith("\n") else "\n"
        if previous_text.rstrip().endswith("```output"):  # the model opened the block itself
            return f"\n{output}\n```\n"
        return f"{lead}```output\n{output}\n```\n"


class QwenToolCallProtocol:
    """Qwen2.5's native <tool_call> JSON, answered by a message of role "tool"."""

    name = "qwen"
    observation_role = "tool"
    stop_sequences = ("</tool_call>",)
    tools = (PYTHON_TOOL,)

    _call = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def system_prompt(self) -> str:
        return (
            "You are a helpful assistant who solves problems by reasoning step by step and "
            "calling the python tool to compute. When you are sure, give the final answer as "
            "\\boxed{answer}."
        )

    def parse(self, text: str) -> Action:
        calls = list(self._call.finditer(text))
        if not calls:
            return FinalAnswer(last_boxed(text))
        codes = []
        for m in calls:
            raw = m.group(1).strip()
            try:
                call = json.loads(raw)
            except json.JSONDecodeError as exc:
                return ParseFailure(
                    f"The tool call is not valid JSON ({exc.msg} at position "
                    f"{exc.pos}). Write "
                    '<tool_call>{"name": "python", "arguments": {"code": "..."}}'
                    "</tool_call>."
                )
            if not isinstance(call, dict) or call.get("name") != "python":
                name = call.get("name") if isinstance(call, dict) else None
                return ParseFailure(f"Unknown tool {name!r}; the only tool is 'python'.")
            args = call.get("arguments")
            if isinstance(args, str):  # some models double-encode the arguments
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            code = args.get("code") if isinstance(args, dict) else None
            if not isinstance(code, str) or not code.strip():
                return ParseFailure('The python tool needs a non-empty string argument "code".')
            codes.append(code)
        return ToolCall("\n".join(codes))

    def format_output(self, output: str, previous_text: str) -> str:
        return output


PROTOCOLS = {"markdown": MarkdownProtocol, "qwen": QwenToolCallProtocol}


def get_protocol(name: str) -> MarkdownProtocol | QwenToolCallProtocol:
    try:
        return PROTOCOLS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool protocol {name!r}; choose one of {', '.join(PROTOCOLS)}"
        ) from None
