"""The decoder-only transformer of the Llama 3 / Qwen2 / Qwen2.5 family, in Flax NNX.

Einsum letters: b batch, t query positions, s key positions, d model, h query heads,
g KV heads, r query heads per KV head (h = g·r), k head dim, f mlp, v vocab.

Design choices:
* Every parameter is an `nnx.Param` carrying its logical axis names (metadata `axes`), which
  `r1jax.sharding` maps to mesh axes; activations are constrained by logical names.
* One attention path serves training and sampling: keys live in `KVCache` slots; a query at
  slot q sees slot s iff s ≤ q and slot s holds a real token (`valid`). Token positions (for
  RoPE) are per row, so left- or right-padded prompts need no special casing. Without a cache
  the slots are the sequence itself. Past `attention_block` queries, attention runs block by
  block (`model/attention.py`), so long rows never hold all their [t, s] scores.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.model.attention import attention
from r1jax.model.config import ModelConfig
from r1jax.sharding import constrain, embedding_lookup


class KVCache(NamedTuple):
    """Keys/values of every layer in fixed slots, and which slots hold real tokens."""

    # Layouts chosen for decode: heads before slots, so attention's batched matmuls (batch dims
    # b, g) read the cache in place (a [b, S, g, k] cache is transposed in full at every decode
    # step on XLA:CPU), and keys stored transposed so that q·k contracts over rows of [k, S]
    # (≈ 3× faster on XLA:CPU than over [S, k]).
    k: tuple[jax.Array, ...]  # per layer [b, g, k, S]
    v: tuple[jax.Array, ...]  # per layer [b, g, S, k]
    valid: jax.Array  # [b, S] bool
    index: jax.Array  # int32 scalar: the next slot to write

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated n times (row i·n + j copies row i): one prompt's cache for its n samples."""
        if n == 1:
            return self
        rows = lambda x: jnp.repeat(x, n, axis=0)
        return KVCache(tuple(map(rows, self.k)), tuple(map(rows, self.v)), rows(self.valid), self.index)

    def extended(self, length: int) -> KVCache:
        """The cache with empty slots appended up to `length` slots."""
        extra = length - self.length
        keys = tuple(constrain(jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, extra))), _K_AXES) for a in self.k)
        values = tuple(constrain(jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0))), _V_AXES) for a in self.v)
        return KVCache(keys, values, jnp.pad(self.valid, ((0, 0), (0, extra))), self.index)


