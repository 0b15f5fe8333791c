"""Several rollout servers behind one sampler.

    sampler = VLLMPool([VLLMSampler(url, tokenizer) for url in urls])
    sampler.sync_adapter(model, version=3)   # written once, loaded on every server, then tagged
    groups = sampler.generate(prompts, params, adapter_version=3)

A call's prompts are cut into one contiguous share a server (so that the episodes of a group,
which are neighbours and share their prompt, mostly meet on one server and its prefix cache),
sent at once, and put back in prompt order. Every request keeps the seed it would have had from
one server. A new adapter is loaded on every server before the pool's version moves to it, so
no sample is tagged with a version some server does not hold; a server that refuses it stops the
sync with its error (the pool keeps the previous version). `recover()` brings back every server
after a failure (VLLMSampler.recover, all at once).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from toolgrpo.agents.sampling import Sample, SamplingParams, check_per_prompt
from toolgrpo.agents.vllm_client import StaleAdapterError, VLLMSampler


class VLLMPool:
    """VLLMSampler's interface over several VLLMSamplers (one a server)."""

    def __init__(self, clients: Sequence[VLLMSampler], adapter_dir: str | None = None):
        if not clients:
            raise ValueError("VLLMPool needs at least one VLLMSampler")
        self.clients = list(clients)
        versions = {c.adapter_version for c in self.clients}
        if len(versions) != 1:
            raise ValueError(f"the servers hold different adapter versions {sorted(versions)}")
        self.adapter_version = versions.pop()
        self.tokenizer = self.clients[0].tokenizer
        self.adapter_dir = adapter_dir or tempfile.mkdtemp(prefix="toolgrpo-adapters-")
        self._pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="vllm-pool")

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clients]

    def sync_adapter(self, model, version: int) -> None:
        """Write the model's LoRA adapter once (PEFT), load it on every server, and only then
        tag samples with `version`."""
        from toolgrpo.learners.lora import save_peft_adapter

        path = os.path.join(self.adapter_dir, f"v{version}")
        save_peft_adapter(model, path)
        for done in [self._pool.submit(c.load_adapter, path, version) for c in self.clients]:
            done.result()  # the first server's error, after every load has ended
        self.adapter_version = version
        for old in os.listdir(self.adapter_dir):  # every server has read it
            if old != f"v{version}":
                shutil.rmtree(os.path.join(self.adapter_dir, old), ignore_errors=True)

    def recover(self) -> None:
        """VLLMSampler.recover on every server at once (a server that answers and holds its
        adapter costs one request); the first ServerDown, after every one has ended."""
        for done in [self._pool.submit(c.recover) for c in self.clients]:
            done.result()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter_version: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """VLLMSampler.generate over the servers: `params.n` samples a prompt, in prompt
        order."""
        version = self.adapter_version if adapter_version is None else adapter_version
        if version != self.adapter_version:
            raise StaleAdapterError(
                f"adapter version {version} was requested but the servers "
                f"hold version {self.adapter_version}: sync_adapter first"
            )
        budgets = check_per_prompt(prompts, params, seeds, max_new_tokens)
        if seeds is None:  # the seeds one server would have derived, by place in the call
            seeds = [hash((params.seed, i)) % 2**31 for i in range(len(prompts))]
        shares = np.array_split(np.arange(len(prompts)), len(self.clients))
        jobs = [
            self._pool.submit(
                client.generate,
                [prompts[i] for i in share],
                params,
                version,
                seeds=[seeds[i] for i in share],
                max_new_tokens=[budgets[i] for i in share],
            )
            for client, share in zip(self.clients, shares)
            if len(share)
        ]
        return [group for job in jobs for group in job.result()]
