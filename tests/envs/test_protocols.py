import json

import pytest

from toolgrpo.envs.protocols import (
    FinalAnswer,
    MarkdownProtocol,
    ParseFailure,
    QwenToolCallProtocol,
    ToolCall,
    cut_traceback,
    get_protocol,
    truncate_middle,
)

md = MarkdownProtocol()
qw = QwenToolCallProtocol()


@pytest.mark.parametrize(
    "text, code",
    [
        ("Let me compute.\n```python\nprint(2**10)\n```\n", "print(2**10)"),
        ("```python\nx = 1\nprint(x)", "x = 1\nprint(x)"),  # the stop string was removed
        ("```python\nprint(3)\n```\n```output", "print(3)"),  # the model opened the output block
        ("```py\na=1\n```\nand\n```python\nprint(a)\n```\n", "a=1\nprint(a)"),
        ("I guess \\boxed{5}, let me check:\n```python\nprint(5)\n```\n", "print(5)"),
    ],
)
def test_markdown_tool_calls(text, code):
    assert md.parse(text) == ToolCall(code)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("```python\nprint(4)\n```\n```output\n4\n```\nSo \\boxed{4}.", "4"),
        ("The answer is \\boxed{17}.", "17"),
        ("No idea.", None),
        ("```text\n\\boxed{9}\n```\nhmm", None),  # a boxed inside a code block is not an answer
    ],
)
def test_markdown_final_answers(text, answer):
    assert md.parse(text) == FinalAnswer(answer)


def test_markdown_empty_block_is_a_parse_failure():
    assert isinstance(md.parse("```python\n   \n```\n"), ParseFailure)


def test_markdown_output_keeps_exact_boundaries():
    assert md.format_output("4", "```python\nprint(4)\n```\n") == "```output\n4\n```\n"
    assert md.format_output("4", "```python\nprint(4)\n```") == "\n```output\n4\n```\n"
    assert md.format_output("4", "```python\nprint(4)\n```\n```output") == "\n4\n```\n"
    assert "\n```\n" in md.stop_sequences


def test_qwen_tool_calls():
    call = {"name": "python", "arguments": {"code": "print(1 + 1)"}}
    text = f"I will compute.\n<tool_call>\n{json.dumps(call)}\n</tool_call>"
    assert qw.parse(text) == ToolCall("print(1 + 1)")
    assert qw.parse(f"<tool_call>\n{json.dumps(call)}") == ToolCall("print(1 + 1)")  # stop removed
    double = {"name": "python", "arguments": json.dumps({"code": "x = 2"})}
    assert qw.parse(f"<tool_call>{json.dumps(double)}</tool_call>") == ToolCall("x = 2")
    assert qw.parse("All done: \\boxed{2}") == FinalAnswer("2")
    assert qw.stop_sequences == ("</tool_call>",) and qw.tools[0]["function"]["name"] == "python"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>{"name": "shell", "arguments": {"cmd": "ls"}}</tool_call>', "Unknown tool"),
        ('<tool_call>{"name": "python", "arguments": {}}</tool_call>', "non-empty"),
        ("<tool_call>[1, 2]</tool_call>", "Unknown tool"),
    ],
)
def test_qwen_malformed_calls_are_parse_failures(text, fragment):
    parsed = qw.parse(text)
    assert isinstance(parsed, ParseFailure) and fragment in parsed.reason


def test_truncate_middle_and_protocol_lookup():
    assert truncate_middle("abc", 10) == "abc"
    out = truncate_middle("H" * 500 + "T" * 500, 200)
    assert len(out) <= 200 and out.startswith("H") and out.endswith("T") and "omitted" in out
    assert isinstance(get_protocol("qwen"), QwenToolCallProtocol)
    with pytest.raises(ValueError, match="markdown"):
        get_protocol("xml")


def test_cut_traceback_by_hand():
    frames = [f'  File "lib.py", line {i}, in f{i}\n    g{i}()' for i in range(10)]
    report = "Traceback (most recent call last):\n" + "\n".join(frames) + "\nValueError: bad"
    text = "printed before\n" + report
    # 21 report lines after the header: keep the last 3, cut 18
    cut = cut_traceback(text, 3)
    assert cut == (
        "printed before\nTraceback (most recent call last):\n[... 18 lines cut ...]\n"
        '  File "lib.py", line 9, in f9\n    g9()\nValueError: bad'
    )
    assert cut_traceback(text, 21) == text  # nothing to cut
    assert cut_traceback(text, 20) != text and "[... 1 lines cut ...]" in cut_traceback(text, 20)
    assert cut_traceback("no error here\n", 1) == "no error here\n"
