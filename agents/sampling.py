"""The interface every rollout engine implements: token prompts in, samples out, a versioned
LoRA adapter.

    sampler: Sampler = JaxSampler(model, tokenizer)      # or VLLMSampler(url, ...), VLLMPool([...])
    groups = sampler.generate(prompts, SamplingParams(n=8), adapter_version=3)
    sampler.sync_adapter(model, version=4)              # the learner updated the adapter

The three samplers of this package (agents.sampler.JaxSampler, agents.vllm_client.VLLMSampler,
agents.vllm_pool.VLLMPool) satisfy it; Rollouts, GRPOLoop and the rollout pipeline take any
object that does (a structural type: no base class to inherit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from agents.sampler import Sample, SamplingParams


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
        restarted or reloaded server), or raise agents.vllm_client.ServerDown."""
        ...
