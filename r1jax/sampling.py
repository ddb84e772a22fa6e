"""The sampler: prefill once, KV-cache decode in `lax.while_loop`s, sampling filters, exact log-probs.

Public: `sample_groups` (token lists in, bucketed shapes, G samples per prompt), `generate` (the
jitted program at exactly the given shapes), `SamplingConfig`, `SampleOutput`, and the per-step
pieces `sample_logits` / `filter_logits`.

Letters: P distinct prompts, G samples per prompt, B = P·G rows, L prompt slots (a bucket), N
max new tokens, V vocab.

Design choices:
* Each distinct prompt is prefilled once; its KV cache and its last-position logits are then
  repeated to its G rows (row `p·G + j` is sample j of prompt p). Prompts are right-padded to L
  slots (`valid` marks real tokens); decode step i writes slot L + i at RoPE position
  `length[p] + i`, so rows of different lengths decode together without shifting.
* Shapes are static and bucketed: `sample_groups` pads the prompt length and the prompt count up
  to powers of two, so a new batch of prompts reuses a compiled program (`trace_count()` counts
  compilations). Decoding runs in `lax.while_loop`s that exit as soon as every row has produced
  a stop token (`SampleOutput.steps` says how many steps ran). The cache grows in doubling
  phases, one loop each (`decode_phases`), because attention reads every slot, filled or not.
* Two log-probs per sampled token (fp32):
  - `logprobs`: under the distribution actually sampled from — logits / temperature, stop tokens
    banned before `min_new_tokens`, then top-k, then top-p (nucleus), renormalised (HF's order: a
    ban after the filters could leave a row nothing to draw). Use it for
    importance-sampling corrections (sampler ≠ trainer distribution). Greedy: 0 (a point mass).
  - `policy_logprobs`: `log_softmax(logits / temperature)` without filters. **Temperature
    convention** (as in DeepSeek-R1 / TRL): the trainer scores completions with its logits divided
    by the sampling temperature, i.e. `r1jax.grpo.token_logprobs(logits, tokens, temperature=T)`
    on a full forward pass; `policy_logprobs` equals exactly that. With T = 1 (R1's setting) it is
    the plain policy log-prob. For greedy decoding the configured temperature still applies.
* Tokens are drawn by inverse CDF in levels, one uniform per row per level (`_draw_levels`): not
  by Gumbel-max, whose B·V random numbers per step cost more than the rest of the step on XLA:CPU.
  One float32 running sum over the whole vocabulary resolves only ≈ 1e-7 of the mass: at Qwen's
  151,936 tokens, tokens of probability 1e-7 were drawn at 0 to 2.4 times their rate, of 1e-8 at 0
  to 12 times (total variation up to 3e-3 from softmax over random logits). So the vocabulary is
  cut into blocks of blocks of at most 64 entries (151,936 → 53 × 54 × 54, padded with zero mass);
  each level draws an entry of the block chosen above it from its entries' masses, so a token's rate
  is off by ≈ 1e-7 of its block of 54's mass, not of the vocabulary's (total variation ≈ 2e-6),
  and no running sum spans V (a third of the time at V = 151,936). The exp also gives the
  log-normaliser, so the unfiltered path does one log-softmax per step. Filters cost nothing when
  off (static config): top-k is `lax.top_k`, top-p sorts only the top-k survivors if top-k is on.
* Runs under the training mesh with the training parameter arrays (no copy): rows are
  constrained to the `batch` logical axis, heads follow the model's own constraints. Random
  draws use the partitionable threefry, so sharded and unsharded runs sample the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.model import init_cache
from r1jax.model.transformer import rope_frequencies, rope_tables
from r1jax.sharding import (
    DEFAULT_RULES,
    constrain,
    decode_rules,
    gather_processes,
    global_rows,
    host_rows,
    row_blocks,
    use_rules,
)

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn; validated on construction (errors name the field).

    max_new_tokens: N, the completion length bound (also the output width).
    temperature: logits are divided by it (> 0). Also sets `policy_logprobs` (module docstring).
    top_k: keep the k most likely tokens (0 = off). Ties with the k-th logit are kept, as in HF.
    top_p: keep the smallest most-likely set whose probability reaches top_p (1.0 = off).
    greedy: argmax instead of sampling (filters then only matter through the min_new_tokens ban).
    eos_ids: token ids that end a completion (EOS and any extra stop ids); the stop token is part
      of the completion (mask True, counted in `lengths`).
    min_new_tokens: stop ids are banned (probability 0) before this many tokens; with
      min_new_tokens ≥ max_new_tokens every row runs full length.
    pad_id: written after a completion's end.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    pad_id: int = 0

    def __post_init__(self):
        if isinstance(self.eos_ids, int):
            object.__setattr__(self, "eos_ids", (self.eos_ids,))
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens!r} must be an int ≥ 1")
        if not (isinstance(self.temperature, int | float) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling.temperature={self.temperature!r} must be a finite number > 0 "
                             "(use greedy=True for argmax decoding)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k!r} must be an int ≥ 0 (0 disables top-k)")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p={self.top_p!r} must be in (0, 1] (1.0 disables top-p)")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"sampling.min_new_tokens={self.min_new_tokens!r} must be an int ≥ 0")
        if any(e < 0 for e in self.eos_ids):
            raise ValueError(f"sampling.eos_ids={self.eos_ids!r} must be non-negative token ids")
        if not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"sampling.pad_id={self.pad_id!r} must be a non-negative token id")

    def replace(self, **changes) -> SamplingConfig:
        return dataclasses.replace(self, **changes)

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise ValueError(f"sampling.top_k={self.top_k} exceeds the vocabulary size {vocab_size}")
        bad = [e for e in (*self.eos_ids, self.pad_id) if e >= vocab_size]
        if bad:
            raise ValueError(f"sampling.eos_ids={self.eos_ids}/pad_id={self.pad_id}: ids {bad} are outside the "
                             f"vocabulary [0, {vocab_size})")


class SampleOutput(NamedTuple):
    """B = P·G rows, prompt-major (row p·G + j is sample j of prompt p)."""

    tokens: jax.Array  # [B, N] int32, pad_id after the end
    mask: jax.Array  # [B, N] bool, True on completion tokens (including the stop token)
    lengths: jax.Array  # [B] int32, completion lengths (= mask.sum(1))
    truncated: jax.Array  # [B] bool, reached max_new_tokens without a stop token
    logprobs: jax.Array  # [B, N] fp32, under the sampled (tempered, filtered) distribution; 0 on padding
    policy_logprobs: jax.Array  # [B, N] fp32, log_softmax(logits / temperature), unfiltered; 0 on padding
    prompt_tokens: jax.Array  # [B, L] int32, right-padded with pad_id
    prompt_mask: jax.Array  # [B, L] bool
    steps: jax.Array  # int32 scalar: token columns sampled (< N when every row stopped early)


# ------------------------------------------------------------------------------------ sampling filters


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Tempered logits with top-k then top-p applied (removed tokens at -inf). [..., V] fp32."""
    x = logits.astype(jnp.float32)
    if config.temperature != 1.0:
        x = x / config.temperature
    return _top_k_top_p(x, config)


