"""A Tool from a typed, documented function: its schema is transformers' own, its calls check
their arguments against it."""

import pytest
from transformers.utils import get_json_schema

from toolgrpo.envs.tools import Tool, ToolArgumentError


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def describe(
    name: str, tags: list[str], unit: str = "m", scale: float | None = None, loud: bool = False
) -> str:
    """Describe a thing.

    Args:
        name: Its name.
        tags: Words about it.
        unit: The unit (choices: ["m", "km"])
        scale: A scale, or nothing.
        loud: Shout.
    """
    text = f"{name} [{','.join(tags)}] {unit} {scale}"
    return text.upper() if loud else text


def test_schema_is_transformers_own():
    tool = Tool.from_function(add)
    reference = get_json_schema(add)["function"]
    assert tool.name == "add" and tool.description == "Add two integers."
    assert tool.parameters == reference["parameters"]
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first integer."},
                    "b": {"type": "integer", "description": "The second integer."},
                },
                "required": ["a"],
            },
        },
    }


def test_name_and_description_can_be_replaced():
    tool = Tool.from_function(add, name="plus", description="Sum.")
    assert (tool.schema()["function"]["name"], tool.description) == ("plus", "Sum.")


def test_calls_return_text():
    assert Tool.from_function(add)({"a": 2, "b": 3}) == "5"
    assert Tool.from_function(add)({"a": -2}) == "-2"
    tool = Tool.from_function(describe)
    assert tool({"name": "x", "tags": ["a", "b"], "unit": "km", "scale": None}) == "x [a,b] km None"
    assert tool({"name": "x", "tags": [], "scale": 2, "loud": True}) == "X [] M 2"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({}, "missing required argument(s): name, tags"),
        ({"name": "x", "tags": [], "colour": "red"}, "unknown argument(s): colour"),
        ({"name": 3, "tags": []}, "argument 'name' must be of type string, got int"),
        ({"name": "x", "tags": ["a", 2]}, "argument 'tags'[1] must be of type string, got int"),
        ({"name": "x", "tags": "a"}, "argument 'tags' must be of type array, got str"),
        ({"name": "x", "tags": [], "unit": "mile"}, "argument 'unit' must be one of ['m', 'km']"),
        ({"name": "x", "tags": [], "scale": "big"}, "argument 'scale' must be of type number"),
        ({"name": "x", "tags": [], "loud": 1}, "argument 'loud' must be of type boolean, got int"),
        ({"name": None, "tags": []}, "argument 'name' must be of type string, got null"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ToolArgumentError) as err:
        Tool.from_function(describe)(arguments)
    assert message in str(err.value)


def test_a_boolean_is_not_an_integer():
    with pytest.raises(ToolArgumentError, match="must be of type integer, got bool"):
        Tool.from_function(add)({"a": True})


def test_arguments_must_be_an_object():
    with pytest.raises(ToolArgumentError, match="must be a JSON object, got list"):
        Tool.from_function(add)([1, 2])  # ty: ignore[invalid-argument-type] (what a model may send)


def test_a_function_that_cannot_become_a_tool():
    def untyped(x):
        """No types.

        Args:
            x: something
        """

    def undocumented(x: int) -> int:
        return x

    for fn in (untyped, undocumented):
        with pytest.raises(ValueError, match="cannot become a tool"):
            Tool.from_function(fn)


def test_bad_names_and_schemas():
    with pytest.raises(ValueError, match="a tool name"):
        Tool("two words", "d", {"type": "object"}, fn=str)
    with pytest.raises(ValueError, match="of type 'object'"):
        Tool("ok", "d", {"type": "string"}, fn=str)
