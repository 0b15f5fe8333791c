"""Causal grouped-query attention of a whole sequence, in memory that grows with T, not T^2.

    out = causal_attention(q, k, v, key_mask)                    # "auto": cuDNN on a GPU (bf16)
    out = causal_attention(q, k, v, key_mask, "blockwise", 512)  # any backend

Query t attends to the keys s <= t that `key_mask` [B, S] marks valid; the N query heads share
the K key/value heads N/K apiece. Scores and the softmax are float32 whatever the inputs' dtype.

"blockwise" is FlashAttention's algorithm (Dao et al. 2022, arXiv 2205.14135; the backward of
FlashAttention-2, arXiv 2307.08691) in plain JAX: queries and keys in blocks of `block`
positions, an online softmax over the key blocks at or before each query block (blocks above
the diagonal are never computed), and a backward pass that recomputes each block's
probabilities from the saved log-sum-exp instead of keeping them. Live memory is a few blocks of
scores, [B, K, block*G, block], plus the output and one log-sum-exp per query; the loops are XLA
while loops, so the program does not grow with T. "dot_product" is jax.nn.dot_product_attention
(cuDNN's fused kernel on a GPU, XLA's [B, N, T, S] formulation elsewhere; it takes key lengths,
so the mask must be right padding).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "blockwise", "dot_product")
_MASKED = -0.5 * float(jnp.finfo(jnp.float32).max)  # finite: a row with no valid key stays finite


def causal_attention(
    q_btnh, k_bskh, v_bskh, key_mask_bs, implementation: str = "auto", block: int = 512
):
    """[B, T, N, H] queries, [B, S=T, K, H] keys and values, [B, S] valid keys -> [B, T, N*H]."""
    if implementation == "auto":  # cuDNN's kernel takes half precision only
        half = q_btnh.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "dot_product" if half and jax.default_backend() == "gpu" else "blockwise"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    if implementation == "dot_product":
        out = jax.nn.dot_product_attention(
            q_btnh,
            k_bskh.astype(q_btnh.dtype),
            v_bskh.astype(q_btnh.dtype),
            is_causal=True,
            key_value_seq_lengths=key_mask_bs.astype(jnp.int32).sum(-1),
        )
        return out.reshape(b, t, n * h)
    g = n // kh
    if t <= block:  # one block: the plain formulation, differentiated as it is
        return _one_block(
            q_btnh,
            k_bskh.astype(q_btnh.dtype),
            v_bskh.astype(q_btnh.dtype),
            key_mask_bs.astype(bool),
        ).reshape(b, t, n * h)
    c = block
    pad = -t % c
    # [B, T, N, H] -> [B, K, T*G, H]: rows (t, g) of one key/value head, so that a block of c
    # positions is c*G consecutive rows and meets its keys in one plain batched matmul
    q = q_btnh.reshape(b, t, kh, g, h).transpose(0, 2, 1, 3, 4)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, kh, (t + pad) * g, h)
    k = jnp.pad(k_bskh.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v_bskh.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(key_mask_bs.astype(bool), ((0, 0), (0, pad)))
    out = _blockwise(q, k.astype(q.dtype), v.astype(q.dtype), valid, c, g)
    out = out.reshape(b, kh, t + pad, g, h)[:, :, :t].transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, n * h)


def _one_block(q_btnh, k_bskh, v_bskh, valid_bs):
    b, t, n, h = q_btnh.shape
    kh = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, kh, n // kh, h)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & valid_bs[:, None, :]  # [B, T, S]
    s = jnp.where(allowed[:, None, None], s * h**-0.5, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v_bskh)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _scores(q_blk, k_blk, valid_blk, i, j, c, g):
    """Scaled scores [B, K, c*G, c] of query block i against key block j, masked."""
    s = jnp.einsum("bkqh,bksh->bkqs", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s * q_blk.shape[-1] ** -0.5
    q_pos = i * c + jnp.arange(c * g) // g
    k_pos = j * c + jnp.arange(c)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & valid_blk[:, None, :]  # [B, cG, c]
    return jnp.where(allowed[:, None], s, _MASKED), allowed[:, None]


def _forward(q, k, v, valid, c, g):
    """(out [B, K, T*G, H] in q's dtype, log-sum-exp [B, K, T*G] float32)."""
    n_blocks = k.shape[2] // c
    rows = c * g

    def query_block(i):
        q_blk = _slice(q, i * rows, rows, 2)

        def key_block(j, carry):
            m, denom, acc = carry
            s, _ = _scores(q_blk, _slice(k, j * c, c, 2), _slice(valid, j * c, c, 1), i, j, c, g)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            scale = jnp.exp(m - m_new)
            acc = acc * scale[..., None] + jnp.einsum(
                "bkqs,bksh->bkqh",
                p.astype(v.dtype),
                _slice(v, j * c, c, 2),
                preferred_element_type=jnp.float32,
            )
            return m_new, denom * scale + p.sum(-1), acc

        shape = q_blk.shape[:3]
        init = (
            jnp.full(shape, _MASKED, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32),
        )
        m, denom, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # blocks at or before i
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(query_block, jnp.arange(n_blocks))  # [n, B, K, rows, ...]
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1, *x.shape[4:])
    return unblock(out), unblock(lse)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, valid, c, g):
    return _forward(q, k, v, valid, c, g)[0]


