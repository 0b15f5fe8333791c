"""Qwen2.5's <tool_call> format: parsing, running (bad calls are observations, never exceptions),
and the tools and calls as the real Qwen2.5 chat template renders them (tests/qwen_vocab.py)."""

import json

import pytest
from qwen_vocab import qwen25_tokenizer

from toolgrpo.envs.tools import (
    MalformedCall,
    Tool,
    Toolbox,
    ToolCallRequest,
    ToolFailure,
    parse_tool_calls,
    tool_messages,
)


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def shout(text: str) -> str:
    """Repeat a text in capitals.

    Args:
        text: What to repeat.
    """
    if text == "boom":
        raise RuntimeError("the shout broke")
    if text == "hoarse":
        raise ToolFailure("Hoarse: no voice left")
    return text.upper()


TOOLBOX = Toolbox([Tool.from_function(add), Tool.from_function(shout)])


def call(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_one_call():
    turn = parse_tool_calls("Let me add.\n" + call("add", {"a": 2, "b": 40}))
    assert turn.content == "Let me add."
    assert turn.calls == (ToolCallRequest("add", {"a": 2, "b": 40}),)
    (outcome,) = TOOLBOX.run(turn.calls)
    assert (outcome.status, outcome.output, outcome.name) == ("ok", "42", "add")
    assert outcome.ok and outcome.latency_s >= 0


def test_several_calls_in_one_turn_run_in_order():
    text = call("add", {"a": 1, "b": 2}) + "\n" + call("shout", {"text": "hi"}) + "\n"
    text += call("add", {"a": 3, "b": 4})
    turn = parse_tool_calls(text)
    assert turn.content == ""
    assert [o.output for o in TOOLBOX.run(turn.calls)] == ["3", "HI", "7"]


def test_a_call_cut_at_its_stop_string_and_double_encoded_arguments():
    # generation stopped at "</tool_call>", which the text does not include
    turn = parse_tool_calls(
        '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}\n'
    )
    assert turn.calls == (ToolCallRequest("add", {"a": 1, "b": 1}),)


def test_no_call_is_a_final_answer():
    turn = parse_tool_calls("So the answer is \\boxed{42}.")
    assert turn.calls == () and turn.content == "So the answer is \\boxed{42}."
    assert turn.assistant_message() == {"role": "assistant", "content": turn.content}


@pytest.mark.parametrize(
    "body, reason",
    [
        ('{"name": "add", "arguments": {"a": 1,}}', "not valid JSON"),
        ("add(1, 2)", "not valid JSON"),
        ('["add", {"a": 1}]', 'a JSON object with a string "name"'),
        ('{"arguments": {"a": 1}}', 'a JSON object with a string "name"'),
        (
            '{"name": "add", "arguments": [1, 2]}',
            '"arguments" of a tool call must be a JSON object',
        ),
    ],
)
def test_malformed_calls_become_observations(body, reason):
    turn = parse_tool_calls(f"Try:\n<tool_call>\n{body}\n</tool_call>")
    (malformed,) = turn.calls
    assert isinstance(malformed, MalformedCall) and reason in malformed.reason
    (outcome,) = TOOLBOX.run(turn.calls)
    assert outcome.status == "malformed" and not outcome.ok
    assert reason in outcome.output and '{"name": <tool name>' in outcome.output


def test_unknown_tools_bad_arguments_and_failing_tools_become_observations():
    text = "".join(
        [
            call("multiply", {"a": 2, "b": 3}),
            call("add", {"a": 2}),
            call("add", {"a": "2", "b": 3}),
            call("shout", {"text": "boom"}),
            call("shout", {"text": "hoarse"}),
            call("add", {"a": 2, "b": 3}),  # a good call after bad ones still runs
        ]
    )
    outcomes = TOOLBOX.run(parse_tool_calls(text).calls)
    assert [o.status for o in outcomes] == [
        "unknown_tool",
        "bad_arguments",
        "bad_arguments",
        "error",
        "error",
        "ok",
    ]
    assert (
        outcomes[0].output == "Error: there is no tool named 'multiply'; the tools are: add, shout."
    )
    assert "missing required argument(s): b" in outcomes[1].output
    assert "argument 'a' must be of type integer, got str" in outcomes[2].output
    assert outcomes[3].output == "Error: 'shout' failed: RuntimeError: the shout broke"
    assert outcomes[4].output == "Hoarse: no voice left"  # a ToolFailure is shown as it is
    assert outcomes[5].output == "5"
    assert outcomes[0].arguments == {"a": 2, "b": 3}  # what was asked, for the info dict


def test_long_output_keeps_head_and_tail():
    box = Toolbox([Tool.from_function(shout)], max_output_chars=100)
    (outcome,) = box.run(parse_tool_calls(call("shout", {"text": "a" * 150 + "z" * 150})).calls)
    assert len(outcome.output) == 100 and outcome.output.startswith("AAA")
    assert outcome.output.endswith("ZZZ") and "characters omitted" in outcome.output


def test_close_releases_what_tools_hold():
    closed = []
    box = Toolbox(
        [Tool.from_function(add, on_close=lambda: closed.append("add")), TOOLBOX.tools[1]]
    )
    box.close()
    assert closed == ["add"]


def test_toolbox_needs_unique_names():
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        Toolbox([Tool.from_function(add), Tool.from_function(add)])
    with pytest.raises(ValueError, match="at least one tool"):
        Toolbox([])


@pytest.fixture(scope="module")
def tokenizer():
    return qwen25_tokenizer()


def test_tools_reach_the_model_through_the_chat_template(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 40?"}]
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLBOX.schemas(), tokenize=False, add_generation_prompt=True
    )
    assert "# Tools" in text and "<tools>" in text
    for schema in TOOLBOX.schemas():  # one JSON line a tool, as Qwen2.5's template writes it
        assert "\n" + json.dumps(schema, ensure_ascii=False) + "\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    # the format line's <tool_call> is Qwen2.5's own token (151657), not characters
    assert tokenizer.convert_tokens_to_ids("<tool_call>") == 151657 and 151657 in ids


def test_a_turn_and_its_responses_render_as_qwen_writes_them(tokenizer):
    model_text = "I will add, then shout.\n" + call("add", {"a": 2, "b": 40}) + "\n"
    model_text += call("shout", {"text": "done"})
    turn = parse_tool_calls(model_text)
    outcomes = TOOLBOX.run(turn.calls)
    base = [{"role": "user", "content": "Go."}]
    messages = base + [turn.assistant_message(), *tool_messages(outcomes)]
    head = tokenizer.apply_chat_template(
        base, tools=TOOLBOX.schemas(), tokenize=False, add_generation_prompt=True
    )
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLBOX.schemas(), tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(head)
    # the template writes the model's own text back, and both answers in one user turn
    assert text[len(head) :] == (
        model_text + "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response>\n"
        "<tool_response>\nDONE\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    # what the template renders parses back to the same calls
    assistant = text[len(head) :].split("<|im_end|>")[0]
    assert parse_tool_calls(assistant).calls == turn.calls
