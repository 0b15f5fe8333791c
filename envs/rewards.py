"""Rewards: small pure functions of an episode's outcome, combined with weights.

Every component is reported in the environment's `info["reward_components"]`, so that a run can be
understood afterwards (was it wrong, unformatted, or did it never run code?).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolStats:
    """What happened to an episode's tool calls."""

    calls: int = 0
    """Tool calls that were run."""
    ok: int = 0
    """Calls whose code ran without an exception, timeout or crash."""
    errors: int = 0
    """Calls that raised an exception (or crashed)."""
    timeouts: int = 0
    """Calls stopped at the time limit."""
    parse_failures: int = 0
    """Turns whose tool call could not be parsed (malformed JSON, unknown tool, empty code)."""
    crashes: int = 0
    """Calls whose sandbox server died under them (also counted in `errors`)."""


def correctness_reward(correct: bool) -> float:
    """1 for a final answer equal to the reference, else 0."""
    return 1.0 if correct else 0.0


def format_reward(answer: str | None) -> float:
    """1 when the final message holds a \\boxed{...} answer, else 0."""
    return 1.0 if answer is not None else 0.0


def tool_use_reward(stats: ToolStats) -> float:
    """1 when at least one tool call ran without error, else 0."""
    return 1.0 if stats.ok > 0 else 0.0


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward components; the reward is their weighted sum."""

    correctness: float = 1.0
    """Weight of a correct final answer."""
    format: float = 0.1
    """Weight of giving a \\boxed{} answer at all."""
    tool_use: float = 0.1
    """Weight of having run code successfully at least once."""

    def combine(self, components: dict[str, float]) -> float:
        """The reward: the weighted sum of the components of `reward_components`."""
        return (
            self.correctness * components["correctness"]
            + self.format * components["format"]
            + self.tool_use * components["tool_use"]
        )


def reward_components(correct: bool, answer: str | None, stats: ToolStats) -> dict[str, float]:
    return {
        "correctness": correctness_reward(correct),
        "format": format_reward(answer),
        "tool_use": tool_use_reward(stats),
    }
