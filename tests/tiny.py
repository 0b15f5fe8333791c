"""The tiny random Qwen2 of the tests, defined once.

    from tiny import tiny_base_model, tiny_config, tiny_model

    cfg = tiny_config()                            # TINY: 2 layers, width 32, vocabulary 32
    cfg = tiny_config(vocab_size=len(tokenizer))   # any field overridden
    cfg = tiny_config("gqa_tied")                  # one of VARIANTS (attention shapes)
    model = tiny_model()                           # random weights + LoRA rank 4, alpha 8
    model = tiny_model(lora_rank=8, seed=3, max_position_embeddings=512)
    base = tiny_base_model("mqa")                  # without adapters

Every test module can import it (pytest puts tests/, the directory of tests/conftest.py, on
sys.path); a script that a test runs in a subprocess finds it through `subprocess_env()`.
"""

from __future__ import annotations

import os
import pathlib

TESTS_DIR = str(pathlib.Path(__file__).resolve().parent)

TINY = {
    "vocab_size": 32,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10_000.0,
}
"""Fields of the tiny Qwen2 (the rest are Qwen2Config's defaults): head width 8, two query heads
per key/value head, tied embeddings."""

VARIANTS = {
    # grouped-query attention, 3 query heads per KV head, tied embeddings, odd vocabulary
    "gqa_tied": {
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 72,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    # multi-head attention, odd MLP width, untied embeddings, three layers
    "mha_untied": {
        "vocab_size": 101,
        "hidden_size": 40,
        "intermediate_size": 50,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    # one KV head for eight query heads, an explicit head_dim (not hidden_size / heads)
    "mqa": {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "tie_word_embeddings": True,
    },
}
"""Shapes that exercise the attention variants, each compared with transformers
(tests/learners/tiny_qwen.py); a variant overrides TINY's sizes and keeps its rope_theta."""


def tiny_fields(variant: str | None = None, **overrides) -> dict:
    """TINY's fields, then those of VARIANTS[variant] if given, then `overrides`."""
    return {**TINY, **(VARIANTS[variant] if variant else {}), **overrides}


def tiny_config(variant: str | None = None, **overrides):
    """A toolgrpo.learners.qwen2.Qwen2Config of `tiny_fields(variant, **overrides)`."""
    from toolgrpo.learners.qwen2_config import Qwen2Config

    return Qwen2Config(**tiny_fields(variant, **overrides))


def tiny_base_model(
    variant: str | None = None,
    *,
    seed: int = 0,
    dtype=None,
    param_dtype=None,
    remat: bool = False,
    **overrides,
):
    """A random Qwen2ForCausalLM of `tiny_config(variant, **overrides)`, without adapters;
    weights from nnx.Rngs(seed), dtypes float32 unless given."""
    import jax.numpy as jnp
    from flax import nnx

    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        tiny_config(variant, **overrides),
        dtype=dtype or jnp.float32,
        param_dtype=param_dtype or jnp.float32,
        remat=remat,
        rngs=nnx.Rngs(seed),
    )


def tiny_model(
    variant: str | None = None,
    *,
    lora_rank: int = 4,
    lora_alpha: float = 8,
    lora_seed: int | None = None,
    **model_args,
):
    """`tiny_base_model(variant, **model_args)` with LoRA (`lora_rank`, `lora_alpha`) on every
    projection, as the learner trains it: A random from nnx.Rngs(lora_seed) (apply_lora's
    default when None), B zero, so that it computes what the base model does."""
    from flax import nnx

    from toolgrpo.learners.lora import apply_lora

    rngs = None if lora_seed is None else nnx.Rngs(lora_seed)
    return apply_lora(
        tiny_base_model(variant, **model_args), rank=lora_rank, alpha=lora_alpha, rngs=rngs
    )


def subprocess_env(**extra: str) -> dict:
    """os.environ with TESTS_DIR first on PYTHONPATH (so that a subprocess can import this
    module), updated with `extra`."""
    path = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
