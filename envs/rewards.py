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
    """Weights of the reward components; the reward is their weighted sum. ToolMath's episodes
    have correctness, format and tool_use; ToolUse's also have the tool-specific components,
    which are reported always and weighted 0 until set."""

    correctness: float = 1.0
    """Weight of a correct final answer."""
    format: float = 0.1
    """Weight of giving a \\boxed{} answer at all."""
    tool_use: float = 0.1
    """Weight of having run a tool successfully at least once."""
    tool_ran: float = 0.0
    """Weight of each "<tool>_ran" component (a call to that tool ran without error)."""
    retrieval_hit: float = 0.0
    """Weight of a search output that held the gold answer."""
    bad_call: float = 0.0
    """Weight of each malformed call, unknown tool or bad arguments ("bad_calls"; below 0
    punishes them)."""
    call_cost: float = 0.0
    """Weight of each call ("calls"; below 0: a budget against call spam)."""
    selection: float = 0.0
    """Weight of a first call to a tool the problem's source expects (where it names one)."""

    def combine(self, components: dict[str, float]) -> float:
        """The reward: the weighted sum of `components` (one without a weight adds 0)."""
        weight = {
            "correctness": self.correctness,
            "format": self.format,
            "tool_use": self.tool_use,
            "retrieval_hit": self.retrieval_hit,
            "bad_calls": self.bad_call,
            "calls": self.call_cost,
            "selection": self.selection,
        }
        return sum(
            (self.tool_ran if k.endswith("_ran") else weight.get(k, 0.0)) * v
            for k, v in components.items()
        )


def reward_components(correct: bool, answer: str | None, stats: ToolStats) -> dict[str, float]:
    return {
        "correctness": correctness_reward(correct),
        "format": format_reward(answer),
        "tool_use": tool_use_reward(stats),
    }


# -- the tool-use environment's rewards (toolgrpo.envs.tooluse) ------------------------------------


@dataclass(frozen=True)
class CallRecord:
    """One tool call of an episode, as the environment ran it."""

    turn: int
    name: str | None
    """The tool it named (None: a call that was not valid JSON)."""
    arguments: dict | None
    status: str
    """"ok", "malformed", "unknown_tool", "bad_arguments" or "error" (toolgrpo.envs.tools.ToolOutcome)."""
    output: str
    latency_s: float = 0.0


BAD_CALL_STATUSES = ("malformed", "unknown_tool", "bad_arguments")


def tool_ran_rewards(calls: list[CallRecord], tools: list[str]) -> dict[str, float]:
    """ "<tool>_ran" for each of `tools`: 1 when at least one call to it ran without error."""
    return {f"{t}_ran": float(any(c.name == t and c.status == "ok" for c in calls)) for t in tools}


def retrieval_hit_reward(calls: list[CallRecord], gold: str, search_tools: list[str]) -> float:
    """1 when an output of a search tool that ran holds the gold answer (both normalised as
    SQuAD does), else 0."""
    from toolgrpo.envs.answers import normalize_text

    want = normalize_text(gold)
    return float(
        bool(want)
        and any(
            c.name in search_tools and c.status == "ok" and want in normalize_text(c.output)
            for c in calls
        )
    )


def bad_calls_reward(calls: list[CallRecord]) -> float:
    """The number of calls that were not valid calls (malformed, an unknown tool, bad
    arguments): weight it below 0 to punish them."""
    return float(sum(c.status in BAD_CALL_STATUSES for c in calls))


def selection_reward(calls: list[CallRecord], expected: tuple[str, ...]) -> float:
    """1 when the episode's first call names one of the `expected` tools, else 0 (no call: 0)."""
    return float(bool(calls) and calls[0].name in expected)