_K_AXES = ("cache_batch", "kv_heads", "head_dim", "cache_seq")
_V_AXES = ("cache_batch", "kv_heads", "cache_seq", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    g, k = cfg.num_kv_heads, cfg.head_dim
    keys = tuple(constrain(jnp.zeros((batch, g, k, length), dtype), _K_AXES) for _ in range(cfg.num_layers))
    values = tuple(constrain(jnp.zeros((batch, g, length, k), dtype), _V_AXES) for _ in range(cfg.num_layers))
    return KVCache(keys, values, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init: str = "normal", inputs: int = 1) -> nnx.Param:
    """A parameter of `shape`; "normal": N(0, 1/fan_in) with fan-in the product of the first `inputs`
    dimensions: for a projection the ones its matmul contracts (2 for the attention output [heads,
    head_dim, embed]); the embedding table [vocab, embed] is scaled by its vocabulary size likewise."""
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:  # fan-in scaled normal, the usual LLM init
        fan_in = math.prod(shape[:inputs]) if len(shape) > 1 else 1
        value = jax.random.normal(rngs.params(), shape, dtype) * (1.0 / math.sqrt(fan_in))
    return nnx.Param(value, axes=axes)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [k/2], with Llama 3 scaling when configured (as HF computes them)."""
    k = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq.astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [b, t, 1, k/2] of positions [b, t]: computed once per forward, shared by all layers."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, k/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE. x [b, t, n, k], rope = `rope_tables(positions, inv_freq)`.

    Written as x·[cos, cos] + swap_halves(x)·[−sin, sin] rather than by splitting x and
    concatenating the two rotated halves: the halves' swap is a reverse, whose gradient is a
    reverse too, where the concatenate's gradient became slow concatenate fusions on XLA:CPU
    (≈ 7 % of a GRPO update on the bench model). Only the small [b, t, 1, k] tables are concatenated.
    """
    cos, sin = rope
    k = x.shape[-1]
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], 2, k // 2)[..., ::-1, :].reshape(x.shape)  # [x2, x1]
    out = xf * jnp.concatenate([cos, cos], axis=-1) + swapped * jnp.concatenate([-sin, sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.eps = cfg.rms_norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.scale = _param(rngs, (cfg.hidden_size,), ("norm",), cfg, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.q = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), cfg)
        self.k = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
        self.v = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), cfg)
        self.o = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), cfg, inputs=2)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, k), ("heads", "head_dim"), cfg, init="zeros")
            self.k_bias = _param(rngs, (g, k), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = _param(rngs, (g, k), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.out_bias:
            self.o_bias = _param(rngs, (d,), ("norm",), cfg, init="zeros")

    def _project(self, x, name):
        dt = x.dtype
        y = jnp.einsum("btd,dnk->btnk", x, getattr(self, name)[...].astype(dt))
        if self.cfg.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dt)
        return y

    def __call__(self, x, rope, valid, cache_kv, cache_valid, index):
        """x [b, t, d]; rope (cos, sin) [b, t, 1, k/2]; valid [b, t]; cache_kv None or (keys [b, g, k, S],
        values [b, g, S, k])."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = apply_rope(self._project(x, "q"), rope)  # [b, t, h, k]
        k = apply_rope(self._project(x, "k"), rope).transpose(0, 2, 3, 1)  # [b, g, k, t]
        v = self._project(x, "v").transpose(0, 2, 1, 3)  # [b, g, t, k]
        # New keys/values in the activations' row layout (the cache's `cache_batch` may differ in a
        # decode step): otherwise XLA computes them in the cache's layout by all-gathering the weights.
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        k = constrain(k, ("batch", "kv_heads", "head_dim", "seq"))
        v = constrain(v, ("batch", "kv_heads", "seq", "head_dim"))
        if cache_kv is None:
            keys, values, key_valid = k, v, valid
            q_slot = jnp.arange(t)
        else:
            ck, cv = cache_kv
            keys = constrain(jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, 0, index)), _K_AXES)
            values = constrain(jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, index, 0)), _V_AXES)
            key_valid = cache_valid
            q_slot = index + jnp.arange(t)
        g, r = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, t, g, r, cfg.head_dim).transpose(0, 2, 3, 1, 4)  # [b, g, r, t, k]
        out = attention(qg, keys.astype(q.dtype), values.astype(q.dtype), q_slot, key_valid, block=cfg.attention_block)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, -1)
        y = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(q.dtype))
        if cfg.out_bias:
            y = y + self.o_bias[...].astype(y.dtype)
        return y, (None if cache_kv is None else (keys, values))


@jax.custom_vjp
def _widening_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for w [d, f] with f > d (the MLP's gate and up), whose weight gradient is (dyᵀ·x)ᵀ.

    Autodiff writes the weight gradient as xᵀ·dy over the b·t rows, and XLA:CPU then transposes
    the wide operand dy [b·t, f] in full for its dot; as (dyᵀ·x)ᵀ it transposes the narrow x
    [b·t, d] once for both matmuls instead (bench model, GRPO update: −25 % CPU time). Same
    values, any backend.
    """
    return x @ w


def _widening_matmul_fwd(x, w):
    return x @ w, (x, w)


def _widening_matmul_bwd(res, dy):
    x, w = res
    rows = lambda a: a.reshape(-1, a.shape[-1])  # [b·t, ·]: one contracting dim, as the dot wants it
    return dy @ w.T.astype(dy.dtype), (rows(dy).T @ rows(x)).T.astype(w.dtype)


_widening_matmul.defvjp(_widening_matmul_fwd, _widening_matmul_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x):
        dt = x.dtype
        h = jax.nn.silu(_widening_matmul(x, self.gate[...].astype(dt))) * _widening_matmul(x, self.up[...].astype(dt))
        h = constrain(h, ("batch", "seq", "mlp"))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, valid, cache_kv, cache_valid, index):
        y, cache_kv = self.attn(self.attn_norm(x), rope, valid, cache_kv, cache_valid, index)
        x = constrain(x + y, ("batch", "seq", "act_embed"))
        x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "seq", "act_embed"))
        return x, cache_kv


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_block(block: Block, *args):
    return block(*args)


def _remat_block(policy):
    """`_run_block` with the block's activations recomputed in the backward pass (those `policy` does not
    save). A pure `jax.checkpoint` over the block's state, not `nnx.remat`: nnx.remat writes the state
    back into the module, which fails inside a `lax.while_loop` over a module from outside it (the
    sampler's decode loop) and gains nothing, as a forward pass leaves the state as it was."""

    def run(block: Block, *args):
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda state, *args: nnx.merge(graphdef, state)(*args), policy=policy,
                              prevent_cse=True)(state, *args)

    return run


class Transformer(nnx.Module):
    """`model(tokens) -> logits`; `model.hidden_states(...)` for the sampler and chunked losses."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        valid: jax.Array | None = None,
        cache: KVCache | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [b, t, d] and the updated cache.

        tokens [b, t] int; valid [b, t] bool marks real tokens (default: all); positions [b, t]
        default to the count of real tokens before each one, those in the cache included (so left
        padding works). With a cache, the t tokens are written at slots `cache.index …` and attend
        to all earlier slots.
        rope: `rope_tables(positions, rope_frequencies(cfg))` if the caller has it, e.g. rows
        gathered from a table built once outside a decode loop (XLA otherwise fuses cos/sin into
        every q/k consumer and recomputes them per element, ~10 % of a CPU decode step).
        """
        cfg = self.cfg
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        if positions is None:
            before = 0 if cache is None else jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]  # cached tokens
            positions = jnp.maximum(before + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        x = embedding_lookup(self.embed[...], tokens, cfg.dtype)
        run = _run_block if cfg.remat == "none" else _remat_block(_REMAT[cfg.remat])
        if rope is None:
            rope = rope_tables(positions, rope_frequencies(cfg))
        cache_valid = index = None
        if cache is not None:
            index = cache.index
            cache_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = run(block, x, rope, valid, kv, cache_valid, index)
            if cache is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        h = self.final_norm(x)
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v), cache_valid, index + tokens.shape[1])
        return h, cache

    def unembedding(self) -> jax.Array:
        """The output projection as [v, d] (the embedding table when tied)."""
        return self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...].T

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits [b, t, v] from hidden states [b, t, d]."""
        w = self.unembedding().astype(h.dtype)
        logits = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    def __call__(self, tokens, positions=None, valid=None) -> jax.Array:
        return self.logits(self.hidden_states(tokens, positions, valid)[0])
