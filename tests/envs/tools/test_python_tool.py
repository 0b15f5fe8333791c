"""The `python` tool in a real sandbox: one persistent session until close(), failures as
observations that count as tool errors, and the tool beside others in one Toolbox."""

import json

import pytest

from toolgrpo.envs.sandbox import PythonSandbox, SandboxConfig
from toolgrpo.envs.tools import Toolbox, parse_tool_calls
from toolgrpo.envs.tools.python import python_tool
from toolgrpo.envs.tools.tool import ToolFailure


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(SandboxConfig(timeout_s=5.0, max_timeout_s=60.0)) as sb:
        yield sb


def test_a_session_persists_until_close(sandbox):
    tool = python_tool(sandbox, timeout_s=5)
    assert tool({"code": "x = 6 * 7"}) == ""
    assert tool({"code": "x"}) == "42"  # a final expression is shown, like a notebook cell
    assert tool({"code": "import sympy as sp\nprint(sp.factorint(x))"}) == "{2: 1, 3: 1, 7: 1}"
    tool.close()  # the episode ends: the next call is a new session
    with pytest.raises(ToolFailure, match="NameError: name 'x' is not defined"):
        tool({"code": "x"})
    tool.close()


def test_two_tools_two_sessions(sandbox):
    a, b = python_tool(sandbox), python_tool(sandbox)
    a({"code": "y = 1"})
    with pytest.raises(ToolFailure, match="NameError"):
        b({"code": "y"})
    a.close()
    b.close()


def test_failures_are_observations(sandbox):
    box = Toolbox([python_tool(sandbox, timeout_s=1, max_output_chars=200)])
    codes = [
        "1/0",
        "while True: pass",
        "print('before')\nraise SystemExit(3)",
        "print('z' * 1000)",
        "z = 5",
        "print(z + 1)",  # a failed call left the state as it was; the good one kept its effect
    ]
    text = "".join(
        "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": c}}) + "</tool_call>"
        for c in codes
    )
    outcomes = box.run(parse_tool_calls(text).calls)
    assert [o.status for o in outcomes] == ["error", "error", "error", "ok", "ok", "ok"]
    assert outcomes[0].output.endswith("ZeroDivisionError: division by zero")
    assert "timed out" in outcomes[1].output
    assert outcomes[2].output.startswith("before")
    assert len(outcomes[3].output) == 200 and "characters omitted" in outcomes[3].output
    assert outcomes[5].output == "6"
    box.close()


def test_bad_arguments_and_schema(sandbox):
    tool = python_tool(sandbox)
    assert tool.name == "python" and tool.parameters["required"] == ["code"]
    assert "persistent session" in tool.description
    box = Toolbox([tool])
    empty, missing = box.run(
        parse_tool_calls(
            '<tool_call>{"name": "python", "arguments": {"code": "  "}}</tool_call>'
            '<tool_call>{"name": "python", "arguments": {"source": "1"}}</tool_call>'
        ).calls
    )
    assert empty.status == missing.status == "bad_arguments"
    assert (
        "the code is empty" in empty.output
        and "missing required argument(s): code" in missing.output
    )
    box.close()
