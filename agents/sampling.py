"""What a rollout engine is: its data contract (SamplingParams in; Sample out, with exact token
ids and log-probabilities) and its interface (Sampler: token prompts in, samples out, a versioned
LoRA adapter).

    sampler: Sampler = JaxSampler(model, tokenizer)      # or VLLMSampler(url, ...), VLLMPool([...])
    groups = sampler.generate(prompts, SamplingParams(n=8), adapter_version=3)
    sampler.sync_adapter(model, version=4)              # the learner updated the adapter

The three samplers of this package (toolgrpo.agents.sampler.JaxSampler, toolgrpo.agents.vllm_client.VLLMSampler,
toolgrpo.agents.vllm_pool.VLLMPool) satisfy it; Rollouts, GRPOLoop and the rollout pipeline take any
object that does (a structural type: no base class to inherit). This module imports no model
code (no jax), so that a client of a server needs none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    max_new_tokens: int = 256
    """Generation budget per sample."""
    stop: tuple[str, ...] = ()
    """Stop sequences: generation ends once the text contains one (it stays in the output)."""
    seed: int = 0
    """Seed of the sampling randomness."""

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"n ({self.n}) and max_new_tokens ({self.max_new_tokens}) must be >= 1"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                f"{self.temperature}, {self.top_p}, {self.top_k}"
            )


@dataclass(frozen=True)
class Sample:
    """One generation of one prompt, as a sampler returns it."""

    token_ids: list[int]
    """The sampled token ids (the prompt excluded), in order."""
    logprobs: list[float]
    """The log-probability of each sampled token under the model's own distribution
    (temperature 1, no top-k/top-p): the quantity the GRPO learner recomputes."""
    text: str
    """The tokens decoded, special tokens skipped."""
    finish_reason: Literal["stop", "eos", "length"]
    """Why generation ended: a stop sequence, an end-of-sequence token, or the token budget."""
    adapter_version: int = 0
    """The adapter version that sampled it."""
    prompt_len: int = field(default=0, compare=False)
    """The prompt's length in tokens."""


def check_per_prompt(prompts, params: SamplingParams, seeds, max_new_tokens) -> list[int]:
    """Each prompt's generation budget; the per-prompt lists must match the prompts."""
    for name, values in (("seeds", seeds), ("max_new_tokens", max_new_tokens)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{len(values)} {name} for {len(prompts)} prompts")
    if max_new_tokens is None:
        return [params.max_new_tokens] * len(prompts)
    if any(not 1 <= b <= params.max_new_tokens for b in max_new_tokens):
        raise ValueError(
            f"every max_new_tokens must be in 1..{params.max_new_tokens} "
            f"(params.max_new_tokens), got {list(max_new_tokens)}"
        )
    return [int(b) for b in max_new_tokens]


@runtime_checkable
class Sampler(Protocol):
    """A rollout engine with a versioned LoRA adapter."""

    adapter_version: int
    """The version of the adapter it samples with (what `sync_adapter` last loaded)."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter_version: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """`params.n` samples for each prompt (token ids), in prompt order. `adapter_version`
        (default: the one it holds) must be the one it holds; `seeds` and `max_new_tokens`
        give each prompt its own seed and budget (at most params.max_new_tokens)."""
        ...

    def sync_adapter(self, model: Any, version: int) -> object:
        """The learner updated `model`'s adapter: sample with it from now on, tagged `version`."""
        ...

    def recover(self) -> None:
        """After a failed `generate`: bring the engine back with the adapter it holds (a
        restarted or reloaded server), or raise toolgrpo.agents.vllm_client.ServerDown."""
        ...
