"""The offline demo's demonstrations (experiments/arith_grpo.py): the assistant's side of a
ToolMath-Arith-v0 episode, written as the rollout would split it, as token rows for supervised
steps, and the teacher-forced probabilities that say how far the warm start has got.

    tool, guess = demonstrations(make_env, problems, indices, rng)
    rows = token_rows(tokenizer, tool)
    demonstration_probabilities(model, rows)    # {"code": ..., "demonstration": ..., "tool": ...}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from tiny_demo import teacher_forced_logprobs


def solution_code(question: str, kind: str) -> str:
    """The python a tool-using demonstration writes for an Arith problem."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if kind == "product":
        return f"print({n[0]} * {n[1]})"
    if kind == "modpow":
        return f"print(pow({n[0]}, {n[1]}, {n[2]}))"
    if kind == "factorial_digits":
        return f"import math\nprint(sum(map(int, str(math.factorial({n[0]})))))"
    raise ValueError(f"no demonstration for arith kind {kind!r}")


def demonstration(problem, use_tool: bool, rng: random.Random) -> list[tuple[str, bool]]:
    """The assistant's side of an episode as (text, learn) segments, split exactly where the
    rollout splits the model's text from the tool's output (formatted by the protocol). A
    guess teaches when to answer directly and the answer's format, not its digits: learning
    random digits where a tool demonstration copies the factors unlearns the copy."""
    from toolgrpo.envs.protocols import MarkdownProtocol

    answer = problem.answer
    if not use_tool:  # a guess with as many digits as the answer: almost always wrong
        guess = str(
            rng.randrange(10 ** (len(answer) - 1) if len(answer) > 1 else 0, 10 ** len(answer))
        )
        return [("\\boxed{", True), (guess, False), ("}<|im_end|>", True)]
    call = f"```python\n{solution_code(problem.question, problem.meta['kind'])}\n```\n"
    return [
        (call, True),
        (MarkdownProtocol().format_output(answer, call), False),
        (f"\\boxed{{{answer}}}<|im_end|>", True),
    ]


def demonstrations(make_env, problems, indices, rng: random.Random):
    """(messages, segments) of a tool demonstration and of a guess for each problem index."""
    env = make_env()
    tool, guess = [], []
    for i in indices:
        _, info = env.reset(options={"index": i})
        tool.append((info["messages"], demonstration(problems[i], True, rng)))
        guess.append((info["messages"], demonstration(problems[i], False, rng)))
    env.close()
    return tool, guess


@dataclass(frozen=True)
class TokenRows:
    """Demonstrations as right-padded token rows: tokens [N, T] int32, loss_mask [N, T] (1 on the
    model's own text), start [N] (the first token the model writes)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    start: np.ndarray

    def sample(self, rng, batch: int) -> dict:
        idx = rng.integers(0, len(self.tokens), batch)
        return {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx]}


def token_rows(tokenizer, demos, multiple: int = 32) -> TokenRows:
    """Token rows of (messages, segments) demonstrations, encoded segment by segment as the
    rollout encodes an episode (the prompt by the chat template)."""
    rows = []
    for messages, segments in demos:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        start, mask = len(ids), [0] * len(ids)
        for text, learn in segments:
            seg = tokenizer.encode(text, add_special_tokens=False)
            ids, mask = ids + seg, mask + [int(learn)] * len(seg)
        rows.append((ids, mask, start))
    t = -(-max(len(r[0]) for r in rows) // multiple) * multiple
    tokens = np.full((len(rows), t), tokenizer.pad_token_id, np.int32)
    loss_mask = np.zeros((len(rows), t), np.int32)
    for i, (ids, mask, _) in enumerate(rows):
        tokens[i, : len(ids)], loss_mask[i, : len(ids)] = ids, mask
    return TokenRows(tokens, loss_mask, np.array([r[2] for r in rows], np.int32))


def demonstration_probabilities(model, rows: TokenRows) -> dict:
    """Mean probabilities, teacher-forced, that the model writes each demonstration's own text
    after its first token (which picks tool or guess): "code", its first segment (for a tool
    demonstration the code), "answer", the rest (a tool demonstration's answer, copied from the
    tool's output), and "demonstration", all of it; "tool", the first token's."""
    logprobs = np.asarray(teacher_forced_logprobs()(model, rows.tokens))
    mask = rows.loss_mask.astype(bool)
    first = np.zeros_like(mask)
    first[np.arange(len(mask)), rows.start] = True
    # the first segment: the run of the model's own tokens that starts at `start`
    segment = np.cumprod(np.where(np.arange(mask.shape[1]) >= rows.start[:, None], mask, 1), 1)
    segment = segment.astype(bool) & (np.arange(mask.shape[1]) > rows.start[:, None])
    prob = lambda m: float(np.mean(np.exp((logprobs * m).sum(1))))
    return {
        "code": prob(segment),
        "answer": prob(mask & ~first & ~segment),
        "demonstration": prob(mask & ~first),
        "tool": prob(first),
    }
