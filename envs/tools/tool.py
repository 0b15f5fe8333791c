"""A tool: a name, a description, a JSON schema of its arguments and a call that returns text.

    def add(a: int, b: int) -> int:
        '''Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        '''
        return a + b

    tool = Tool.from_function(add)          # the schema from transformers.utils.get_json_schema
    tool.schema()                           # what the chat template's `tools=` takes
    tool({"a": 2, "b": 3})                  # "5"; bad arguments raise ToolArgumentError

A call checks its arguments against the schema first (required names, no unknown names, JSON
types, enums), so the function is only ever called with what it declared. The checker covers the
schemas get_json_schema writes (types, nullable, enum, array items, nested objects); a tool that
wants more checks them in its function and raises ToolArgumentError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


class ToolArgumentError(ValueError):
    """A call's arguments do not fit the tool's schema (or its function rejected them); the
    message is written for the model, which sees it."""


class ToolFailure(Exception):
    """The tool ran and failed (code that raised, a call that timed out); the message is the
    whole observation, shown to the model as it is."""


def _check(value: Any, schema: Mapping[str, Any], where: str) -> None:
    """Raise ToolArgumentError where `value` does not fit `schema` (get_json_schema's subset)."""
    if value is None and schema.get("nullable"):
        return
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        # bool is an int to Python, never to JSON: true is not an integer or a number
        fits = any(
            isinstance(value, _JSON_TYPES.get(t, object))
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in names
        )
        if not fits:
            got = "null" if value is None else type(value).__name__
            raise ToolArgumentError(f"{where} must be of type {' or '.join(names)}, got {got}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolArgumentError(f"{where} must be one of {schema['enum']}, got {value!r}")
    if isinstance(value, (list, tuple)) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict) and "properties" in schema:
        check_arguments(value, schema, prefix=f"{where}.")


def check_arguments(
    arguments: Mapping[str, Any], parameters: Mapping[str, Any], prefix: str = ""
) -> None:
    """Raise ToolArgumentError unless `arguments` fit the object schema `parameters`."""
    properties = parameters.get("properties", {})
    problems = []
    unknown = [name for name in arguments if name not in properties]
    if unknown and parameters.get("additionalProperties") is not True:
        problems.append(
            f"unknown argument(s): {', '.join(prefix + u for u in unknown)} (the arguments "
            f"are: {', '.join(prefix + p for p in properties) or 'none'})"
        )
    missing = [name for name in parameters.get("required", ()) if name not in arguments]
    if missing:
        problems.append(f"missing required argument(s): {', '.join(prefix + m for m in missing)}")
    if problems:
        raise ToolArgumentError("; ".join(problems))
    for name, value in arguments.items():
        if name in properties:
            _check(value, properties[name], f"argument {prefix}{name!r}")


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `name`, `description` and `parameters` (a JSON schema of
    type object) are what the model is shown; `fn` is called with the checked arguments as
    keyword arguments and its result becomes text (`str()`, unless it is already a string)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Any] = field(repr=False, compare=False)
    on_close: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    """What close() runs: a tool with state (a sandbox session) releases it there."""

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "a").replace("-", "a").isalnum():
            raise ValueError(f"a tool name is letters, digits, '_' and '-', got {self.name!r}")
        if self.parameters.get("type") != "object":
            raise ValueError(
                f"tool {self.name!r}: parameters must be a JSON schema of type 'object', got "
                f"{dict(self.parameters)!r}"
            )

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        name: str | None = None,
        description: str | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> Tool:
        """A tool from a typed Python function whose docstring describes it and each argument
        (Google style, "Args:"), through transformers' own schema builder. `name` and
        `description` replace the function's name and the docstring's first paragraph. The first
        call imports transformers (and torch where it is installed: transformers maps its tensor
        type), a second or a few, once a process."""
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(fn)["function"]
        except Exception as exc:  # transformers raises several types, all about the function
            raise ValueError(
                f"{getattr(fn, '__name__', fn)!r} cannot become a tool: {exc} (a tool needs "
                "type hints on every argument and a docstring with an 'Args:' section)"
            ) from exc
        return cls(
            name=name or schema["name"],
            description=description or schema.get("description", ""),
            parameters=schema["parameters"],
            fn=fn,
            on_close=on_close,
        )

    def schema(self) -> dict[str, Any]:
        """The tool in the OpenAI/Hugging Face form that chat templates take (`tools=[...]`)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        """Check `arguments` (ToolArgumentError when they do not fit), call, return text.
        Whatever else the function raises propagates: `toolgrpo.envs.tools.calls.run_calls` turns it
        into an observation."""
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(
                f"the arguments must be a JSON object, got {type(arguments).__name__}"
            )
        check_arguments(arguments, self.parameters)
        result = self.fn(**arguments)
        return result if isinstance(result, str) else str(result)

    def close(self) -> None:
        """Release what the tool holds (a session, a connection); a function holds nothing."""
        if self.on_close is not None:
            self.on_close()
