"""Heterogeneous data: problems drawn from several sources with weights, each carrying its source.

    mixture = ProblemMixture([
        ProblemSource("aime", load_problems("aime"), weight=1.0, expected_tools=("python",)),
        ProblemSource("qa", load_problems("qa.jsonl", answer_kind="text"), weight=2.0,
                      expected_tools=("search",)),
    ], seed=0)
    mixture[i]            # a Problem with .source "aime" or "qa" (about 1 in 3 and 2 in 3)

Problem `i` is a pure function of (seed, i): its source is drawn with the sources' weights, then
one of that source's problems uniformly, so that any index can be read in any order (the
training loop's ProblemOrder permutes the indices). A problem's id is prefixed with its source
("qa/..."), and it carries the source's name and expected tools (`Problem.source`,
`Problem.expected_tools`), which the tool-use environment reports and rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from toolgrpo.envs.answers import ANSWER_KINDS
from toolgrpo.envs.problems import Problem


@dataclass(frozen=True)
class ProblemSource:
    """One kind of problem in a mixture."""

    name: str
    problems: Sequence[Problem]
    weight: float = 1.0
    """Its share of the mixture is weight / (sum of the weights)."""
    expected_tools: tuple[str, ...] = ()
    """The tools a solution should call first (tool-selection metrics and shaping); empty: any."""
    answer_kind: str | None = None
    """Overrides every problem's answer_kind ("text" for a QA file); None: as loaded."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"a source's name must be non-empty without '/', got {self.name!r}")
        if not self.weight > 0 or self.weight == float("inf"):
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        if not len(self.problems):
            raise ValueError(f"source {self.name!r} has no problems")
        if self.answer_kind is not None and self.answer_kind not in ANSWER_KINDS:
            raise ValueError(
                f"source {self.name!r}: answer_kind must be one of {', '.join(ANSWER_KINDS)}, "
                f"got {self.answer_kind!r}"
            )
        object.__setattr__(self, "expected_tools", tuple(self.expected_tools))


class ProblemMixture(Sequence[Problem]):
    """Problems of several sources with weights (module docstring). `size` is the number of
    indices (default: the sources' problems together, at most 2**31)."""

    def __init__(self, sources: Sequence[ProblemSource], seed: int = 0, size: int | None = None):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) < len(names):
            raise ValueError(f"two sources have the same name: {names}")
        self.sources, self.seed = tuple(sources), seed
        weights = np.array([s.weight for s in sources], float)
        self.shares = weights / weights.sum()
        self.size = size or min(sum(len(s.problems) for s in sources), 2**31)
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {size}")

    def __len__(self) -> int:
        return self.size

    def source_of(self, index: int) -> ProblemSource:
        return self.sources[self._draw(index)[0]]

    def _draw(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is outside 0..{self.size - 1}")
        rng = np.random.default_rng((self.seed, index))
        s = int(rng.choice(len(self.sources), p=self.shares))
        return s, int(rng.integers(len(self.sources[s].problems)))

    # integers only: a mixture is read one problem at a time
    def __getitem__(self, index: int) -> Problem:  # ty: ignore[incompatible-method-override]
        s, j = self._draw(int(index))
        source = self.sources[s]
        problem = source.problems[j]
        return dataclasses.replace(
            problem,
            id=f"{source.name}/{problem.id}",
            answer_kind=source.answer_kind or problem.answer_kind,
            source=source.name,
            expected_tools=source.expected_tools or problem.expected_tools,
        )

    def counts(self, indices: Sequence[int]) -> Mapping[str, int]:
        """How many of `indices` each source holds."""
        out = dict.fromkeys((s.name for s in self.sources), 0)
        for i in indices:
            out[self.source_of(int(i)).name] += 1
        return out
