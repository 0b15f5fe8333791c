"""Benchmark JaxSampler against transformers' generate and a real vLLM server on the same tiny
model, in the same run.

    python experiments/bench_sampler.py [--json]
    python experiments/bench_sampler.py --vllm-python .venv-vllm/bin/python   # with vLLM

A random tiny Qwen2 (head_dim 64, which vLLM's CPU attention takes) is built here, saved in the
Hugging Face format and loaded by every side, so they run the same weights. Each samples
(temperature 1) a batch of prompts for a fixed number of new tokens (no stop), after one warm-up
call; the sides then alternate `repeats` times and the figures are medians (generated tokens per
second; ratios of the median times). vLLM gets one request a prompt, all at once, as VLLMSampler
sends them; its row runs when `--vllm-python` (or $TOOLGRPO_VLLM_PYTHON, or .venv-vllm) holds vLLM.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    vllm_python: str | None = None
    """Python of a vLLM install (default: $TOOLGRPO_VLLM_PYTHON, else .venv-vllm if present)."""
    no_vllm: bool = False
    """Leave the vLLM row out."""


def vllm_python(args: Args) -> str | None:
    if args.no_vllm:
        return None
    candidate = (
        args.vllm_python
        or os.environ.get("TOOLGRPO_VLLM_PYTHON")
        or os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            ".venv-vllm",
            "bin",
            "python",
        )
    )
    return candidate if os.path.exists(candidate) else None


def vllm_generate(url: str, prompts, new_tokens: int, seed: int, pool) -> list[list[int]]:
    """One completions request a prompt, all in flight at once; every sample new_tokens long."""
    import urllib.request

    def one(i):
        body = {
            "model": "bench",
            "prompt": prompts[i],
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "ignore_eos": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "seed": seed + i,
            "return_token_ids": True,
        }
        req = urllib.request.Request(
            url + "/v1/completions",
            json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as reply:
            return json.loads(reply.read())["choices"][0]["token_ids"]

    return list(pool.map(one, range(len(prompts))))


def main(args: Args) -> dict:
    import numpy as np
    import torch
    from flax import nnx
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from transformers import Qwen2ForCausalLM as HFQwen2

    from toolgrpo.agents.sampler import JaxSampler, SamplingParams
    from toolgrpo.learners.params import save_pretrained
    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), eos_token="w1"
    )
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(2, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
    n_tokens = args.prompts * args.new_tokens

    sampler = JaxSampler(model, tokenizer, eos_token_ids=[], bucket=32)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)
    out = sampler.generate(prompts, params)  # compile
    assert all(len(s[0].token_ids) == args.new_tokens for s in out)

    kwargs = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    ids = torch.tensor(prompts)
    with contextlib.ExitStack() as stack, torch.no_grad():
        d = stack.enter_context(tempfile.TemporaryDirectory())
        save_pretrained(model, d)
        tokenizer.save_pretrained(d)
        hf = HFQwen2.from_pretrained(d).eval()

        def hf_generate():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert gen.shape[1] == args.prompt_len + args.new_tokens

        sides = {"jax": lambda: sampler.generate(prompts, params), "hf": hf_generate}
        hf_generate()  # warm-up (the JAX sampler compiled above)
        python = vllm_python(args)
        if python:
            from concurrent.futures import ThreadPoolExecutor

            from toolgrpo.agents.vllm_server import VLLMServer, vllm_command

            server = stack.enter_context(
                VLLMServer(
                    d,
                    max_lora_rank=8,
                    command=vllm_command(python),
                    env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                    extra_args=[
                        "--max-model-len",
                        "1024",
                        "--dtype",
                        "float32",
                        "--served-model-name",
                        "bench",
                    ],
                )
            )
            pool = stack.enter_context(ThreadPoolExecutor(args.prompts))
            sides["vllm"] = lambda: vllm_generate(
                server.url, prompts, args.new_tokens, args.seed, pool
            )
            assert all(len(row) == args.new_tokens for row in sides["vllm"]())  # warm-up
        times = {name: [] for name in sides}
        for _ in range(args.repeats):  # alternating: every side sees the same machine load
            for name, run in sides.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    median = {name: float(np.median(ts)) for name, ts in times.items()}
    report = {
        "jax_tokens_per_s": n_tokens / median["jax"],
        "hf_tokens_per_s": n_tokens / median["hf"],
        "speed_ratio": median["hf"] / median["jax"],
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "jax_threads": sampler.threads,
        "torch_threads": torch.get_num_threads(),
    }
    if "vllm" in median:
        report["vllm_tokens_per_s"] = n_tokens / median["vllm"]
        report["vllm_ratio"] = median["vllm"] / median["jax"]  # JAX's speed as a share of vLLM's
    if args.json:
        print(json.dumps(report))
    else:
        vllm = (
            f"; vLLM (CPU build): {report['vllm_tokens_per_s']:.0f} tokens/s, JAX/vLLM "
            f"{report['vllm_ratio']:.2f}x"
            if "vllm" in median
            else ""
        )
        print(
            f"JaxSampler: {report['jax_tokens_per_s']:.0f} tokens/s; transformers generate: "
            f"{report['hf_tokens_per_s']:.0f} tokens/s; ratio {report['speed_ratio']:.2f}x"
            f"{vllm} ({args.prompts} prompts x {args.new_tokens} new tokens)"
        )
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
