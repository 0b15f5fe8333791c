"""Tokenizer and chat template through transformers.AutoTokenizer (never hand-written)."""

from __future__ import annotations

from learners.params import resolve


def load_tokenizer(path_or_id: str):
    """`AutoTokenizer` for a local directory or hub id (same offline error as the model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(path_or_id))
