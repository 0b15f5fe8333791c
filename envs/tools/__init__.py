"""Tools a model calls in Qwen2.5's function-calling format, and the built-in ones.

    from toolgrpo.envs.tools import Tool, Toolbox, parse_tool_calls, tool_messages

    def lookup_price(item: str) -> str:
        '''The price of an item in the shop.

        Args:
            item: The item's name.
        '''
        return PRICES.get(item, "unknown item")

    tools = Toolbox([Tool.from_function(lookup_price), search_tool(BM25Index.from_corpus(path))])
    prompt = tokenizer.apply_chat_template(messages, tools=tools.schemas(), ...)
    turn = parse_tool_calls(model_text)
    messages += [turn.assistant_message(), *tool_messages(tools.run(turn.calls))]

`tool` (Tool, ToolArgumentError): one tool; `calls`: the parser, the runner (Toolbox) and the
messages that answer calls; `search`: the search tool over a BM25 index or a retrieval server;
`python`: the sandbox as a tool, one persistent session until close().
Nothing here imports a model; bm25s is imported only when an index is built or loaded.
"""

from toolgrpo.envs.tools.calls import (
    MalformedCall,
    ParsedTurn,
    Toolbox,
    ToolCallRequest,
    ToolOutcome,
    parse_tool_calls,
    tool_messages,
)
from toolgrpo.envs.tools.python import python_tool
from toolgrpo.envs.tools.search import BM25Index, HTTPRetriever, Passage, load_corpus, search_tool
from toolgrpo.envs.tools.tool import Tool, ToolArgumentError, ToolFailure

__all__ = [
    "BM25Index",
    "HTTPRetriever",
    "MalformedCall",
    "ParsedTurn",
    "Passage",
    "Tool",
    "ToolArgumentError",
    "ToolFailure",
    "ToolCallRequest",
    "ToolOutcome",
    "Toolbox",
    "load_corpus",
    "parse_tool_calls",
    "python_tool",
    "search_tool",
    "tool_messages",
]
