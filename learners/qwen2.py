"""Qwen2 / Qwen2.5 causal language model in Flax NNX, with a KV cache for sampling.

    from toolgrpo.learners.params import from_pretrained, save_pretrained

    model = from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=jnp.bfloat16)
    logits = model(input_ids, attention_mask)                      # [B, T, V]
    logits, cache = model.prefill(input_ids, attention_mask, max_len=512)
    logits, cache = model.decode(next_tokens, cache)               # [B, V], one token a row

The architecture follows Hugging Face transformers' `Qwen2ForCausalLM` exactly (the tests compare
logits with it): grouped-query attention with q/k/v biases, rotary embeddings (rotate-half form),
RMSNorm computed in float32, SwiGLU MLP, tied or untied embeddings. Parameters (`param_dtype`) and
computation (`dtype`) have separate dtypes. The architecture's settings (`Qwen2Config`) and the
Qwen2.5 presets are in `learners/qwen2_config.py`. Loading and saving the Hugging Face format live
in `learners/params.py` (`from_pretrained`, `save_pretrained`), which depends on this module; this
module never imports it.
"""

from __future__ import annotations

import itertools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from toolgrpo.learners.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from toolgrpo.learners.attention import causal_attention
from toolgrpo.learners.qwen2_config import Qwen2Config


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_btd):
        x = x_btd.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * x.astype(self.dtype)


def rope(x_btnh, positions_bt, theta: float):
    """Rotary embedding, rotate-half form (as transformers): x*cos + rotate_half(x)*sin."""
    dim = x_btnh.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [H/2]
    freqs = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
    half = dim // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos + rotated * sin


def linear(din: int, dout: int, bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_init=nnx.initializers.normal(0.02),
    )


def _project(x, projections):
    """`x` through several projections of the same input. Plain nnx.Linear ones run as one
    matmul over their concatenated kernels: a one-token decode step is bound by the number of
    small matmuls, not their size. (LoRA-wrapped projections run one by one.)"""
    if not all(type(p) is nnx.Linear for p in projections):
        return [p(x) for p in projections]
    biased = {p.bias is not None for p in projections}
    if len(biased) > 1:
        return [p(x) for p in projections]
    dtype = projections[0].dtype or x.dtype
    kernel = jnp.concatenate([p.kernel[...].astype(dtype) for p in projections], axis=1)
    y = x.astype(dtype) @ kernel
    if biased == {True}:
        y = y + jnp.concatenate([p.bias[...].astype(dtype) for p in projections])
    splits = list(itertools.accumulate(p.out_features for p in projections))[:-1]
    return jnp.split(y, splits, axis=-1)


@flax.struct.dataclass
class LayerCache:
    k: jax.Array  # [B, K, H, S]: the layouts a decode step's two matmuls read without a transpose
    v: jax.Array  # [B, K, S, H]


