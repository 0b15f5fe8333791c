"""JaxSampler (an toolgrpo.agents.sampling.Sampler): token prompts in, token ids + log-probabilities +
text + finish reason out.

`JaxSampler` runs the learner's own Qwen2 (+ LoRA) in-process with the KV cache: no server, no
copy of the parameters (it reads the model's current state at every call). Shapes are bucketed
(batch to a power of two, at least 8; prompt and generation lengths to multiples of `bucket`), so
that a run compiles a handful of programs, not one per call.

Decoding runs `chunk` steps per compiled call (a lax.scan); stop sequences and end-of-sequence
are checked on the host between chunks, and the tokens a row drew after its end are dropped.

Log-probabilities are those of the model's own distribution (temperature 1, no top-k/top-p), the
quantity the GRPO learner recomputes; tokens are drawn from the tempered, truncated distribution.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolgrpo.agents.sampling import Sample, SamplingParams, check_per_prompt


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _inverse_cdf(probs_bv, key, block: int = 32, rows: tuple[int, int] | None = None):
    """One token a row drawn from `probs_bv` by inverse CDF with a single uniform a row (a Gumbel
    draw needs one a vocabulary entry, and those random bits dominated a CPU decode step): pick
    the block of `block` entries the uniform falls in, then the entry within it. `rows` =
    (offset, total): these rows are rows offset.. of a batch of `total`, and take that batch's
    uniforms, so that a batch split into shards draws what it would draw whole."""
    b, v = probs_bv.shape
    pad = -v % block
    p = jnp.pad(probs_bv, ((0, 0), (0, pad))).reshape(b, -1, block)
    block_cdf = jnp.cumsum(p.sum(-1), axis=-1)  # [B, V/block]
    offset, total = rows if rows is not None else (0, b)
    u = jax.lax.dynamic_slice_in_dim(jax.random.uniform(key, (total, 1)), offset, b)
    u = u * block_cdf[:, -1:]
    blk = jnp.minimum(jnp.sum(block_cdf <= u, axis=-1), block_cdf.shape[1] - 1)
    below = jnp.where(blk > 0, jnp.take_along_axis(block_cdf, (blk - 1)[:, None], 1)[:, 0], 0.0)
    inner = jnp.cumsum(jnp.take_along_axis(p, blk[:, None, None], 1)[:, 0], axis=-1)  # [B, block]
    j = jnp.minimum(jnp.sum(inner <= (u[:, 0] - below)[:, None], axis=-1), block - 1)
    return jnp.minimum(blk * block + j, v - 1).astype(jnp.int32)


def _choose(
    logits_bv,
    key,
    temperature: float,
    top_k: int,
    top_p: float,
    rows: tuple[int, int] | None = None,
):
    """Draw one token a row; returns (tokens [B], raw log-probabilities of them [B]). `rows`: see
    `_inverse_cdf`."""
    raw = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    if temperature == 0:
        tokens = jnp.argmax(raw, axis=-1)
    else:
        scores = raw / temperature
        if top_k:
            kth = jnp.sort(scores, axis=-1)[:, -top_k][:, None]
            scores = jnp.where(scores < kth, -jnp.inf, scores)
        if top_p < 1.0:
            order = jnp.argsort(-scores, axis=-1)
            sorted_p = jax.nn.softmax(jnp.take_along_axis(scores, order, -1), axis=-1)
            keep_sorted = jnp.cumsum(sorted_p, axis=-1) - sorted_p < top_p
            keep = (
                jnp.zeros_like(keep_sorted)
                .at[jnp.arange(scores.shape[0])[:, None], order]
                .set(keep_sorted)
            )
            scores = jnp.where(keep, scores, -jnp.inf)
        tokens = _inverse_cdf(jax.nn.softmax(scores, axis=-1), key, rows=rows)
        tokens = jnp.where(
            jnp.isfinite(jnp.take_along_axis(scores, tokens[:, None], -1)[:, 0]),
            tokens,
            jnp.argmax(scores, axis=-1),
        )
    return tokens.astype(jnp.int32), jnp.take_along_axis(raw, tokens[:, None], -1)[:, 0]


def _prefill(graphdef, state, ids, mask, max_len):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.prefill(ids, mask, max_len, return_hidden=True)
    last = jnp.take_along_axis(hidden, (mask.sum(-1) - 1)[:, None, None], axis=1)
    return model.logits(last)[:, 0], cache  # the vocabulary projection of the last token only


def _steps(graphdef, state, logits, cache, key, offset, steps, total, temperature, top_k, top_p):
    """`steps` decode steps in one program: fewer dispatches and host round trips. The rows are
    rows `offset`.. of a batch of `total` (a shard)."""
    model = nnx.merge(graphdef, state)

    def body(carry, key):
        logits, cache = carry
        tokens, logprobs = _choose(logits, key, temperature, top_k, top_p, (offset, total))
        logits, cache = model.decode(tokens, cache)
        return (logits, cache), (tokens, logprobs)

    (logits, cache), (tokens, logprobs) = jax.lax.scan(
        body, (logits, cache), jax.random.split(key, steps)
    )
    return tokens, logprobs, logits, cache  # tokens, logprobs: [steps, B]


class JaxSampler:
    """Samples from an NNX Qwen2ForCausalLM held by reference (the learner's live model).

    On the CPU backend a batch is split into `threads` shards decoded concurrently (one XLA
    program keeps about 1.3 of 2 cores busy on small models); each shard draws the random numbers
    its rows would draw in the whole batch, so the samples do not depend on the split."""

    def __init__(
        self,
        model,
        tokenizer,
        eos_token_ids: Iterable[int] | None = None,
        bucket: int = 64,
        adapter_version: int = 0,
        chunk: int = 16,
        threads: int | None = None,
    ):
        self.model, self.tokenizer, self.bucket, self.chunk = model, tokenizer, bucket, chunk
        eos = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]
        self.eos = {int(e) for e in eos if e is not None}
        self.adapter_version = adapter_version
        if threads is None:
            threads = min(4, os.cpu_count() or 1) if jax.default_backend() == "cpu" else 1
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._graph = None

    def sync_adapter(self, model, version: int) -> None:
        """A learner update happened: `model` is the live model this sampler already reads, so
        only the version that samples record changes."""
        if model is not self.model:
            raise ValueError("JaxSampler samples the model it was built with; pass that model")
        self.adapter_version = version

    def recover(self) -> None:
        """Nothing to bring back: the sampler runs in this process (toolgrpo.agents.sampling.Sampler)."""

    def _programs(self, graphdef):
        """The jitted prefill and decode programs of the model's graph. The graph is bound by
        closure, not passed as a static argument: hashing it on every call cost more than a
        decode step of a small model."""
        if self._graph is None or self._graph[0] != graphdef:
            self._graph = (
                graphdef,
                jax.jit(functools.partial(_prefill, graphdef), static_argnames="max_len"),
                jax.jit(
                    functools.partial(_steps, graphdef),
                    static_argnames=("steps", "total", "temperature", "top_k", "top_p"),
                ),
            )
        return self._graph[1:]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        adapter_version: int | None = None,
        *,
        seeds: Sequence[int] | None = None,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """`params.n` samples for each prompt (token ids), in prompt order. `max_new_tokens`
        gives each prompt its own budget (at most params.max_new_tokens). `seeds` (one a prompt,
        what a server that seeds each request needs) are accepted and not used: one call draws
        every row from one stream seeded by params.seed, so its rows are independent draws."""
        version = self.adapter_version if adapter_version is None else adapter_version
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        budgets = check_per_prompt(prompts, params, seeds, max_new_tokens)
        rows = [list(p) for p in prompts for _ in range(params.n)]
        batch = max(8, 1 << (len(rows) - 1).bit_length())  # powers of two: few programs
        t = _round_up(max(map(len, rows)), self.bucket)
        max_len = t + _round_up(params.max_new_tokens, self.bucket)
        limit = self.model.config.max_position_embeddings
        if t + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's {limit} positions"
            )
        ids = np.zeros((batch, t), np.int32)
        mask = np.zeros((batch, t), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        mask[len(rows) :, 0] = 1  # filler rows: one token, discarded
        shards = 1
        while shards * 2 <= self.threads and batch // (shards * 2) >= 8:
            shards *= 2
        size = batch // shards
        jobs = [
            (o, ids[o : o + size], mask[o : o + size], min(size, len(rows) - o))
            for o in range(0, batch, size)
            if o < len(rows)
        ]
        graphdef, state = nnx.split(self.model)
        run = functools.partial(
            self._decode_shard, *self._programs(graphdef), state, batch, max_len, params
        )
        if len(jobs) == 1:
            results = [run(*jobs[0])]
        else:
            with ThreadPoolExecutor(len(jobs)) as pool:  # XLA runs them in parallel
                results = list(pool.map(lambda job: run(*job), jobs))
        samples = []
        for i, (tokens, logprobs, finish) in enumerate(row for shard in results for row in shard):
            budget = budgets[i // params.n]
            if len(tokens) > budget:
                tokens, logprobs, finish = tokens[:budget], logprobs[:budget], "length"
            samples.append(
                Sample(
                    tokens,
                    logprobs,
                    self.tokenizer.decode(tokens, skip_special_tokens=True),
                    finish or "length",
                    version,
                    len(rows[i]),
                )
            )
        return [samples[k * params.n : (k + 1) * params.n] for k in range(len(prompts))]

    def _decode_shard(
        self,
        prefill,
        decode,
        state,
        total: int,
        max_len: int,
        params: SamplingParams,
        offset: int,
        ids,
        mask,
        live: int,
    ):
        """Prefill and decode rows offset.. of the batch; returns (tokens, logprobs, finish) for
        the first `live` of them (the rest are filler)."""
        logits, cache = prefill(state, jnp.asarray(ids), jnp.asarray(mask), max_len=max_len)
        key = jax.random.key(params.seed)
        out_tokens: list[list[int]] = [[] for _ in range(live)]
        out_logprobs: list[list[float]] = [[] for _ in range(live)]
        finish: list[str | None] = [None] * live
        done = 0
        while done < params.max_new_tokens and any(f is None for f in finish):
            steps = min(self.chunk, params.max_new_tokens - done)
            key, sub = jax.random.split(key)
            tokens, logprobs, logits, cache = decode(
                state,
                logits,
                cache,
                sub,
                offset,
                steps=steps,
                total=total,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
            )
            tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
            done += steps
            for i in range(live):
                for j in range(steps):  # tokens after a row's end are computed, then dropped
                    if finish[i] is not None:
                        break
                    out_tokens[i].append(int(tokens[j, i]))
                    out_logprobs[i].append(float(logprobs[j, i]))
                    if int(tokens[j, i]) in self.eos:
                        finish[i] = "eos"
                    elif params.stop:
                        tail = self.tokenizer.decode(out_tokens[i][-32:])
                        if any(stop in tail for stop in params.stop):
                            finish[i] = "stop"
        return list(zip(out_tokens, out_logprobs, finish))