def _top_k_top_p(x: jax.Array, config: SamplingConfig) -> jax.Array:
    if config.top_k:
        top = jax.lax.top_k(x, config.top_k)[0]  # [..., k], sorted
        x = jnp.where(x < top[..., -1:], _NEG_INF, x)
    if config.top_p < 1.0:
        # Keep a token iff the mass strictly more likely than it is < top_p (always keeps the top one).
        # After top-k only the k survivors matter: no full-vocabulary sort (slow on XLA:CPU).
        # Top-k keeps ties with the k-th logit, so the k sorted values may not be all it kept: their
        # probabilities are normalised over every kept token.
        sorted_desc = top if config.top_k else -jnp.sort(-x, axis=-1)
        probs = jnp.exp(sorted_desc - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = mass_before < config.top_p
        threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, _NEG_INF, x)
    return x


def _ban(x: jax.Array, ids: tuple[int, ...], when: jax.Array | bool) -> jax.Array:
    banned = jnp.zeros(x.shape[-1], bool).at[jnp.asarray(ids)].set(True)
    return jnp.where(banned & when, _NEG_INF, x)


# The most entries one level of the draw sums over. At 151,936 tokens: 3 levels, total variation ≈ 2e-6 from
# softmax; 2 levels of 390 gave 1e-5 in the same time, 4 of 20 gave 1e-6 in 5 % more.
_FAN_OUT = 64