@flax.struct.dataclass
class Cache:
    """Keys and values of every layer, and the number of valid positions of each row."""

    layers: tuple[LayerCache, ...]
    lengths: jax.Array  # [B] int32

    @property
    def max_len(self) -> int:
        return self.layers[0].v.shape[2]


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        h = cfg.head_dim
        assert h is not None  # Qwen2Config.__post_init__ derives it when not given
        self.q_proj = linear(d, n * h, True, dtype, param_dtype, rngs)
        self.k_proj = linear(d, k * h, True, dtype, param_dtype, rngs)
        self.v_proj = linear(d, k * h, True, dtype, param_dtype, rngs)
        self.o_proj = linear(n * h, d, False, dtype, param_dtype, rngs)
        self.n, self.k, self.h, self.theta = n, k, h, cfg.rope_theta

    def __call__(
        self,
        x_btd,
        positions_bt,
        mask,
        cache: LayerCache | None,
        write_at,
        implementation: str = "auto",
        block: int = 512,
    ):
        """`mask`: the valid keys, [B, S] for a whole sequence (causal attention over positions
        0..T-1) or [B, 1, S] for a decode step against the cache (`write_at` given)."""
        b, t, _ = x_btd.shape
        if write_at is None:
            q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        else:  # decoding: one matmul for the three
            q, k, v = _project(x_btd, (self.q_proj, self.k_proj, self.v_proj))
        q = rope(q.reshape(b, t, self.n, self.h), positions_bt, self.theta)
        k = rope(k.reshape(b, t, self.k, self.h), positions_bt, self.theta)
        v = v.reshape(b, t, self.k, self.h)
        groups = self.n // self.k
        if cache is not None:
            if write_at is None:  # prefill: the whole prompt at positions 0..T-1
                put = lambda c, x: jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, 0, 0, 0))
                cache = LayerCache(
                    put(cache.k, k.transpose(0, 2, 3, 1)), put(cache.v, v.transpose(0, 2, 1, 3))
                )
            else:  # decode: one token a row, each at its own length
                rows = jnp.arange(b)
                ck = cache.k.at[rows, :, :, write_at].set(k[:, 0].astype(cache.k.dtype))
                cv = cache.v.at[rows, :, write_at].set(v[:, 0].astype(cache.v.dtype))
                cache = LayerCache(ck, cv)
                return self.o_proj(self._decode_attention(q, ck, cv, mask, groups)), cache
        return self.o_proj(causal_attention(q, k, v, mask, implementation, block)), cache

    def _decode_attention(self, q_b1nh, k_bkhs, v_bksh, mask_b1s, groups):
        """One query a row against the cache: two plain batched matmuls, [G, H] x [H, S] and
        [G, S] x [S, H], with no transpose of the cache (which dominated a CPU decode step)."""
        b = q_b1nh.shape[0]
        q = q_b1nh.reshape(b, self.k, groups, self.h)
        logits = jnp.einsum("bkgh,bkhs->bkgs", q, k_bkhs.astype(q.dtype)).astype(jnp.float32)
        logits = jnp.where(mask_b1s[:, :, None], logits * self.h**-0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_bksh.dtype)
        return (
            jnp.einsum("bkgs,bksh->bkgh", probs, v_bksh)
            .astype(q.dtype)
            .reshape(b, 1, self.n * self.h)
        )


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(d, f, False, dtype, param_dtype, rngs)
        self.up_proj = linear(d, f, False, dtype, param_dtype, rngs)
        self.down_proj = linear(f, d, False, dtype, param_dtype, rngs)

    def __call__(self, x_btd, decoding: bool = False):
        if decoding:  # one matmul for gate and up
            gate, up = _project(x_btd, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x_btd), self.up_proj(x_btd)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype}
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x_btd, positions_bt, mask, cache=None, write_at=None, **attention):
        attn, cache = self.self_attn(
            self.input_layernorm(x_btd), positions_bt, mask, cache, write_at, **attention
        )
        x_btd = x_btd + attn
        return x_btd + self.mlp(
            self.post_attention_layernorm(x_btd), decoding=write_at is not None
        ), cache


def _positions(attention_mask_bt):
    """Positions 0..T-1 of every row (as transformers')."""
    b, t = attention_mask_bt.shape
    return jnp.broadcast_to(jnp.arange(t), (b, t))


