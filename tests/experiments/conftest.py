"""A tiny local 'Qwen' (random Qwen2 + a BPE tokenizer with Qwen's chat format) and AIME-style
problem files: what the main job and the evaluation script load when the hub is out of reach."""

import json

import pytest
from flax import nnx

from learners.qwen2 import Qwen2Config, Qwen2ForCausalLM
from learners.tokenizer import train_chat_tokenizer

PROBLEMS = [("What is 17 times 23?", "391"), ("Find the remainder when 2^10 is divided by 7.", "2"),
            ("How many positive divisors does 360 have?", "24"), ("Compute 99 + 1.", "100")]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen")
    tokenizer = train_chat_tokenizer([q for q, _ in PROBLEMS] * 5 + [
        "```python\nprint(17 * 23)\n```\n```output\n391\n```\n\\boxed{391}"], vocab_size=400)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      rope_theta=10_000.0, max_position_embeddings=1024)
    Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def problem_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems")
    train, test = path / "train.jsonl", path / "test.jsonl"
    train.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in PROBLEMS))
    test.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in PROBLEMS[:2]))
    return str(train), str(test)
