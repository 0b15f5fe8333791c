"""The batch the GRPO learner trains on, and per-episode stats.

The contract between rollout and learner is one typed batch, toolgrpo.learners.batch.TrainBatch (README,
"How the parts fit"): one right-padded row per episode, whose tokens are exactly those the
sampler produced with the environment's observations between them (the model's text is never
re-tokenized); loss_mask is 1 exactly on the sampled tokens (0 in every row that keeps no
loss: toolgrpo.agents.shaping.keeps_loss), and sampler_logprobs holds the sampler's log-probability of
each (0 off the mask); one reward a row; the rows of one problem share a group id. A
RolloutBatch is a TrainBatch with what the rollout knows besides.

batch = rollouts.collect([3, 8], seed=0)     # toolgrpo.agents.rollout.Rollouts
state, metrics = grpo_step(state, batch, cfg)  # a RolloutBatch is a toolgrpo.learners.batch.TrainBatch
batch.metrics(), batch.distinct_completions(), batch.episodes[0].header()
batch.select(batch.informative_rows()), RolloutBatch.concat([a, b], pad_id=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from toolgrpo.learners.batch import TrainBatch


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
    """None, "turns" (the environment's turn or length limit), "context" (max_total_tokens) or
    "crashed" (the sandbox server died under a tool call: the row carries no loss)."""
    reward: float
    reward_components: dict[str, float]
    sampled_tokens: int
    total_tokens: int
    answer: str | None = None
    """The episode's final answer as the environment parsed it (None: none given)."""
    gold_answer: str | None = None
    """The problem's reference answer."""
    void_turns: int = 0
    """Turns that yielded neither a complete tool call nor a final answer (toolgrpo.agents.shaping)."""
    source: str = ""
    """The problem's source (a mixture's: toolgrpo.envs.mixture; "" for a single source)."""
    expected_tools: tuple[str, ...] = ()
    """The tools the problem's source expects the first call to use (empty: any)."""
    calls: tuple[tuple[str | None, str], ...] = ()
    """(tool, status) of every call in order: status "ok", "error" or a bad call's
    ("malformed", "unknown_tool", "bad_arguments")."""

    def header(self) -> str:
        """One line for a transcript: problem, verdict, reward and its components, answers."""
        verdict = (
            "correct"
            if self.correct
            else (
                f"truncated ({self.truncated})"
                if self.truncated
                else "wrong"
                if self.answer_found
                else "no answer"
            )
        )
        parts = ", ".join(f"{k} {v:g}" for k, v in self.reward_components.items())
        return (
            f"problem {self.problem_id} (group {self.group}): {verdict}; reward "
            f"{self.reward:g} ({parts}); answer {self.answer!r}, gold {self.gold_answer!r}; "
            f"turns {self.turns}, tool calls {self.tool_calls} ({self.tool_errors} errors)"
        )


@dataclass(frozen=True)
class RolloutBatch(TrainBatch):
    """A TrainBatch (tokens, loss_mask, rewards, group_ids, sampler_logprobs: see there) with
    what the rollout knows besides, one row per episode:

    adapter_version  int32 [B]  the oldest adapter that sampled the episode
    lengths          int32 [B]  real (unpadded) tokens of each row
    episodes         B EpisodeStats
    transcripts      B strings

    Its sampler_logprobs are never None: a rollout records them.
    """

    sampler_logprobs: np.ndarray = field(kw_only=True)
    adapter_version: np.ndarray
    lengths: np.ndarray
    episodes: list[EpisodeStats]
    transcripts: list[str]

    def metrics(self) -> dict[str, float]:
        """`episode_metrics`, and the shares of groups whose episodes all solved their problem
        ("solved_groups") or all failed it ("failed_groups"): the two kinds of group that
        usually carry no reward variance."""
        groups = [self.group_ids == g for g in np.unique(self.group_ids)]
        correct = np.array([e.correct for e in self.episodes], bool)
        outcomes = {
            "solved_groups": float(np.mean([correct[rows].all() for rows in groups])),
            "failed_groups": float(np.mean([not correct[rows].any() for rows in groups])),
        }
        return episode_metrics(self.episodes) | (outcomes if groups else {})

    def distinct_completions(self) -> float:
        """Mean over groups of (distinct token sequences in the group) / (group size): 1 when
        every episode of a group is its own sample, 1/G when a group is G copies of one (the
        sampler ignores the seed, or the policy has collapsed)."""
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids):
            groups.setdefault(int(g), []).append(i)
        if not groups:
            return 0.0
        return float(
            np.mean(
                [
                    len({self.tokens[i, : self.lengths[i]].tobytes() for i in rows}) / len(rows)
                    for rows in groups.values()
                ]
            )
        )

    def informative_rows(self) -> np.ndarray:
        """bool [B]: rows whose group's rewards differ (a zero-variance group has zero
        advantage, so no gradient)."""
        keep = np.zeros(len(self.rewards), bool)
        for g in np.unique(self.group_ids):
            rows = self.group_ids == g
            keep[rows] = np.ptp(self.rewards[rows]) > 1e-9
        return keep

    def select(self, keep: np.ndarray) -> RolloutBatch:
        """The rows where `keep` (bool [B]) is true."""
        rows = np.flatnonzero(keep)
        return RolloutBatch(
            tokens=self.tokens[rows],
            loss_mask=self.loss_mask[rows],
            sampler_logprobs=self.sampler_logprobs[rows],
            rewards=self.rewards[rows],
            group_ids=self.group_ids[rows],
            adapter_version=self.adapter_version[rows],
            lengths=self.lengths[rows],
            episodes=[self.episodes[i] for i in rows],
            transcripts=[self.transcripts[i] for i in rows],
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """One batch from several: group ids made distinct, rows padded to the longest."""
        t = max(b.tokens.shape[1] for b in batches)
        pad = lambda x, v: np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=v)
        offsets = np.cumsum([0] + [int(b.group_ids.max()) + 1 for b in batches[:-1]])
        return RolloutBatch(
            tokens=np.concatenate([pad(b.tokens, pad_id) for b in batches]),
            loss_mask=np.concatenate([pad(b.loss_mask, 0) for b in batches]),
            sampler_logprobs=np.concatenate([pad(b.sampler_logprobs, 0) for b in batches]),
            rewards=np.concatenate([b.rewards for b in batches]),
            group_ids=np.concatenate([b.group_ids + o for b, o in zip(batches, offsets)]),
            adapter_version=np.concatenate([b.adapter_version for b in batches]),
            lengths=np.concatenate([b.lengths for b in batches]),
            episodes=[e for b in batches for e in b.episodes],
            transcripts=[s for b in batches for s in b.transcripts],
        )


