"""The tool-selection demo's data (experiments/select_grpo.py): generated entities with secret
codes, their search corpus, three kinds of problem, and demonstrations whose first tool is chosen
at random, so that the warm start teaches how to use each tool but not which one a problem needs.

    world = World.generate(3000, seed=0)
    world.write_corpus("corpus.jsonl")
    sources = world.sources(seed=1, entities="train")   # ProblemSources: product, lookup, sum
    demos = random_tool_demonstrations(mixture, prompts, search, boundary, rng)

The kinds, and the only way to solve each:
- product: "What is 417 * 862?": python (a guess is almost never right);
- lookup: "What is the code of Vidune?": search (the code is in the corpus only);
- sum: "What is the sum of the codes of Vidune and Bakori?": search for both, then python.
A source names the tool a solution calls first (python, search, search): tool-selection accuracy.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SYLLABLES = tuple(
    [
        "ba",
        "ko",
        "ri",
        "mu",
        "te",
        "lo",
        "sa",
        "vi",
        "ne",
        "du",
        "fa",
        "zo",
        "pe",
        "gi",
        "ha",
        "ju",
        "ma",
        "si",
        "no",
        "ku",
    ]
)
"""Names are three of these (8,000 distinct words), each entity a word of its own."""

KINDS = ("product", "lookup", "sum")
FIRST_TOOL = {"product": "python", "lookup": "search", "sum": "search"}
"""The tool a solution of each kind calls first."""


@dataclass(frozen=True)
class World:
    """Entities (a one-word name and a 3-digit code each); the first half's problems train,
    the second half's are held out (every passage is in the corpus)."""

    names: tuple[str, ...]
    codes: tuple[int, ...]

    @classmethod
    def generate(cls, n: int, seed: int) -> World:
        if not 4 <= n <= len(SYLLABLES) ** 3:
            raise ValueError(f"a world has 4 to {len(SYLLABLES) ** 3} entities, got {n}")
        rng = random.Random(seed)
        words = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
        names = tuple(w.capitalize() for w in rng.sample(words, n))
        return cls(names, tuple(rng.randrange(100, 1000) for _ in range(n)))

    def passages(self) -> list[dict]:
        return [
            {"id": f"e{i}", "title": name, "text": f"Its code is {code}."}
            for i, (name, code) in enumerate(zip(self.names, self.codes))
        ]

    def write_corpus(self, path: str) -> None:
        with open(path, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in self.passages())

    def entities(self, split: str) -> range:
        half = len(self.names) // 2
        if split not in ("train", "heldout"):
            raise ValueError(f"split is train or heldout, got {split!r}")
        return range(half) if split == "train" else range(half, len(self.names))

    def problems(self, kind: str, split: str, seed: int) -> KindProblems:
        return KindProblems(self, kind, self.entities(split), seed)

    def sources(self, split: str, seed: int, weights: Sequence[float] = (1, 1, 1)):
        """The three kinds as ProblemSources of a mixture, each naming its first tool."""
        from toolgrpo.envs.mixture import ProblemSource

        return [
            ProblemSource(
                kind,
                self.problems(kind, split, seed + i),
                weight=w,
                expected_tools=(FIRST_TOOL[kind],),
            )
            for i, (kind, w) in enumerate(zip(KINDS, weights))
        ]


class KindProblems(Sequence):
    """Problems of one kind, problem i a pure function of (seed, i), over some entities."""

    SIZE = 1_000_000

    def __init__(self, world: World, kind: str, entities: range, seed: int):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
        self.world, self.kind, self.entities, self.seed = world, kind, entities, seed

    def __len__(self) -> int:
        return self.SIZE

    def __getitem__(self, index):
        from toolgrpo.envs.problems import Problem

        if not 0 <= index < self.SIZE:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}/{self.kind}/{index}")
        names, codes = self.world.names, self.world.codes
        meta: dict = {"kind": self.kind}
        if self.kind == "product":
            a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
            question, answer = f"What is {a} * {b}?", a * b
            meta["factors"] = (a, b)
        elif self.kind == "lookup":
            e = rng.choice(self.entities)
            question, answer = f"What is the code of {names[e]}?", codes[e]
            meta["entities"], meta["names"] = (e,), (names[e],)
        else:
            e, f = rng.sample(self.entities, 2)
            question = f"What is the sum of the codes of {names[e]} and {names[f]}?"
            answer, meta["entities"] = codes[e] + codes[f], (e, f)
            meta["names"] = (names[e], names[f])
        return Problem(f"{self.kind}-{index}", question, str(answer), "integer", meta)


def call_text(tool: str, argument: str) -> str:
    """A turn that calls `tool` once, in Qwen2.5's format, as the model writes it."""
    key = "code" if tool == "python" else "query"
    call = json.dumps({"name": tool, "arguments": {key: argument}})
    return f"<tool_call>\n{call}\n</tool_call><|im_end|>"


