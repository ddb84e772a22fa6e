"""Scaled dot-product attention over KV-cache slots: one-shot for short queries, blockwise for long ones.

A query at slot q sees slot s iff s ≤ q and slot s holds a real token (`key_valid`). Einsum letters
as in `transformer.py`: b batch, g KV heads, r query heads per KV head, t queries, s key slots, k
head dim.

The one-shot form materialises fp32 scores [b, g, r, t, s] — for a GRPO row of 32k tokens that is
120 GB per layer at Qwen2.5-7B's 28 heads, kept for the backward pass. `blockwise_attention` never
holds more than a [b, g, r, block, block] tile: an online softmax over key blocks (FlashAttention's
recurrence) in the forward pass, and a custom VJP that recomputes each tile's probabilities from the
saved log-sum-exp in the backward. Key blocks after a query block's last slot are skipped (they are
all masked), which halves the work of causal self-attention. Pure JAX, so it runs, shards and
differentiates the same on CPU, GPU and TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, so a query with no visible key (padding) gives no NaN


def attention(q, keys, values, q_slot, key_valid, *, block: int = 0):
    """softmax(q·k / √k, masked)·v [b, g, r, t, k] in q's dtype.

    q [b, g, r, t, k]; keys [b, g, k, s]; values [b, g, s, k]; q_slot [t] int: each query's slot;
    key_valid [b, s] bool. block > 0 and t > block: blockwise (memory O(block²) per row and head).
    Rows with no visible key (padding) give an average of values, not the same one in both forms.
    """
    if block and q.shape[3] > block:
        return blockwise_attention(q, keys, values, q_slot, key_valid, block)
    mask = (jnp.arange(keys.shape[3])[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]  # [b, t, s]
    scores = jnp.einsum("bgrtk,bgks->bgrts", q, keys, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bgrts,bgsk->bgrtk", probs, values)


def _pad_to(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _chunked(x, block):
    """[b, g, r, t, …] → [n, b, g, r, block, …]: t zero-padded to n whole blocks, blocks first (to loop over)."""
    x = _pad_to(x, 3, -(-x.shape[3] // block) * block)
    return jnp.moveaxis(x.reshape(*x.shape[:3], -1, block, *x.shape[4:]), 3, 0)


def _unchunked(x, t):
    """[n, b, g, r, block, …] → [b, g, r, t, …], the inverse of `_chunked`."""
    return jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], -1, *x.shape[5:])[:, :, :, :t]


def _tiles(q, keys, values, q_slot, key_valid, block):
    """Queries in chunks of `block` ([n, b, g, r, block, k], their slots [n, block]) and keys, values and
    key_valid padded to whole blocks. Padded queries repeat the last slot (so they see keys and stay
    finite); padded keys are invalid."""
    qs = _chunked(q, block)
    q_slot = jnp.concatenate([q_slot, jnp.full((qs.shape[0] * block - q_slot.shape[0],), q_slot[-1], q_slot.dtype)])
    sk = -(-keys.shape[3] // block) * block
    keys, values, key_valid = _pad_to(keys, 3, sk), _pad_to(values, 2, sk), _pad_to(key_valid, 1, sk, False)
    return qs, keys, values, q_slot.reshape(-1, block), key_valid


def _tile_scores(qc, keys, key_valid, slots, j, block):
    """Masked, scaled fp32 scores [b, g, r, block, block] of query chunk qc against key block j."""
    kj = jax.lax.dynamic_slice_in_dim(keys, j * block, block, axis=3)
    scores = jnp.einsum("bgrtk,bgks->bgrts", qc, kj, preferred_element_type=jnp.float32) / math.sqrt(qc.shape[-1])
    valid = jax.lax.dynamic_slice_in_dim(key_valid, j * block, block, axis=1)  # [b, block]
    mask = (j * block + jnp.arange(block)[None, :] <= slots[:, None])[None] & valid[:, None, :]
    return jnp.where(mask[:, None, None], scores, MASKED)


def _visible(j, slots, block):
    """Whether key block j holds any slot that some query of the chunk may see (causally)."""
    return j * block <= jnp.max(slots)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def blockwise_attention(q, keys, values, q_slot, key_valid, block: int):
    """`attention` computed block by block; same arguments (block > 0)."""
    return _forward(q, keys, values, q_slot, key_valid, block)[0]


def _forward(q, keys, values, q_slot, key_valid, block):
    """(output, residuals for `_blockwise_bwd`): query chunks one after another, each an online softmax
    over the key blocks it can see."""
    t = q.shape[3]
    qs, keys_p, values_p, slots, valid_p = _tiles(q, keys, values, q_slot, key_valid, block)
    n_keys = keys_p.shape[3] // block

    def chunk(args):
        qc, sc = args

        def step(j, carry):
            def update(carry):
                m, denom, acc = carry
                scores = _tile_scores(qc, keys_p, valid_p, sc, j, block)
                m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
                p = jnp.exp(scores - m_new[..., None])
                scale = jnp.exp(m - m_new)
                vj = jax.lax.dynamic_slice_in_dim(values_p, j * block, block, axis=2)
                pv = jnp.einsum("bgrts,bgsk->bgrtk", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, denom * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + pv

            return jax.lax.cond(_visible(j, sc, block), update, lambda c: c, carry)

        shape = qc.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(qc.shape, jnp.float32))
        m, denom, acc = jax.lax.fori_loop(0, n_keys, step, init)
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(chunk, (qs, slots))  # [n, b, g, r, block, k], [n, b, g, r, block]
    out = _unchunked(out, t)
    return out, (q, keys, values, q_slot, key_valid, out, _unchunked(lse, t))


def _blockwise_bwd(block, residuals, d_out):
    q, keys, values, q_slot, key_valid, out, lse = residuals
    t, s = q.shape[3], keys.shape[3]
    qs, keys_p, values_p, slots, valid_p = _tiles(q, keys, values, q_slot, key_valid, block)
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # [b, g, r, t]: rowsum(dO ∘ O)
    n_keys = keys_p.shape[3] // block
    inv_sqrt = 1.0 / math.sqrt(q.shape[-1])

    def chunk(carry, args):
        qc, sc, doc, lse_c, delta_c = args

        def step(j, inner):
            def update(inner):
                dq, dk, dv = inner
                # (a query with no visible key has lse ≈ MASKED, so p = 1 on its masked slots: its output is
                # padding, which no loss reads, and the forward's average is not differentiated exactly)
                p = jnp.exp(_tile_scores(qc, keys_p, valid_p, sc, j, block) - lse_c[..., None])
                kj = jax.lax.dynamic_slice_in_dim(keys_p, j * block, block, axis=3)
                vj = jax.lax.dynamic_slice_in_dim(values_p, j * block, block, axis=2)
                dp = jnp.einsum("bgrtk,bgsk->bgrts", doc, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_c[..., None]) * inv_sqrt
                dq = dq + jnp.einsum("bgrts,bgks->bgrtk", ds, kj, preferred_element_type=jnp.float32)
                dk_j = jnp.einsum("bgrts,bgrtk->bgks", ds, qc, preferred_element_type=jnp.float32)
                dv_j = jnp.einsum("bgrts,bgrtk->bgsk", p, doc, preferred_element_type=jnp.float32)
                add = lambda acc, x, axis: jax.lax.dynamic_update_slice_in_dim(
                    acc, jax.lax.dynamic_slice_in_dim(acc, j * block, block, axis) + x, j * block, axis)
                return dq, add(dk, dk_j, 3), add(dv, dv_j, 2)

            return jax.lax.cond(_visible(j, sc, block), update, lambda c: c, inner)

        dq, dk, dv = jax.lax.fori_loop(0, n_keys, step, (jnp.zeros(qc.shape, jnp.float32), *carry))
        return (dk, dv), dq

    init = (jnp.zeros(keys_p.shape, jnp.float32), jnp.zeros(values_p.shape, jnp.float32))
    chunked = (qs, slots, _chunked(d_out, block), _chunked(lse, block), _chunked(delta, block))
    (dk, dv), dq = jax.lax.scan(chunk, init, chunked)
    dq, dk, dv = _unchunked(dq, t).astype(q.dtype), dk[..., :s].astype(keys.dtype), dv[:, :, :s].astype(values.dtype)
    return dq, dk, dv, None, None  # no cotangents for the slots and the validity mask


blockwise_attention.defvjp(_forward, _blockwise_bwd)