def episode_metrics(eps: Sequence[EpisodeStats]) -> dict[str, float]:
    """Episode means: reward and each of its components ("reward/<name>", unweighted; 0 for an
    episode without it), accuracy, tool use and health, turns, lengths; tool-selection accuracy
    (the first call named a tool the problem's source expects) over the episodes whose source
    names one; per tool ("tool/<name>/..."): calls per episode and the share that failed; per
    source ("source/<name>/...", where the episodes come from a mixture) the same as overall."""
    metrics = _means(eps)
    tools = sorted({name for e in eps for name, _ in e.calls if name is not None})
    for tool in tools:
        calls = [status for e in eps for name, status in e.calls if name == tool]
        metrics[f"tool/{tool}/calls"] = len(calls) / len(eps)
        metrics[f"tool/{tool}/error_rate"] = sum(s != "ok" for s in calls) / len(calls)
    sources = sorted({e.source for e in eps if e.source})
    for source in sources:
        of = _means([e for e in eps if e.source == source])
        for key in ("accuracy", "reward", "tool_use_rate", "tool_error_rate", "tool_calls"):
            metrics[f"source/{source}/{key}"] = of[key]
        if "selection_accuracy" in of:
            metrics[f"source/{source}/selection_accuracy"] = of["selection_accuracy"]
    return metrics


def _means(eps: Sequence[EpisodeStats]) -> dict[str, float]:
    mean = lambda xs: float(np.mean(xs)) if eps else 0.0
    calls = sum(e.tool_calls for e in eps)
    names = sorted({name for e in eps for name in e.reward_components})
    components = {
        f"reward/{name}": mean([e.reward_components.get(name, 0.0) for e in eps]) for name in names
    }
    return (
        components
        | {
            "reward": mean([e.reward for e in eps]),
            "accuracy": mean([e.correct for e in eps]),
            "answer_rate": mean([e.answer_found for e in eps]),
            "tool_use_rate": mean([e.tool_calls > 0 for e in eps]),
            "tool_calls": mean([e.tool_calls for e in eps]),
            "tool_error_rate": (
                sum(e.tool_errors + e.tool_timeouts for e in eps) / calls if calls else 0.0
            ),
            "parse_failures": mean([e.parse_failures for e in eps]),
            "turns": mean([e.turns for e in eps]),
            "truncated_turns": mean([e.truncated == "turns" for e in eps]),
            "truncated_context": mean([e.truncated == "context" for e in eps]),
            "crashed": mean([e.truncated == "crashed" for e in eps]),
            "void_episodes": mean([e.void_turns > 0 for e in eps]),
            "sampled_tokens": mean([e.sampled_tokens for e in eps]),
            "total_tokens": mean([e.total_tokens for e in eps]),
        }
        | selection_accuracy(eps)
    )


def selection_accuracy(eps: Sequence[EpisodeStats]) -> dict[str, float]:
    """{"selection_accuracy": the share of the episodes whose source names expected tools that
    called one of them first} ({} when none names any)."""
    judged = [e for e in eps if e.expected_tools]
    if not judged:
        return {}
    first = lambda e: e.calls[0][0] if e.calls else None
    return {"selection_accuracy": float(np.mean([first(e) in e.expected_tools for e in judged]))}