def demonstration(problem, first_tool: str, search, boundary, rng: random.Random):
    """The assistant's side of an episode whose first call uses `first_tool`, as (text, part)
    segments split where the rollout splits the model's text from the environment's: part 0 is
    the environment's (not learned), 1 the model's, 2 the token span that names the first tool
    (learned; the selection, measured on its own), 3 the model's but not learned (a guess). With the right first tool the
    demonstration solves the problem; with the other it reads a useless output and guesses a
    number of the answer's length (its digits not learned: learning random digits unlearns the
    copies). `search(query)` is the search tool's output, `boundary` the text around a tool's
    output (toolgrpo.agents.chat.tool_turn_text)."""
    before, _, after = boundary
    before = before.removeprefix("<|im_end|>")  # the model closes its turn itself
    kind, m = problem.meta["kind"], problem.meta
    names = m.get("names", ())

    def turn(tool: str, argument: str, output: str) -> list[tuple[str, int]]:
        return [(call_text(tool, argument), 1), (before + output + after, 0)]

    right = first_tool == FIRST_TOOL[kind]
    if kind == "product":
        a, b = m["factors"]
        segments = (
            turn("python", f"print({a} * {b})", f"{a * b}")
            if right
            else turn("search", f"{a} * {b}", search(f"{a} * {b}"))
        )
    elif kind == "lookup":
        segments = (
            turn("search", names[0], search(names[0]))
            if right
            else turn("python", f"print('{names[0]}')", names[0])
        )
    elif right:
        codes = [int(c) for c in _codes_in(search(" ".join(names)), names)]
        segments = turn("search", " ".join(names), search(" ".join(names))) + turn(
            "python", f"print({codes[0]} + {codes[1]})", str(sum(codes))
        )
    else:
        segments = turn("python", f"print('{names[0]}', '{names[1]}')", " ".join(names))
    if right:
        segments.append((f"\\boxed{{{problem.answer}}}<|im_end|>", 1))
    else:
        digits = len(problem.answer)
        guess = str(rng.randrange(10 ** (digits - 1), 10**digits))
        segments += [("\\boxed{", 1), (guess, 3), ("}<|im_end|>", 1)]
    return _split_choice(segments)


def random_tool_demonstrations(problems, prompts, search, boundary, rng: random.Random):
    """(messages, segments, kind) for problem i of `problems` with prompt `prompts[i]` (its
    chat messages), the first tool a coin toss whatever the problem needs."""
    out = []
    for i, prompt in enumerate(prompts):
        problem = problems[i]
        tool = rng.choice(("python", "search"))
        out.append(
            (prompt, demonstration(problem, tool, search, boundary, rng), problem.meta["kind"])
        )
    return out


def _codes_in(passages: str, names: Sequence[str]) -> list[str]:
    """The codes of `names` in the order their passages come in `passages`."""
    found = []
    for line in passages.splitlines():
        for name in names:
            if f"(Title: {name}) Its code is " in line:
                found.append(line.rsplit(" ", 1)[1].rstrip("."))
    if len(found) != len(names):
        raise ValueError(f"the search did not return the passages of {names}: {passages!r}")
    return found


def _split_choice(segments: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The first call's tool name as a segment of its own (part 2)."""
    text, _ = segments[0]
    head, _, rest = text.partition('{"name": "')
    name, _, tail = rest.partition('"')
    return [(head + '{"name": "', 1), (name, 2), ('"' + tail, 1), *segments[1:]]


@dataclass(frozen=True)
class Rows:
    """Demonstrations as right-padded token rows: tokens [N, T] int32, part [N, T] int8 (the
    segments' parts, `demonstration`; the prompt is part 0); parts 1 and 2 are learned."""

    tokens: np.ndarray
    part: np.ndarray
    kinds: tuple[str, ...]
    multiple: int = 32

    def sample(self, rng, batch: int) -> dict:
        """`batch` rows of one kind (drawn with the kinds' shares), cut to the longest one's
        length rounded up to `multiple`: a kind's rows are about as long as each other, and a
        sum's twice a product's."""
        kinds = np.array(self.kinds)
        kind = kinds[rng.integers(0, len(kinds))]
        idx = rng.choice(np.flatnonzero(kinds == kind), batch)
        used = int((self.part[idx] > 0).any(0).nonzero()[0].max()) + 1
        t = min(-(-used // self.multiple) * self.multiple, self.tokens.shape[1])
        mask = np.isin(self.part[idx, :t], (1, 2)).astype(np.int32)
        return {"tokens": self.tokens[idx, :t], "loss_mask": mask}


def encode(tokenizer, demos, multiple: int = 32) -> Rows:
    """Token rows of (messages, segments, kind) demonstrations, each segment encoded on its own
    as the rollout encodes an episode (the prompt by the chat template)."""
    rows = []
    for messages, segments, _ in demos:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        part = [0] * len(ids)
        for text, p in segments:
            seg = tokenizer.encode(text, add_special_tokens=False)
            ids, part = ids + seg, part + [p] * len(seg)
        rows.append((ids, part))
    t = -(-max(len(r[0]) for r in rows) // multiple) * multiple
    tokens = np.full((len(rows), t), tokenizer.pad_token_id, np.int32)
    parts = np.zeros((len(rows), t), np.int8)
    for i, (ids, part) in enumerate(rows):
        tokens[i, : len(ids)], parts[i, : len(ids)] = ids, part
    return Rows(tokens, parts, tuple(d[2] for d in demos), multiple)
