"""Qwen2 / Qwen2.5 architectures: `Qwen2Config`, the fields of a Hugging Face config.json (read
with `from_hf_config`, written with `to_hf_config`), and the Qwen2.5 sizes as presets.

    cfg = PRESETS["qwen2p5_1p5b"]()                      # or Qwen2Config.from_hf_config(json)
    model = toolgrpo.learners.qwen2.Qwen2ForCausalLM(cfg)

Plain data: this module imports neither JAX nor the model (learners/qwen2.py, which builds one).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2 model (the fields of its Hugging Face config.json)."""

    vocab_size: int = 151_936
    """Rows of the embedding table."""
    hidden_size: int = 896
    """Width of the residual stream."""
    intermediate_size: int = 4_864
    """Width of the MLP."""
    num_hidden_layers: int = 24
    """Decoder layers."""
    num_attention_heads: int = 14
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention: each serves num_attention_heads / this)."""
    head_dim: int | None = None
    """Per-head width of queries, keys and values. None (as in config.json files that leave it
    out) means hidden_size // num_attention_heads; a constructed config always holds the resolved
    width here, never None. (So `dataclasses.replace` with a new hidden_size or head count keeps
    the old width: pass head_dim=None with them to have it derived again.)"""
    rope_theta: float = 1_000_000.0
    """Base of the rotary embedding frequencies."""
    rms_norm_eps: float = 1e-6
    """Epsilon of RMSNorm."""
    tie_word_embeddings: bool = True
    """Whether the output projection is the embedding table."""
    max_position_embeddings: int = 32_768
    """Longest sequence the model was trained for."""

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not a multiple of "
                    f"num_attention_heads={self.num_attention_heads}; give head_dim"
                )
            # frozen: the resolved width is set once, here
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if (
            isinstance(self.head_dim, bool)
            or not isinstance(self.head_dim, numbers.Integral)
            or self.head_dim < 2
            or self.head_dim % 2
        ):
            raise ValueError(
                f"head_dim must be an even integer >= 2 (the rotary embedding "
                f"rotates pairs of channels), got {self.head_dim!r}"
            )
        object.__setattr__(self, "head_dim", int(self.head_dim))

    @classmethod
    def from_hf_config(cls, hf: dict) -> Qwen2Config:
        if hf.get("model_type") not in (None, "qwen2"):
            raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
        hf = dict(hf)
        rope = hf.get("rope_parameters") or {}  # transformers >= 5; older configs: rope_theta
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise NotImplementedError(
                f"rope_scaling={hf.get('rope_scaling') or rope} is not "
                "supported (only the default rotary embedding)"
            )
        if "rope_theta" in rope:
            hf["rope_theta"] = rope["rope_theta"]
        if hf.get("use_sliding_window"):
            raise NotImplementedError("sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def to_hf_config(self) -> dict:
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # head_dim too
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}  # both spellings
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "use_cache": True,
            "rope_parameters": rope,
            **hf,
        }


def qwen2p5_0p5b() -> Qwen2Config:
    return Qwen2Config()


def qwen2p5_1p5b() -> Qwen2Config:
    return Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    )


def qwen2p5_3b() -> Qwen2Config:
    return Qwen2Config(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
    )


def qwen2p5_7b() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )


PRESETS = {
    "qwen2p5_0p5b": qwen2p5_0p5b,
    "qwen2p5_1p5b": qwen2p5_1p5b,
    "qwen2p5_3b": qwen2p5_3b,
    "qwen2p5_7b": qwen2p5_7b,
}
