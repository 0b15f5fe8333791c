"""Tiny random Qwen2 models built with Hugging Face transformers: the oracle for the Flax model
(their shapes: tests/tiny.py's VARIANTS)."""

import jax
import numpy as np
from tiny import tiny_fields

jax.config.update("jax_default_matmul_precision", "highest")


def build_hf_model(name: str, seed: int = 0):
    """transformers' Qwen2ForCausalLM of the tiny variant `name`, every tensor random."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(rms_norm_eps=1e-6, max_position_embeddings=256, **tiny_fields(name))
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # every tensor random, biases and norm weights included
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def random_batch(vocab: int, batch: int = 3, length: int = 11, seed: int = 0, pad: bool = True):
    """Right-padded token ids and attention mask (row lengths differ when `pad`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    if pad:
        for row, n in enumerate(rng.integers(length // 2, length + 1, batch)):
            mask[row, n:] = 0
            ids[row, n:] = 0
        mask[0] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    """Logits of a torch model (transformers or PEFT) as float32 numpy."""
    import torch

    with torch.no_grad():
        return (
            model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
            .logits.float()
            .numpy()
        )
