"""What the offline demos (experiments/arith_grpo.py, experiments/select_grpo.py) share: the
tiny Qwen2 they build from scratch and the teacher-forced log-probabilities their warm starts
measure."""

from __future__ import annotations

import functools


def tiny_qwen2(tokenizer, hidden_size: int, layers: int, head_dim: int, seed: int):
    """A randomly initialised Qwen2 of `layers` decoder layers, `hidden_size // head_dim` query
    heads and half as many key/value heads, its embeddings tied, over `tokenizer`'s vocabulary."""
    from flax import nnx

    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config

    heads = hidden_size // head_dim
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        rope_theta=10_000.0,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))


@functools.cache
def teacher_forced_logprobs():
    """A jitted (model, tokens [N, T]) -> [N, T] log-probabilities of each token given the ones
    before (0 at position 0)."""
    from flax import nnx

    from toolgrpo.learners.grpo import token_logprobs

    return nnx.jit(lambda model, tokens: token_logprobs(model(tokens), tokens))
