"""A tiny local 'Qwen' and problem files, for trying the main job without the hub or a GPU.

    uv run python experiments/make_tiny.py --out runs/tiny
    uv run python experiments/aime_grpo.py --model.name runs/tiny/model \
        --env.problems runs/tiny/train.jsonl --env.eval-problems runs/tiny/test.jsonl \
        --sampler.engine jax --log.no-wandb --steps 2 --problems-per-step 2 \
        --rollout.group-size 2 --grpo.micro-batch-size 2 --model.lora-rank 4 \
        --rollout.max-turn-tokens 12 --rollout.max-total-tokens 512 --eval.samples 2 \
        --out runs/tiny-run

The model is a random Qwen2 (2 layers, width 32) with a BPE tokenizer in Qwen's chat format, saved
as Hugging Face does (config.json, model.safetensors, tokenizer files): what the tests load.
Its answers are noise; the point is the plumbing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import tyro

PROBLEMS = [
    ("What is 17 times 23?", "391"),
    ("Find the remainder when 2^10 is divided by 7.", "2"),
    ("How many positive divisors does 360 have?", "24"),
    ("Compute 99 + 1.", "100"),
]


@dataclass(frozen=True)
class Args:
    """Where to write the tiny model and problems."""

    out: str = "runs/tiny"
    """Directory: model/, train.jsonl (4 problems, "problem" column), test.jsonl (2, "question")."""
    seed: int = 0
    """Seed of the model's weights."""


def make_model(directory: str, seed: int = 0) -> str:
    from flax import nnx

    from toolgrpo.learners.params import save_pretrained
    from toolgrpo.learners.qwen2 import Qwen2ForCausalLM
    from toolgrpo.learners.qwen2_config import Qwen2Config
    from toolgrpo.learners.tokenizer import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(
        [q for q, _ in PROBLEMS] * 5
        + ["```python\nprint(17 * 23)\n```\n```output\n391\n```\n\\boxed{391}"],
        vocab_size=400,
    )
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10_000.0,
        max_position_embeddings=1024,
    )
    save_pretrained(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed)), directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_problems(directory: str) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    train, test = os.path.join(directory, "train.jsonl"), os.path.join(directory, "test.jsonl")
    with open(train, "w") as f:
        f.writelines(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in PROBLEMS)
    with open(test, "w") as f:
        f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS[:2])
    return train, test


if __name__ == "__main__":
    args = tyro.cli(Args)
    model = make_model(os.path.join(args.out, "model"), args.seed)
    train, test = make_problems(args.out)
    print(f"wrote {model}, {train}, {test}")
