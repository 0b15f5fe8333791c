"""The chat template at the boundaries a rollout crosses: the prompt an episode starts from, the
text the template puts around a tool's output, a turn's text as the environment records it, and
where an episode's tokens part from the template's rendering of its conversation.

Token in, token out: a rollout (toolgrpo.agents.rollout) appends the model's own tokens and tokenizes only
what the environment adds, with the template's exact boundaries, so that an episode's tokens
decode to the template's rendering of the environment's conversation.

End of turn. The model ends a turn by sampling an end-of-sequence token (Qwen: <|im_end|>;
finish reason "eos"). The environment records the turn's text without it (`action_text`). What
follows depends on where the template puts a tool's output:
* in a message of its own (the "qwen" protocol, role "tool"): the template closes the assistant
  turn with that same token, so the sampled one stays, and the text appended before the output
  (`tool_turn_text`'s "before") loses its own copy (`tool_message_text`);
* inside the assistant's message (the "markdown" protocol: ```output fences): the template has
  no end of turn there, so the sampled token is taken back before the output is appended
  (toolgrpo.agents.episode.Episode.take_back_end_of_turn).
A turn that ends the episode keeps its end of turn; a last turn cut by its budget never sampled
one (`template_mismatch` allows for that).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def render(tokenizer, messages, tools=None, generation_prompt: bool = False) -> str:
    """The chat template's text for a conversation (and its tool schemas)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=generation_prompt
    )


def prompt_tokens(env, tokenizer, index: int) -> tuple[list[int], dict]:
    """The token ids an episode of problem `index` starts from (the chat template's rendering of
    the environment's first messages, with the generation prompt), and the reset's info."""
    _, info = env.reset(options={"index": int(index)})
    text = render(tokenizer, info["messages"], info.get("tools"), generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False), info


def longest_prompt(env, tokenizer, indices: Iterable[int]) -> tuple[int, str]:
    """(tokens, problem id) of the longest prompt among problems `indices`: a context budget
    must leave room after it."""
    longest = (0, "")
    for index in indices:
        tokens, info = prompt_tokens(env, tokenizer, index)
        longest = max(longest, (len(tokens), str(info.get("problem_id", index))))
    return longest


def tool_turn_text(tokenizer) -> tuple[str, str, str] | None:
    """The text the chat template puts around tool messages that follow an assistant turn:
    (before, between, after). before = end of that turn + start of the first tool message,
    between = what separates two consecutive tool messages' contents (a turn with several
    calls), after = end of the last tool message + the next assistant turn's opening. Read off
    the template itself by rendering a conversation with none, one and two tool messages; None
    when the template does not render a conversation as a prefix of its continuation (then no
    text can be appended exactly)."""
    base = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    head = render(tokenizer, base, generation_prompt=True)
    turn = render(tokenizer, base + [{"role": "assistant", "content": "A"}])
    tool = lambda text: {"role": "tool", "content": text}
    answer = [{"role": "assistant", "content": "A"}]
    one = render(tokenizer, base + answer + [tool("\x00ONE\x00")], generation_prompt=True)
    two = render(
        tokenizer,
        base + answer + [tool("\x00ONE\x00"), tool("\x00TWO\x00")],
        generation_prompt=True,
    )
    if not (turn.startswith(head + "A") and one.startswith(turn) and two.startswith(turn)):
        return None
    before, _, after = one[len(turn) :].partition("\x00ONE\x00")
    between = two[len(turn) :].partition("\x00ONE\x00")[2].partition("\x00TWO\x00")[0]
    if not two.endswith("\x00TWO\x00" + after):
        return None
    return turn[len(head) + 1 :] + before, between, after


def tool_message_text(
    tokenizer, boundary: tuple[str, str, str], outputs: Sequence[str], closed_turn: bool
) -> str:
    """Tool outputs as messages of their own, one a call, in the template's `boundary` text
    (`tool_turn_text`), less the end of turn the model sampled itself (`closed_turn`)."""
    before, between, after = boundary
    eos = tokenizer.eos_token or ""
    if closed_turn and eos and before.startswith(eos):
        before = before[len(eos) :]
    return before + between.join(outputs) + after


def action_text(tokenizer, token_ids: Sequence[int], finish_reason: str) -> str:
    """A turn's text as the environment records it: every sampled token but a final end-of-turn
    one, special tokens included, so that the chat template's rendering of the environment's
    messages is the episode's tokens."""
    ids = list(token_ids)
    if finish_reason == "eos" and ids and ids[-1] in tokenizer.all_special_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def template_mismatch(tokenizer, tokens: Sequence[int], messages, tools=None) -> str | None:
    """Where an episode's `tokens` part from the chat template's rendering of its conversation
    (None: they decode to it, up to its closing end of turn, which a last turn cut by its token
    budget never sampled)."""
    rendered = render(tokenizer, messages, tools)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    closing = ("", "\n", f"{tokenizer.eos_token or ''}\n")  # a turn cut by its budget
    if rendered.startswith(text) and rendered[len(text) :] in closing:
        return None
    at = next(
        (i for i, (a, b) in enumerate(zip(text, rendered)) if a != b),
        min(len(text), len(rendered)),
    )
    return (
        f"from character {at}: tokens {text[at : at + 60]!r}, template {rendered[at : at + 60]!r}"
    )