class Qwen2ForCausalLM(nnx.Module):
    """The causal LM.

    remat           recompute each layer's activations in the backward pass (memory: one layer's
                    activations live at a time, plus each layer's input)
    scan_layers     run the layers of a whole-sequence forward under `jax.lax.scan`, so that one
                    layer is compiled whatever the depth (their parameters are stacked per call)
    attention       whole-sequence attention: "auto", "blockwise" or "dot_product" (see
                    toolgrpo.learners.attention); decoding against the cache has its own kernel
    attention_block positions per block of the blockwise attention
    """

    def __init__(
        self,
        cfg: Qwen2Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: bool = False,
        scan_layers: bool = True,
        attention: str = "auto",
        attention_block: int = 512,
        rngs: nnx.Rngs | None = None,
    ):
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}"
            )
        if attention_block < 1:
            raise ValueError(f"attention_block must be >= 1, got {attention_block}")
        rngs = rngs or nnx.Rngs(0)
        self.config, self.dtype, self.remat = cfg, dtype, remat
        self.scan_layers, self.attention, self.attention_block = (
            scan_layers,
            attention,
            attention_block,
        )
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else linear(cfg.hidden_size, cfg.vocab_size, False, dtype, param_dtype, rngs)
        )

    # -- forward ----------------------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, positions=None, return_hidden=False):
        """Logits [B, T, V] for right-padded `input_ids` [B, T]; `attention_mask` [B, T] marks
        real tokens (1) and padding (0). Positions default to 0..T-1, as transformers'.
        `return_hidden`: the final hidden states [B, T, D] instead (see `output_embedding`)."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        positions = _positions(attention_mask) if positions is None else positions
        key_mask = attention_mask.astype(bool)
        attention = {"implementation": self.attention, "block": self.attention_block}

        def one_layer(graphdef, state, x):  # one layer, split/merged so that jax transforms apply
            return nnx.merge(graphdef, state)(x, positions, key_mask, **attention)[0]

        run = jax.checkpoint(one_layer, static_argnums=0) if self.remat else one_layer
        x = self.embed_tokens(input_ids)
        split = [nnx.split(layer) for layer in self.layers]
        graphdefs = {graphdef for graphdef, _ in split}
        if self.scan_layers and len(split) > 1 and len(graphdefs) == 1:
            (graphdef,) = graphdefs
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[st for _, st in split])
            x, _ = jax.lax.scan(lambda x, st: (run(graphdef, st, x), None), x, stacked)
        else:  # layers that differ in structure (or one layer): one after the other
            for graphdef, state in split:
                x = run(graphdef, state, x)
        hidden = self.norm(x)
        return hidden if return_hidden else self.logits(hidden)

    def output_embedding(self):
        """The output projection as a [V, D] matrix: logits = hidden @ output_embedding().T."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...].T
        return self.embed_tokens.embedding[...]

    def logits(self, hidden_btd):
        if self.lm_head is not None:
            return self.lm_head(hidden_btd)
        return self.embed_tokens.attend(hidden_btd)

    # -- sampling ---------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        k, h = self.config.num_key_value_heads, self.config.head_dim
        dtype = dtype or self.dtype
        layers = tuple(
            LayerCache(
                jnp.zeros((batch, k, h, max_len), dtype), jnp.zeros((batch, k, max_len, h), dtype)
            )
            for _ in self.layers
        )
        return Cache(layers, jnp.zeros((batch,), jnp.int32))

    def prefill(self, input_ids, attention_mask, max_len: int, return_hidden: bool = False):
        """Run right-padded prompts [B, T]; returns the logits [B, T, V] (or the final hidden
        states [B, T, D]) and a cache of capacity `max_len` whose row lengths are the prompt
        lengths."""
        b, t = input_ids.shape
        if t > max_len:
            raise ValueError(f"prompt length {t} exceeds the cache capacity {max_len}")
        cache = self.init_cache(b, max_len)
        positions, key_mask = _positions(attention_mask), attention_mask.astype(bool)
        attention = {"implementation": self.attention, "block": self.attention_block}
        x = self.embed_tokens(input_ids)
        new_layers = []
        for layer, lc in zip(self.layers, cache.layers):
            x, lc = layer(x, positions, key_mask, lc, None, **attention)
            new_layers.append(lc)
        lengths = attention_mask.sum(-1).astype(jnp.int32)
        hidden = self.norm(x)
        return (hidden if return_hidden else self.logits(hidden)), Cache(tuple(new_layers), lengths)

    def decode(self, tokens_b, cache: Cache):
        """One new token per row, at position `cache.lengths`; returns logits [B, V] and the cache
        with every length advanced by one."""
        positions = cache.lengths[:, None]  # [B, 1]
        mask_b1s = (jnp.arange(cache.max_len)[None, :] <= cache.lengths[:, None])[:, None, :]
        x = self.embed_tokens(tokens_b[:, None])
        new_layers = []
        for layer, lc in zip(self.layers, cache.layers):
            x, lc = layer(x, positions, mask_b1s, lc, cache.lengths)
            new_layers.append(lc)
        return self.logits(self.norm(x))[:, 0], Cache(tuple(new_layers), cache.lengths + 1)
