"""The batch the GRPO learner trains on (DESIGN.md's rollout contract) and per-episode stats.

    batch = rollouts.collect([3, 8], seed=0)     # agents.rollout.Rollouts
    state, metrics = grpo_step(state, batch.arrays(), cfg)
    batch.metrics(), batch.distinct_completions(), batch.episodes[0].header()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class EpisodeStats:
    """What happened in one episode."""

    problem_id: str
    group: int
    turns: int
    tool_calls: int
    tool_errors: int
    tool_timeouts: int
    parse_failures: int
    answer_found: bool
    correct: bool
    truncated: str | None
    """None, "turns" (the environment's turn or length limit) or "context" (max_total_tokens)."""
    reward: float
    reward_components: dict[str, float]
    sampled_tokens: int
    total_tokens: int
    answer: str | None = None
    """The episode's final answer as the environment parsed it (None: none given)."""
    gold_answer: str | None = None
    """The problem's reference answer."""

    def header(self) -> str:
        """One line for a transcript: problem, verdict, reward and its components, answers."""
        verdict = "correct" if self.correct else (
            f"truncated ({self.truncated})" if self.truncated else
            "wrong" if self.answer_found else "no answer")
        parts = ", ".join(f"{k} {v:g}" for k, v in self.reward_components.items())
        return (f"problem {self.problem_id} (group {self.group}): {verdict}; reward "
                f"{self.reward:g} ({parts}); answer {self.answer!r}, gold {self.gold_answer!r}; "
                f"turns {self.turns}, tool calls {self.tool_calls} ({self.tool_errors} errors)")


@dataclass
class RolloutBatch:
    """The rollout contract of DESIGN.md: one row per episode, right-padded."""

    tokens: np.ndarray            # int32 [B, T]
    loss_mask: np.ndarray         # int32 [B, T]: 1 exactly on sampled tokens
    sampler_logprobs: np.ndarray  # float32 [B, T]: 0 where loss_mask is 0
    rewards: np.ndarray           # float32 [B]
    group_ids: np.ndarray         # int32 [B]
    adapter_version: np.ndarray   # int32 [B]: the oldest adapter that sampled the episode
    lengths: np.ndarray           # int32 [B]: real tokens of each row
    episodes: list[EpisodeStats]
    transcripts: list[str]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays `learners.train.grpo_step` takes."""
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "rewards": self.rewards,
                "group_ids": self.group_ids, "sampler_logprobs": self.sampler_logprobs}

    def metrics(self) -> dict[str, float]:
        """See `episode_metrics`."""
        return episode_metrics(self.episodes)

    def distinct_completions(self) -> float:
        """Mean over groups of (distinct token sequences in the group) / (group size): 1 when
        every episode of a group is its own sample, 1/G when a group is G copies of one (the
        sampler ignores the seed, or the policy has collapsed)."""
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids):
            groups.setdefault(int(g), []).append(i)
        if not groups:
            return 0.0
        return float(np.mean([
            len({self.tokens[i, :self.lengths[i]].tobytes() for i in rows}) / len(rows)
            for rows in groups.values()]))


def episode_metrics(eps: Sequence[EpisodeStats]) -> dict[str, float]:
    """Episode means: reward, accuracy, tool use and health, turns, lengths."""
    mean = lambda xs: float(np.mean(xs)) if eps else 0.0  # noqa: E731
    calls = sum(e.tool_calls for e in eps)
    return {"reward": mean([e.reward for e in eps]),
            "accuracy": mean([e.correct for e in eps]),
            "answer_rate": mean([e.answer_found for e in eps]),
            "tool_use_rate": mean([e.tool_calls > 0 for e in eps]),
            "tool_calls": mean([e.tool_calls for e in eps]),
            "tool_error_rate": (sum(e.tool_errors + e.tool_timeouts for e in eps) / calls
                                if calls else 0.0),
            "parse_failures": mean([e.parse_failures for e in eps]),
            "turns": mean([e.turns for e in eps]),
            "truncated_turns": mean([e.truncated == "turns" for e in eps]),
            "truncated_context": mean([e.truncated == "context" for e in eps]),
            "sampled_tokens": mean([e.sampled_tokens for e in eps]),
            "total_tokens": mean([e.total_tokens for e in eps])}
