"""Benchmark JaxSampler against transformers' generate on the same tiny model, in the same run.

    python experiments/bench_sampler.py [--json]

A random tiny Qwen2 is built here, saved in the Hugging Face format and loaded by both sides, so
they run the same weights. Both sample (temperature 1) a batch of prompts for a fixed number of new
tokens (no stop), after one warm-up call each; the two sides then alternate `repeats` times and
the figures are medians (generated tokens per second; the ratio of the median times).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass

import tyro


@dataclass(frozen=True)
class Args:
    """Sampler benchmark settings."""

    prompts: int = 64
    """Prompts in the batch."""
    prompt_len: int = 32
    """Tokens per prompt."""
    new_tokens: int = 64
    """Tokens generated per prompt."""
    repeats: int = 5
    """Timed calls per side, alternating (medians are reported)."""
    seed: int = 0
    """Seed of the model's weights, the prompts and the sampling."""
    json: bool = False
    """Print one JSON object instead of a table."""


def main(args: Args) -> dict:
    import numpy as np
    import torch
    from flax import nnx
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from transformers import Qwen2ForCausalLM as HFQwen2

    from agents.sampler import JaxSampler, SamplingParams
    from learners.qwen2 import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), eos_token="w1")
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    n_tokens = args.prompts * args.new_tokens

    sampler = JaxSampler(model, tokenizer, eos_token_ids=[], bucket=32)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)
    out = sampler.generate(prompts, params)  # compile
    assert all(len(s[0].token_ids) == args.new_tokens for s in out)

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = HFQwen2.from_pretrained(d).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

    def timed(run):
        t0 = time.perf_counter()
        result = run()
        return time.perf_counter() - t0, result

    jax_times, hf_times = [], []
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # warm-up
        for _ in range(args.repeats):  # alternating: both sides see the same machine load
            jax_times.append(timed(lambda: sampler.generate(prompts, params))[0])
            seconds, gen = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids),
                                                     **kwargs))
            hf_times.append(seconds)
            assert gen.shape[1] == args.prompt_len + args.new_tokens
    jax_s, hf_s = float(np.median(jax_times)), float(np.median(hf_times))
    report = {"jax_tokens_per_s": n_tokens / jax_s, "hf_tokens_per_s": n_tokens / hf_s,
              "speed_ratio": hf_s / jax_s, "prompts": args.prompts,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "jax_threads": sampler.threads,
              "torch_threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"JaxSampler: {report['jax_tokens_per_s']:.0f} tokens/s; transformers generate: "
              f"{report['hf_tokens_per_s']:.0f} tokens/s; ratio {report['speed_ratio']:.2f}x "
              f"({args.prompts} prompts x {args.new_tokens} new tokens)")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
