"""Tiny chat models for agent tests: a BPE tokenizer trained here with Qwen's chat format, a random
Qwen2 with LoRA (the scripted sampler lives in scripted.py)."""

import jax
import pytest
from flax import nnx
from tiny import tiny_model

from toolgrpo.envs.problems import ArithProblems
from toolgrpo.envs.protocols import get_protocol
from toolgrpo.learners.tokenizer import train_chat_tokenizer

jax.config.update("jax_default_matmul_precision", "highest")


def corpus(n: int = 200) -> list[str]:
    problems = ArithProblems(3, seed=123)
    texts = [get_protocol(p).system_prompt() for p in ("markdown", "qwen")]
    texts += [problems[i].question for i in range(n)]
    texts += [
        "```python\nprint(12 * 34)\n```\n```output\n408\n```\nSo \\boxed{408}.",
        '<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>',
    ]
    return texts


@pytest.fixture(scope="session")
def chat_tokenizer():
    return train_chat_tokenizer(corpus(), vocab_size=600)


@pytest.fixture(scope="session")
def chat_model(chat_tokenizer):
    model = tiny_model(vocab_size=len(chat_tokenizer), max_position_embeddings=1024)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, nnx.state(model, nnx.LoRAParam)))
    return model
