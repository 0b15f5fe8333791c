"""One episode as toolgrpo.agents.rollout plays it: its tokens so far (prompt, turns, observations), a
loss-mask bit and a log-probability for each, what it has counted, and, once it has ended, its
EpisodeStats.

Tokens are only ever appended, with one exception, `take_back_end_of_turn`: what the model saw
stays exactly what it sees next.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolgrpo.agents.batch import EpisodeStats, RolloutBatch
from toolgrpo.agents.chat import prompt_tokens


@dataclass
class Episode:
    """The state of one episode of problem `index`, the `member`-th of GRPO group `group`."""

    group: int
    index: int
    env: Any
    """The environment it plays in (pooled by toolgrpo.agents.rollout.Rollouts)."""
    tokens: list[int]
    """Its tokens so far; at first the prompt."""
    prompt_len: int
    observation_role: str
    """Where the chat template puts a tool's output: "tool" (a message of its own, after the
    assistant's turn) or "assistant" (inside the assistant's message)."""
    member: int = 0
    """The episode's place in its group (0..group_size-1): part of its sampling seed."""
    tools: Any = None
    """The tool schemas the prompt was rendered with (reset's info["tools"])."""
    mask: list[int] = field(default_factory=list)
    """1 on the tokens the model sampled, 0 on the others (prompt, observations)."""
    logprobs: list[float] = field(default_factory=list)
    """The sampler's log-probability of each sampled token, 0 on the others."""
    versions: list[int] = field(default_factory=list)
    """The adapter version of each turn's sample."""
    turns: int = 0
    void_turns: int = 0
    """Turns that yielded neither a complete tool call nor a final answer (toolgrpo.agents.shaping)."""
    cut: bool = False
    """Whether the last turn's generation was cut by its token budget."""
    closed_turn: bool = False
    """Whether the model ended its last turn itself, with an end-of-sequence token (finish
    reason "eos")."""
    last_info: dict = field(default_factory=dict)
    """The info of the environment's last reset or step."""
    stats: EpisodeStats | None = None

    def __post_init__(self):
        self.mask = [0] * len(self.tokens)
        self.logprobs = [0.0] * len(self.tokens)

    @classmethod
    def start(cls, env, tokenizer, group: int, index: int, member: int) -> Episode:
        """An episode of problem `index` in `env`, reset: its prompt is the chat template's
        rendering of the environment's first messages (toolgrpo.agents.chat.prompt_tokens)."""
        tokens, info = prompt_tokens(env, tokenizer, index)
        role = "tool" if info.get("protocol") == "qwen" else "assistant"
        return cls(
            group=group,
            index=int(index),
            env=env,
            tokens=tokens,
            prompt_len=len(tokens),
            observation_role=role,
            member=member,
            tools=info.get("tools"),
            last_info=info,
        )

    def room(self, max_total_tokens: int) -> int:
        """How many more tokens the context budget holds (0 or less: none)."""
        return max_total_tokens - len(self.tokens)

    def append(
        self, tokens: Sequence[int], sampled: bool, logprobs: Sequence[float] | None = None
    ) -> None:
        """Append tokens: sampled ones (loss mask 1) come with their log-probabilities."""
        if not sampled:
            logprobs = [0.0] * len(tokens)
        elif logprobs is None:
            raise ValueError("sampled tokens need their log-probabilities")
        self.tokens += list(tokens)
        self.mask += [int(sampled)] * len(tokens)
        self.logprobs += list(logprobs)

    def take_back_end_of_turn(self, special_ids: Collection[int]) -> None:
        """Remove the last token if the model sampled it and it is a special token: the end of
        turn the model closed its turn with, where the chat template has none (a tool's output
        that continues the assistant's message: toolgrpo.agents.rollout, "End of turn")."""
        if self.mask[-1] and self.tokens[-1] in special_ids:
            del self.tokens[-1], self.mask[-1], self.logprobs[-1]

    def seed(self, step_seed: int) -> int:
        """The sampling seed of this episode's next turn: distinct for every (step seed, group,
        problem, member, turn), so the G episodes of a group are independent draws wherever
        the sampler seeds each request (vLLM) and reproducible wherever it runs."""
        return hash((step_seed, self.group, self.index, self.member, self.turns)) % 2**31

    def finish(self, reward: float, truncated: str | None, overlong: float | None) -> None:
        """End the episode: its stats from the environment's last info, with `reward` (plus the
        `overlong` penalty, a reward component, unless None). An episode truncated by the
        context ("context") scores 0 in every component the environment gave: it never
        answered."""
        info, tool = self.last_info, self.last_info.get("tool", {})
        components = dict(
            (info.get("reward_components") if truncated != "context" else None)
            or {k: 0.0 for k in ("correctness", "format", "tool_use")}
        )
        if overlong is not None:
            components["overlong"] = overlong
            reward += overlong
        self.stats = EpisodeStats(
            problem_id=str(info.get("problem_id", self.index)),
            group=self.group,
            turns=self.turns,
            tool_calls=int(tool.get("calls", 0)),
            tool_errors=int(tool.get("errors", 0)),
            tool_timeouts=int(tool.get("timeouts", 0)),
            parse_failures=int(tool.get("parse_failures", 0)),
            answer_found=info.get("answer") is not None and truncated != "context",
            correct=bool(info.get("correct", False)) and truncated != "context",
            truncated=truncated,
            reward=reward,
            reward_components=components,
            sampled_tokens=int(sum(self.mask)),
            total_tokens=len(self.tokens),
            answer=None if info.get("answer") is None else str(info["answer"]),
            gold_answer=None if info.get("gold_answer") is None else str(info["gold_answer"]),
            void_turns=self.void_turns,
            source=str(info.get("source", "")),
            expected_tools=tuple(info.get("expected_tools", ())),
            calls=call_log(info),
        )

    @property
    def ended(self) -> EpisodeStats:
        """The stats of an episode that has ended (`finish` set them)."""
        assert self.stats is not None, "the episode has not ended"
        return self.stats


