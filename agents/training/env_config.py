"""The main job's environment settings: EnvConfig (ToolMath's, and ToolUse-v0's tools and
weighted sources, SourceConfig), each default ToolMathEnv's own; `env_kwargs` gives gym.make's
arguments. Part of the settings tree of toolgrpo.agents.training.config."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

from toolgrpo.envs.rewards import RewardWeights
from toolgrpo.envs.toolmath import ToolMathEnv

_ENV_DEFAULTS = {
    name: p.default for name, p in inspect.signature(ToolMathEnv.__init__).parameters.items()
}
"""ToolMathEnv's own defaults, which EnvConfig's fields take (one place for each)."""


@dataclass(frozen=True)
class SourceConfig:
    """One source of a ToolUse-v0 mixture (toolgrpo.envs.mixture.ProblemSource)."""

    name: str
    problems: str
    """Its training problems: a local JSON/JSONL/CSV/Parquet file or a hub id."""
    eval_problems: str | None = None
    """Its held-out problems (None: the source is not evaluated)."""
    weight: float = 1.0
    """Its share of the training mixture is weight / (sum of the weights)."""
    expected_tools: tuple[str, ...] = ()
    """The tools a solution should call first (tool-selection metrics and reward)."""
    answer_kind: Literal["auto", "integer", "math", "text"] = "auto"
    """How its answers compare: "text" for QA (SQuAD's exact match)."""

    def spec(self, split: str) -> dict | None:
        """ToolUseEnv's description of this source for `split` (None: it has none)."""
        path = self.problems if split == "train" else self.eval_problems
        if path is None:
            return None
        return {
            "name": self.name,
            "problems": path,
            "weight": self.weight,
            "expected_tools": self.expected_tools,
            "answer_kind": self.answer_kind,
        }


@dataclass(frozen=True)
class EnvConfig:
    """Where problems come from and how episodes are scored (toolgrpo.envs.ToolMathEnv, or
    toolgrpo.envs.ToolUseEnv for ToolUse-v0: several tools over a mixture of sources)."""

    env_id: str = "ToolMath-AIME-v0"
    """Training environment (toolgrpo.envs.ENV_IDS); evaluation uses its test split (ToolUse-v0:
    each source's eval_problems)."""
    problems: str | None = None
    """Training problems override: a hub id or a local JSON/JSONL/CSV/Parquet file."""
    eval_problems: str | None = None
    """Evaluation problems override (default: the env's test split, AIME 2025)."""
    protocol: Literal["markdown", "qwen"] = _ENV_DEFAULTS["protocol"]
    """Tool protocol: ```python blocks, or Qwen's <tool_call>."""
    max_turns: int = _ENV_DEFAULTS["max_turns"]
    """Assistant turns per episode."""
    max_chars: int = _ENV_DEFAULTS["max_chars"]
    """Characters of an episode's turns and observations before it is truncated."""
    tool_timeout_s: float = _ENV_DEFAULTS["tool_timeout_s"]
    """Wall-clock limit of one tool call."""
    max_output_chars: int = _ENV_DEFAULTS["max_output_chars"]
    """Tool output shown to the model (head and tail kept)."""
    traceback_lines: int | None = _ENV_DEFAULTS["traceback_lines"]
    """A failed tool call's traceback is cut to its header and its last this many lines, the
    cut shown ("[... N lines cut ...]"); None: whole. 20 leaves an ordinary error in the
    model's own code (its frames and the exception, a few lines) as it was and cuts the frames
    deep inside a library (ToRL keeps only the last line)."""
    system_prompt: str | None = _ENV_DEFAULTS["system_prompt"]
    """Replaces the protocol's instructions (which explain the tool format)."""
    rewards: RewardWeights = field(default_factory=RewardWeights)
    """Weights of the reward components (correctness, format, tool use; ToolUse-v0's
    tool-specific ones)."""
    tools: tuple[str, ...] = ("python",)
    """ToolUse-v0's tools: python, search."""
    corpus: str | None = None
    """ToolUse-v0's search corpus: a JSONL file of id, title, text (indexed once, cached)."""
    retriever_url: str | None = None
    """ToolUse-v0's search through a retrieval server (Search-R1's /retrieve) instead."""
    search_k: int = 3
    """Passages a search returns."""
    sources: tuple[SourceConfig, ...] = ()
    """ToolUse-v0's weighted problem sources, each with its file, weight and expected tools (a
    list in the config file: a flag cannot spell one)."""

    def __post_init__(self):
        if self.traceback_lines is not None and self.traceback_lines < 1:
            raise ValueError(f"traceback_lines must be >= 1 or None, got {self.traceback_lines}")
        if self.max_turns < 1 or self.tool_timeout_s <= 0:
            raise ValueError(
                f"max_turns must be >= 1 and tool_timeout_s > 0, got "
                f"{self.max_turns}, {self.tool_timeout_s}"
            )

    def env_kwargs(self, split: str) -> dict:
        """gym.make's keyword arguments for the train split or an evaluation split."""
        if self.env_id == "ToolUse-v0":
            return self._tooluse_kwargs(split)
        kwargs = {
            "protocol": self.protocol,
            "max_turns": self.max_turns,
            "max_chars": self.max_chars,
            "tool_timeout_s": self.tool_timeout_s,
            "max_output_chars": self.max_output_chars,
            "traceback_lines": self.traceback_lines,
            "system_prompt": self.system_prompt,
            "reward_weights": self.rewards,
        }
        source = self.problems if split == "train" else self.eval_problems
        if split != "train":
            kwargs["split"] = split
        return {**kwargs, **({"problems": source} if source else {})}

    def _tooluse_kwargs(self, split: str) -> dict:
        sources = [spec for s in self.sources if (spec := s.spec(split)) is not None]
        single = self.problems if split == "train" else self.eval_problems
        if single and sources:
            raise ValueError("give ToolUse-v0 env.sources or env.problems, not both")
        if not sources and not single:
            what = "env.sources (with eval_problems)" if split != "train" else "env.sources"
            raise ValueError(f"ToolUse-v0 needs its problems: give {what} or env.problems")
        return {
            "tools": self.tools,
            "problems": sources or single,
            "corpus": self.corpus,
            "retriever_url": self.retriever_url,
            "search_k": self.search_k,
            "max_turns": self.max_turns,
            "max_chars": self.max_chars,
            "tool_timeout_s": self.tool_timeout_s,
            "max_output_chars": self.max_output_chars,
            "system_prompt": self.system_prompt,
            "reward_weights": self.rewards,
        }