def _draw_levels(v: int) -> tuple[int, ...]:
    """Entries per level of the draw, top level first: the fewest levels of at most `_FAN_OUT` entries,
    about v^(1/levels) each; their product covers v (the padding has zero mass). 151,936: (53, 54, 54)."""
    levels = 1
    while _ceil_root(v, levels) > _FAN_OUT:
        levels += 1
    s = _ceil_root(v, levels)
    return (-(-v // s ** (levels - 1)), *(s,) * (levels - 1))


def _ceil_root(v: int, k: int) -> int:
    s = max(1, round(v ** (1 / k)))
    while s**k < v:
        s += 1
    while s > 1 and (s - 1) ** k >= v:
        s -= 1
    return s


def _inverse_cdf_draw(x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row from softmax(x) [B, V], by hierarchical inverse CDF; also logsumexp(x) [B].

    One uniform per row and level (`_draw_levels`): the Gumbel-max trick needs B·V random numbers per
    step, which on XLA:CPU costs more than the rest of the sampling step together. The uniforms lie on
    a grid of 2^-24 (jax.random.uniform's is 2^-23). Drawn [B, levels]: under the partitionable threefry
    a row's uniforms then depend on its index alone, not on how many rows there are (padding) nor on how
    they are sharded.
    """
    rows, v = x.shape
    bits = jax.random.bits(key, (rows, len(_draw_levels(v))), jnp.uint32).T
    return _inverse_cdf(x, (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24))


def _inverse_cdf(x: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_inverse_cdf_draw` at given uniforms u [levels, B] in [0, 1).

    Each level draws one entry of the block chosen so far, by inverse CDF over its entries' masses
    (`_first_crossing`: an entry of zero mass — a block of filtered tokens, the padding, a filtered
    token — is never chosen), then descends into it. Each running sum adds up at most `_FAN_OUT`
    entries and resolves ≈ 1e-7 of its block's mass, where one sum over the whole vocabulary resolved
    ≈ 1e-7 of the total. The log-normaliser is the top level's total: every unnormalised probability
    summed once. A row with no mass at all (NaN or -inf logits) draws token V - 1, never the padding.
    """
    rows, v = x.shape
    sizes = _draw_levels(v)
    m = jnp.max(x, axis=-1, keepdims=True)
    if math.prod(sizes) > v:
        x = jnp.pad(x, ((0, 0), (0, math.prod(sizes) - v)), constant_values=_NEG_INF)
    p = jnp.exp(x - m)  # [B, V'] unnormalised probabilities, padded with zeros
    token, total = jnp.zeros(rows, jnp.int32), None
    for level, n in enumerate(sizes):
        width = p.shape[-1] // n  # tokens per entry
        mass = p.reshape(rows, n, width).sum(-1) if width > 1 else p  # [B, n]
        cdf = jnp.cumsum(mass, axis=-1)
        total = cdf[:, -1] if total is None else total
        pick = _first_crossing(mass, cdf, u[level] * cdf[:, -1])
        token = token * n + pick
        if width > 1:  # the chosen entry's tokens: [B, width]
            p = jax.vmap(lambda row, i, w=width: jax.lax.dynamic_slice_in_dim(row, i * w, w))(p, pick)
    return jnp.minimum(token, v - 1), m[:, 0] + jnp.log(total)


def _first_crossing(p: jax.Array, cdf: jax.Array, threshold: jax.Array) -> jax.Array:
    """The first entry of nonzero mass p [B, n] whose running sum cdf passes threshold [B]; where
    none does (threshold rounded up to the total), the last entry of nonzero mass. [B] int32.

    Not the count of cdf ≤ threshold: XLA's cumsum is not monotone to the last bit (on XLA:CPU, one
    running sum over random logits and Qwen's 151,936-word vocabulary dipped by rounding at ≈ 1 step in
    200), and the count then lands on a zero-mass entry for some uniforms (≈ 7e-5 of such draws after
    top-k 50,000).
    """
    hit = (cdf > threshold[:, None]) & (p > 0)
    last = p.shape[-1] - 1 - jnp.argmax(p[:, ::-1] > 0, axis=-1)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last).astype(jnp.int32)


def _pick(x: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]


def sample_logits(
    logits: jax.Array, key: jax.Array, config: SamplingConfig, step: jax.Array | int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row from [B, V] logits: (tokens [B] int32, logprobs [B], policy_logprobs [B]).

    `step` (0-based index of the token being drawn) decides the min_new_tokens ban of stop ids.
    """
    logits = logits.astype(jnp.float32)
    policy = logits / config.temperature if config.temperature != 1.0 else logits
    allowed = policy
    if config.eos_ids and config.min_new_tokens >= config.max_new_tokens:
        allowed = _ban(policy, config.eos_ids, True)
    elif config.eos_ids and config.min_new_tokens > 0:
        allowed = _ban(policy, config.eos_ids, jnp.asarray(step) < config.min_new_tokens)
    filtered = _top_k_top_p(allowed, config)  # after the ban, so that it keeps tokens that can be drawn
    unfiltered = filtered is policy
    if config.greedy:
        tokens = jnp.argmax(filtered, axis=-1).astype(jnp.int32)
        policy_logprobs = _pick(policy, tokens) - jax.nn.logsumexp(policy, axis=-1)
        return tokens, jnp.zeros_like(policy_logprobs), policy_logprobs
    tokens, lse = _inverse_cdf_draw(filtered, key)
    logprobs = _pick(filtered, tokens) - lse
    if unfiltered:  # one log-softmax serves both (the benchmark workload's path)
        return tokens, logprobs, logprobs
    return tokens, logprobs, _pick(policy, tokens) - jax.nn.logsumexp(policy, axis=-1)


# ------------------------------------------------------------------------------------ generation

_trace_count = 0


def trace_count() -> int:
    """How many times the generation program has been traced (≈ compiled) in this process."""
    return _trace_count


def _repeat_rows(x: jax.Array, g: int) -> jax.Array:
    return x if g == 1 else jnp.repeat(x, g, axis=0)


def decode_phases(max_new_tokens: int, first: int | None = None) -> list[int]:
    """Step counts at which the decode cache grows: doubling from `first` up to max_new_tokens.

    Attention reads every slot of the cache at every step, filled or not; growing the cache in
    doubling phases (one decode loop each) bounds the unused slots a step reads. `first` defaults
    to max(32, N / 16): at most 5 loops to compile (128 new tokens: 32, 64, 128).
    """
    end = first or max(32, max_new_tokens // 16)
    ends = []
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    return [*ends, max_new_tokens]


def _generate(graphdef, state, prompt_tokens, prompt_lengths, key, config: SamplingConfig, group_size: int,
              phases: tuple[int, ...]):
    global _trace_count
    _trace_count += 1
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    n_new, g = config.max_new_tokens, group_size
    n_prompts, slots = prompt_tokens.shape
    b = n_prompts * g
    prompt_tokens = constrain(prompt_tokens.astype(jnp.int32), ("batch", "seq"))
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    prompt_mask = jnp.arange(slots)[None, :] < prompt_lengths[:, None]  # [P, L]

    with jax.named_scope("prefill"):
        positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), prompt_tokens.shape)
        cache = init_cache(cfg, n_prompts, slots)
        h, cache = model.hidden_states(prompt_tokens, positions, prompt_mask, cache)
        last = jnp.maximum(prompt_lengths - 1, 0)[:, None, None]
        h_last = jnp.take_along_axis(h, last, axis=1)  # [P, 1, D]
        logits = _repeat_rows(model.logits(h_last)[:, 0], g)  # [B, V]
        cache = cache.repeat_rows(g)  # row p·G + j is sample j of prompt p

    lengths0 = _repeat_rows(prompt_lengths, g)  # [B]
    stop_ids = jnp.asarray(config.eos_ids or (-1,), jnp.int32)

    def is_stop(tokens):
        if not config.eos_ids:
            return jnp.zeros(tokens.shape, bool)
        return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)

    def draw(logits, step, done, out):
        tokens, logp, plogp = sample_logits(logits, jax.random.fold_in(key, step), config, step)
        tokens = jnp.where(done, config.pad_id, tokens)
        logp = jnp.where(done, 0.0, logp)
        plogp = jnp.where(done, 0.0, plogp)
        toks_out, logp_out, plogp_out = out  # [N, B] each: one contiguous row per step
        out = (jax.lax.dynamic_update_index_in_dim(toks_out, tokens, step, 0),
               jax.lax.dynamic_update_index_in_dim(logp_out, logp, step, 0),
               jax.lax.dynamic_update_index_in_dim(plogp_out, plogp, step, 0))
        return tokens, done | is_stop(tokens), ~done, out

    out0 = (jnp.full((n_new, b), config.pad_id, jnp.int32), jnp.zeros((n_new, b), jnp.float32),
            jnp.zeros((n_new, b), jnp.float32))
    out0 = tuple(constrain(o, (None, "batch")) for o in out0)

    # RoPE rows for every slot, computed once: each step gathers its rows (see hidden_states).
    cos_table, sin_table = (t[0, :, 0] for t in rope_tables(jnp.arange(slots + n_new)[None], rope_frequencies(cfg)))

    def body(carry):
        # Draw token `step` from the carried logits, then run it through the model for the next logits.
        step, cache, logits, done, n_tokens, out = carry
        with jax.named_scope("sample"):
            tokens, done_next, counted, out = draw(logits, step, done, out)
        with jax.named_scope("decode"), use_rules(decode_rules()):
            positions = (lengths0 + step)[:, None]  # [B, 1]
            rope = (cos_table[positions][:, :, None], sin_table[positions][:, :, None])  # [B, 1, 1, k/2]
            h, cache = model.hidden_states(tokens[:, None], positions, None, cache, rope)
            logits = model.logits(h)[:, 0]
        return step + 1, cache, logits, done_next, n_tokens + counted.astype(jnp.int32), out

    # Rows of length 0 are batch padding: ended before they start, so they never delay the exit.
    done0 = _repeat_rows(prompt_lengths == 0, g)
    if config.eos_ids and config.min_new_tokens < n_new:
        running = lambda c: ~jnp.all(c[3])
    else:  # no row can stop before N: test once, not per step (with rows sharded, a cross-device all-reduce)
        live = ~jnp.all(done0)
        running = lambda c: live
    carry = (jnp.int32(0), cache, logits, done0, jnp.zeros(b, jnp.int32), out0)
    for end in phases:
        step, cache, *rest = carry
        carry = (step, cache.extended(slots + end), *rest)
        stop = end - 1 if end == n_new else end  # token N-1 is drawn below: no forward after it
        carry = jax.lax.while_loop(lambda c, stop=stop: (c[0] < stop) & running(c), body, carry)
    step, _, logits, done, n_tokens, out = carry
    with jax.named_scope("sample"):  # rows that have ended (all of them after an early exit) draw nothing
        _, done, counted, (toks, logp, plogp) = draw(logits, step, done, out)
    steps, n_tokens = step + jnp.any(counted), n_tokens + counted.astype(jnp.int32)
    return SampleOutput(
        tokens=toks.T, mask=jnp.arange(n_new)[None, :] < n_tokens[:, None], lengths=n_tokens, truncated=~done,
        logprobs=logp.T, policy_logprobs=plogp.T,
        prompt_tokens=_repeat_rows(jnp.where(prompt_mask, prompt_tokens, config.pad_id), g),
        prompt_mask=_repeat_rows(prompt_mask, g), steps=steps,
    )


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "config", "group_size", "phases"))


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    config: SamplingConfig,
    group_size: int = 1,
) -> SampleOutput:
    """Sample `group_size` completions for each of P right-padded prompts, at exactly these shapes.

    prompt_tokens [P, L] int (right-padded), prompt_lengths [P] int in [0, L] (not checked here:
    they may live on device); a row of length 0 is batch padding (all pad, never delays the early
    exit). Compiles once per (P, L, config, group_size); `sample_groups` buckets the shapes and
    checks the lengths. Call it under `jax.set_mesh(mesh)` to run sharded on the mesh the
    parameters live on.
    """
    cfg = _model_config(graphdef, state)
    return _checked_generate(cfg, graphdef, state, prompt_tokens, prompt_lengths, key, config, group_size)


def _checked_generate(cfg, graphdef, state, prompt_tokens, prompt_lengths, key, config, group_size):
    """`generate` for callers that already hold the model's config `cfg` (one merge fewer per call)."""
    config.check_vocab(cfg.vocab_size)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an int ≥ 1")
    if prompt_tokens.ndim != 2 or prompt_lengths.shape != prompt_tokens.shape[:1]:
        raise ValueError(f"prompt_tokens {prompt_tokens.shape} must be [P, L] and prompt_lengths "
                         f"{prompt_lengths.shape} [P]")
    return _generate_jit(graphdef, state, prompt_tokens, prompt_lengths, key, config=config, group_size=group_size,
                         phases=tuple(decode_phases(config.max_new_tokens)))


def _model_config(graphdef: nnx.GraphDef, state: nnx.State):
    """The ModelConfig of a split model, without touching the parameter arrays."""
    return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)).cfg


def bucket(n: int, minimum: int = 16) -> int:
    """The static size used for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, min_length: int = 16, min_batch: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to a bucketed [P', L] array; rows beyond P have length 0 (padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    slots, rows = bucket(int(lengths.max()), min_length), bucket(len(prompts), min_batch)
    tokens = np.full((rows, slots), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.concatenate([lengths, np.zeros(rows - len(prompts), np.int32)])


def sample_groups(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: Sequence[Sequence[int]] | tuple[np.ndarray, np.ndarray],
    group_size: int,
    key: jax.Array,
    config: SamplingConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    min_prompt_length: int = 16,
) -> SampleOutput:
    """G completions per prompt, with bucketed shapes (prompt length and count up to powers of two).

    prompts: token-id lists, or (tokens [P, L] right-padded, lengths [P]). The output has P·G rows
    (padding rows removed), prompt-major. `mesh`: run sharded there with the parameters where they
    already are (rows over the `batch` axis; the prompt count is bucketed so that the rows divide
    evenly over its shards). On several hosts each process passes its own prompts (the same count on
    every one), the rows run on its own devices and it gets back its own P·G rows.
    """
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        tokens, lengths = np.asarray(prompts[0]), np.asarray(prompts[1])
        if lengths.min(initial=1) < 1 or lengths.max(initial=0) > tokens.shape[1]:
            raise ValueError(f"prompt lengths must lie in [1, {tokens.shape[1]}]: got {lengths.tolist()}")
        prompts = [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]
    n_prompts = len(prompts)
    longest = max((len(p) for p in prompts), default=0)
    if mesh is not None and jax.process_count() > 1:  # every process must pad to the same shapes
        counts = gather_processes(np.asarray([[n_prompts, longest]]))
        if np.any(counts[:, 0] != n_prompts):
            raise ValueError(f"every process must sample the same number of prompts: got {counts[:, 0].tolist()}")
        longest = int(counts[:, 1].max())
    cfg = _model_config(graphdef, state)
    max_positions = cfg.max_position_embeddings
    if longest + config.max_new_tokens > max_positions:
        raise ValueError(f"longest prompt {longest} + sampling.max_new_tokens={config.max_new_tokens} exceeds "
                         f"model.max_position_embeddings={max_positions}")
    # The batch shards over which this process's rows spread (all of them on one host). The P·G sample
    # rows must split over them; so must the P prompt rows where the batch spans processes (one process
    # may replicate its prompts instead, see `spec_for`).
    shards = 1 if mesh is None else math.prod(mesh.local_mesh.shape[a] for a in DEFAULT_RULES.mesh_axes("batch"))
    min_prompts = shards if mesh is not None and row_blocks(mesh) > 1 else shards // math.gcd(shards, group_size)
    tokens, lengths = pad_prompts(prompts, config.pad_id, bucket(longest, min_prompt_length), min_prompts)
    real = tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]]
    if real.min() < 0 or real.max() >= cfg.vocab_size:  # the embedding lookup would give NaN rows, silently
        bad = np.unique(real[(real < 0) | (real >= cfg.vocab_size)])[:8].tolist()
        raise ValueError(f"prompt token ids {bad} lie outside the model's vocabulary [0, {cfg.vocab_size})")
    if mesh is None:
        out = _checked_generate(cfg, graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), key, config,
                                group_size)
    else:
        with jax.set_mesh(mesh):
            out = _checked_generate(cfg, graphdef, state, global_rows(tokens, mesh), global_rows(lengths, mesh), key,
                                    config, group_size)
        out = out._replace(**{f: host_rows(getattr(out, f), mesh) for f in SampleOutput._fields if f != "steps"})
    if tokens.shape[0] == n_prompts:
        return out
    rows = n_prompts * group_size
    return out._replace(**{f: getattr(out, f)[:rows] for f in SampleOutput._fields if f != "steps"})