def _blockwise_fwd(q, k, v, valid, c, g):
    out, lse = _forward(q, k, v, valid, c, g)
    return out, (q, k, v, valid, out, lse)


def _blockwise_bwd(c, g, residuals, d_out):
    q, k, v, valid, out, lse = residuals
    n_blocks = k.shape[2] // c
    rows = c * g
    scale = q.shape[-1] ** -0.5
    # D_r = sum_h dO_rh O_rh: the softmax's backward needs it once per query row
    d_rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)

    def probabilities(i, j):
        """The block's probabilities, recomputed from the saved log-sum-exp, and dP's pieces."""
        q_blk, k_blk = _slice(q, i * rows, rows, 2), _slice(k, j * c, c, 2)
        s, allowed = _scores(q_blk, k_blk, _slice(valid, j * c, c, 1), i, j, c, g)
        p = jnp.where(allowed, jnp.exp(s - _slice(lse, i * rows, rows, 2)[..., None]), 0.0)
        do_blk = _slice(d_out, i * rows, rows, 2)
        dp = jnp.einsum(
            "bkqh,bksh->bkqs", do_blk, _slice(v, j * c, c, 2), preferred_element_type=jnp.float32
        )
        ds = p * (dp - _slice(d_rows, i * rows, rows, 2)[..., None])  # dS = P (dP - D)
        return q_blk, k_blk, do_blk, p, ds

    def dq_block(i):  # dQ_i = sum_{j <= i} dS_ij K_j
        def body(j, acc):
            _, k_blk, _, _, ds = probabilities(i, j)
            return acc + jnp.einsum(
                "bkqs,bksh->bkqh", ds.astype(k.dtype), k_blk, preferred_element_type=jnp.float32
            )

        acc = jax.lax.fori_loop(
            0, i + 1, body, jnp.zeros(q.shape[:2] + (rows, q.shape[3]), jnp.float32)
        )
        return (acc * scale).astype(q.dtype)

    def dkv_block(j):  # dK_j = sum_{i >= j} dS_ij^T Q_i, dV_j = sum_{i >= j} P_ij^T dO_i
        def body(i, acc):
            dk, dv = acc
            q_blk, _, do_blk, p, ds = probabilities(i, j)
            dk = dk + jnp.einsum(
                "bkqs,bkqh->bksh", ds.astype(q.dtype), q_blk, preferred_element_type=jnp.float32
            )
            dv = dv + jnp.einsum(
                "bkqs,bkqh->bksh", p.astype(d_out.dtype), do_blk, preferred_element_type=jnp.float32
            )
            return dk, dv

        zeros = jnp.zeros(k.shape[:2] + (c, k.shape[3]), jnp.float32)
        dk, dv = jax.lax.fori_loop(j, n_blocks, body, (zeros, zeros))
        return (dk * scale).astype(k.dtype), dv.astype(v.dtype)

    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], -1, x.shape[-1])
    dq = unblock(jax.lax.map(dq_block, jnp.arange(n_blocks)))
    dk, dv = (unblock(x) for x in jax.lax.map(dkv_block, jnp.arange(n_blocks)))
    return dq, dk, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
