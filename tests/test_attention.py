"""Blockwise attention (model/attention.py): float64 NumPy values, the one-shot form's gradients, whole-model
log-probs and gradients, 8 fake devices, and the memory it exists to save."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.model import abstract_model, get_preset
from r1jax.model.attention import attention
from r1jax.sharding import make_mesh
from r1jax.trainers.steps import completion_logprobs


def numpy_attention(q, keys, values, q_slot, key_valid):
    """float64 reference: softmax over the visible slots (s ≤ slot, valid) of q·k/√k, times v."""
    q, keys, values = (np.asarray(x, np.float64) for x in (q, keys, values))
    scores = np.einsum("bgrtk,bgks->bgrts", q, keys) / np.sqrt(q.shape[-1])
    visible = (np.arange(keys.shape[3])[None, :] <= np.asarray(q_slot)[:, None])[None] & np.asarray(key_valid)[:, None]
    scores = np.where(visible[:, None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bgrts,bgsk->bgrtk", probs / probs.sum(-1, keepdims=True), values)


def case(t, s, index, seed=0, b=2, g=2, r=3, k=8):
    """Queries at slots index … index+t−1 over s key slots, some keys invalid (prompt padding), one
    padding query (row 1); returns arrays and which queries are real tokens."""
    rng = np.random.default_rng(seed)
    q, keys, values = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                       for shape in ((b, g, r, t, k), (b, g, k, s), (b, g, s, k)))
    valid = rng.random((b, s)) > 0.3
    valid[:, index:index + t] = True
    valid[1, index + 3] = False
    return q, keys, values, index + jnp.arange(t), jnp.asarray(valid), valid[:, index:index + t]


# (queries, key slots, first query slot, block): ragged last blocks; queries after a prompt (the GRPO
# completion pass, and more key blocks than query blocks); whole blocks, no padding
CASES = [(37, 37, 0, 8), (40, 57, 17, 16), (9, 30, 21, 4), (64, 64, 0, 16)]


@pytest.mark.parametrize("t,s,index,block", CASES)
def test_blockwise_values_equal_float64_and_gradients_equal_one_shot_autodiff(t, s, index, block):
    q, keys, values, q_slot, key_valid, real = case(t, s, index)
    out = attention(q, keys, values, q_slot, key_valid, block=block)
    ref = numpy_attention(q, keys, values, q_slot, key_valid)
    mask = real[:, None, None, :, None]
    np.testing.assert_allclose(np.where(mask, np.asarray(out), 0), np.where(mask, ref, 0), rtol=0, atol=2e-6)
    assert np.all(np.isfinite(np.asarray(out)))  # padding queries too

    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(q, keys, values, block):
        return jnp.sum(jnp.where(mask, attention(q, keys, values, q_slot, key_valid, block=block) * weights, 0.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for name, got, want in zip("qkv", grad(q, keys, values, block), grad(q, keys, values, 0), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * np.abs(want).max(),
                                   err_msg=name)


def test_blockwise_on_a_2x2x2_mesh_equals_one_device():
    q, keys, values, q_slot, key_valid, _ = case(40, 57, 17, b=4, g=2)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    @jax.jit
    def value_and_grad(q, keys, values, key_valid):
        f = lambda q, keys, values: jnp.sum(attention(q, keys, values, q_slot, key_valid, block=16) * weights)
        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, keys, values)

    want = value_and_grad(q, keys, values, key_valid)
    mesh = make_mesh(2, 2, 2)
    rows_heads = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
    with jax.set_mesh(mesh):
        got = value_and_grad(*map(rows_heads, (q, keys, values)), jax.device_put(
            key_valid, NamedSharding(mesh, P(("data", "fsdp")))))
    assert got[1][0].sharding.spec[:2] == (("data", "fsdp"), "tensor")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * np.abs(np.asarray(b)).max())


def grpo_rows(cfg, prompt_len=12, new_tokens=40, groups=2, group=3, seed=0):
    """Right-padded prompts (lengths 5 and 12), completions with padding after an early end."""
    rng = np.random.default_rng(seed)
    rows = groups * group
    prompt = np.repeat(rng.integers(3, cfg.vocab_size, (groups, prompt_len)), group, axis=0)
    prompt_mask = np.ones((rows, prompt_len), bool)
    prompt_mask[:group, 5:] = False
    mask = np.ones((rows, new_tokens), bool)
    mask[1, 17:] = False
    tokens = rng.integers(3, cfg.vocab_size, (rows, new_tokens))
    return {"prompt_tokens": jnp.asarray(np.where(prompt_mask, prompt, 0)), "prompt_mask": jnp.asarray(prompt_mask),
            "tokens": jnp.asarray(np.where(mask, tokens, 0)), "mask": jnp.asarray(mask)}


CFG = get_preset("tiny-qwen2", attention_block=0)
BATCH = grpo_rows(CFG)
WEIGHTS = jnp.asarray(np.random.default_rng(2).standard_normal(BATCH["mask"].shape), jnp.float32)


@functools.cache
def log_probs_and_gradients(prompt_run: int, attention_block: int = 0, dtype: str = "float32"):
    """tiny-qwen2's GRPO log-probs of BATCH's completion tokens and the gradients of a weighted sum of them."""
    graphdef, abstract = abstract_model(CFG.replace(attention_block=attention_block, dtype=dtype))
    rng = np.random.default_rng(0)  # the same parameters for every variant, drawn on the host: no init program
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)

    def f(params):
        logp = completion_logprobs(nnx.merge(graphdef, params), BATCH, prompt_run=prompt_run, chunk_size=16)
        return jnp.sum(jnp.where(BATCH["mask"], WEIGHTS * logp, 0.0)), logp

    (_, logp), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return np.asarray(logp)[np.asarray(BATCH["mask"])], [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


@pytest.mark.parametrize("prompt_run", [1, 3])
def test_model_log_probs_and_gradients_equal_with_and_without_blocks(prompt_run):
    """tiny-qwen2 with 8-query blocks against one-shot attention: the GRPO log-probs (one pass per row, or
    each prompt once per group) and their gradients."""
    logp0, grads0 = log_probs_and_gradients(prompt_run)
    logp1, grads1 = log_probs_and_gradients(prompt_run, attention_block=8)
    np.testing.assert_allclose(logp1, logp0, rtol=0, atol=1e-5)
    for a, b in zip(grads1, grads0, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_in_bf16_blockwise_is_as_close_to_fp32_as_one_shot():
    """bf16 compute (the TPU/GPU setting) rounds both forms: each is compared with the fp32 model."""
    logp32, grads32 = log_probs_and_gradients(3)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads32))
    errors = {}
    for block in (0, 8):
        logp, grads = log_probs_and_gradients(3, attention_block=block, dtype="bfloat16")
        grad_err = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(grads, grads32, strict=True))) / norm
        errors[block] = (np.mean(np.abs(logp - logp32)), grad_err)
    assert 0 < errors[0][0] < 1e-3 and 0 < errors[0][1] < 2e-2, errors  # bf16 really rounds, and not wildly
    assert errors[8][0] < 1.5 * errors[0][0] and errors[8][1] < 1.5 * errors[0][1], errors


def compiled_gradient_temp_bytes(cfg, tokens) -> int:
    graphdef, params = abstract_model(cfg)  # shapes suffice: the program is compiled, not run
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).hidden_states(tokens)[0])
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_long_rows_hold_score_tiles_not_all_scores():
    """The compiled gradient of a 2 × 1024-token pass: XLA's own memory report, one-shot against 128-query
    blocks. One-shot keeps every layer's [b, h, t, s] fp32 probabilities for the backward pass (2 layers
    × 2 × 4 × 1024² × 4 bytes = 67 MB); blockwise keeps the log-sum-exp and recomputes tiles."""
    cfg = get_preset("tiny-qwen2", max_position_embeddings=1024)
    tokens = jnp.zeros((2, 1024), jnp.int32)
    one_shot = compiled_gradient_temp_bytes(cfg.replace(attention_block=0), tokens)
    blockwise = compiled_gradient_temp_bytes(cfg.replace(attention_block=128), tokens)
    assert one_shot > 67e6, one_shot
    assert blockwise < one_shot / 5, (blockwise, one_shot)