def batch_of(episodes: Sequence[Episode], keep, pad_to: int, tokenizer) -> RolloutBatch:
    """The RolloutBatch of ended episodes, a row each, padded to a multiple of `pad_to`; the rows
    where `keep` (bool, one an episode) is false carry no loss (mask and log-probabilities 0)."""
    t = -(-max(len(ep.tokens) for ep in episodes) // pad_to) * pad_to
    b = len(episodes)
    tokens = np.full((b, t), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((b, t), np.int32)
    logprobs = np.zeros((b, t), np.float32)
    for i, ep in enumerate(episodes):
        k = len(ep.tokens)
        tokens[i, :k], mask[i, :k], logprobs[i, :k] = ep.tokens, ep.mask, ep.logprobs
        if not keep[i]:
            mask[i], logprobs[i] = 0, 0.0
    return RolloutBatch(
        tokens=tokens,
        loss_mask=mask,
        sampler_logprobs=logprobs,
        rewards=np.asarray([ep.ended.reward for ep in episodes], np.float32),
        group_ids=np.asarray([ep.group for ep in episodes], np.int32),
        adapter_version=np.asarray([min(ep.versions, default=0) for ep in episodes], np.int32),
        lengths=np.asarray([len(ep.tokens) for ep in episodes], np.int32),
        episodes=[ep.ended for ep in episodes],
        transcripts=[
            ep.ended.header() + "\n\n" + tokenizer.decode(ep.tokens, skip_special_tokens=False)
            for ep in episodes
        ],
    )


def call_log(info: dict) -> tuple[tuple[str | None, str], ...]:
    """(tool, status) of each call of an episode from its environment's last info: ToolUseEnv's
    info["calls"]; a ToolMath environment's one tool ("python"), from its counts."""
    if "calls" in info:
        return tuple((c.get("name"), str(c.get("status", "ok"))) for c in info["calls"])
    tool = info.get("tool", {})
    ok = int(tool.get("ok", 0))
    failed = int(tool.get("calls", 0)) - ok
    return (("python", "ok"),) * ok + (("python", "error"),) * max(failed, 0)
