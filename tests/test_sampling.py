"""The sampler against independent references: full forward passes (no cache), float64 NumPy filters.

A tiny random Qwen2 (2 layers, GQA 4/2, vocab 128) keeps every test fast; references never reuse
the sampler's code paths: completions are re-scored by full forwards over compact (unpadded)
[prompt + completion] rows, and the filtered distributions are rebuilt in float64 NumPy.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import sampling
from r1jax.grpo import token_logprobs
from r1jax.model import abstract_model, get_preset, state_shardings
from r1jax.sampling import SampleOutput, SamplingConfig, sample_groups, sample_logits
from r1jax.sharding import global_rows, make_mesh

CFG = get_preset("tiny-qwen2")
PROMPTS = [[1, 17, 33, 5, 90], [1, 44, 8, 61, 23, 70, 12, 9, 101, 3, 52], [1, 77, 2]]  # lengths 5, 11, 3
N = 12
REF_WIDTH = 32  # ≥ longest prompt + N
GREEDY = SamplingConfig(max_new_tokens=N, greedy=True)
FILTERED = SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def split_model():
    """(graphdef, state) with every parameter random, biases and norm scales included.

    Filled from NumPy into the abstract state: much faster than compiling the model's initialiser.
    """
    graphdef, abstract = abstract_model(CFG)
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif "bias" in name:
            value = 0.1 * rng.standard_normal(x.shape)
        else:
            value = rng.standard_normal(x.shape) / np.sqrt(x.shape[0])
        return jnp.asarray(value, x.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def full_logits(split_model):
    """logits [B, T, V] of a full forward pass (no cache) over right-padded rows."""
    graphdef, state = split_model
    fn = jax.jit(lambda tokens, valid: nnx.merge(graphdef, state)(tokens, valid=valid))
    return lambda tokens, valid: np.asarray(fn(jnp.asarray(tokens), jnp.asarray(valid)), np.float64)


def rescore(full_logits, prompts, out: SampleOutput, group_size: int):
    """Logits [B, N, V] predicting each completion token, from compact [prompt + completion] rows."""
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    rows = [list(prompts[i // group_size]) + tokens[i, mask[i]].tolist() for i in range(len(tokens))]
    width = REF_WIDTH  # one shape, so the reference forward compiles once
    padded = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    logits = full_logits(padded, np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None])
    n = tokens.shape[1]
    out_logits = np.zeros((len(rows), n, CFG.vocab_size))
    for i in range(len(rows)):
        start = len(prompts[i // group_size]) - 1
        k = int(mask[i].sum())
        out_logits[i, :k] = logits[i, start: start + k]
    return out_logits


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def reference_filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """float64 NumPy: softmax(logits / T), keep the top-k, then the smallest set with mass ≥ top_p, renormalise."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(log_softmax64(logits / temperature))
    keep = np.ones_like(probs, bool)
    order = np.argsort(-probs, axis=-1, kind="stable")
    if top_k:
        keep = np.zeros_like(keep)
        np.put_along_axis(keep, order[..., :top_k], True, axis=-1)
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
        kept_sorted = mass_before < top_p
        keep_p = np.zeros_like(keep)
        np.put_along_axis(keep_p, order, kept_sorted, axis=-1)
        probs = np.where(keep_p, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def greedy_reference(full_logits, prompts, n, eos_ids=()):
    """Step-by-step argmax of full forward passes: every step re-runs the whole sequence."""
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    width = REF_WIDTH
    out = [[] for _ in rows]
    for _ in range(n):
        padded = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        lengths = np.array([len(r) for r in rows])
        logits = full_logits(padded, np.arange(width)[None, :] < lengths[:, None])
        for i in range(len(rows)):
            if not done[i]:
                tok = int(np.argmax(logits[i, lengths[i] - 1]))
                rows[i].append(tok)
                out[i].append(tok)
                done[i] = tok in eos_ids
    return out


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", 0.0), ("temperature", float("nan")), ("top_k", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("min_new_tokens", -2), ("eos_ids", (-1,)), ("pad_id", -1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"sampling.{field}"):
        SamplingConfig(**{field: value})


def test_config_checks_ids_against_the_vocabulary(split_model):
    graphdef, state = split_model
    with pytest.raises(ValueError, match="top_k=500"):
        sample_groups(graphdef, state, PROMPTS, 1, jax.random.key(0), SamplingConfig(max_new_tokens=2, top_k=500))
    with pytest.raises(ValueError, match="eos_ids"):
        sample_groups(graphdef, state, PROMPTS, 1, jax.random.key(0), SamplingConfig(max_new_tokens=2, eos_ids=(128,)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sample_groups(graphdef, state, PROMPTS, 1, jax.random.key(0), SamplingConfig(max_new_tokens=250))
    with pytest.raises(ValueError, match=r"prompt token ids \[-1, 128\] lie outside the model's vocabulary \[0, 128\)"):
        sample_groups(graphdef, state, [[5, 128, 7], [-1, 3]], 1, jax.random.key(0), SamplingConfig(max_new_tokens=2))


def test_decode_phases_double_up_to_max_new_tokens():
    assert sampling.decode_phases(12) == [12] and sampling.decode_phases(32) == [32]
    assert sampling.decode_phases(128) == [32, 64, 128] and sampling.decode_phases(100) == [32, 64, 100]
    assert sampling.decode_phases(32768) == [2048, 4096, 8192, 16384, 32768]  # at most 5 loops to compile


def test_bucketed_padding():
    assert [sampling.bucket(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    tokens, lengths = sampling.pad_prompts(PROMPTS, pad_id=0, min_length=8, min_batch=1)
    assert tokens.shape == (4, 16) and lengths.tolist() == [5, 11, 3, 0]
    assert tokens[1, :11].tolist() == PROMPTS[1] and not tokens[1, 11:].any() and not tokens[3].any()


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("first_phase", [32, 4])
def test_greedy_through_the_cache_equals_argmax_of_full_forwards(split_model, full_logits, monkeypatch, first_phase):
    """first_phase 4: the cache grows at steps 4 and 8 (three decode loops), as long generations do."""
    graphdef, state = split_model
    decode_phases = sampling.decode_phases
    monkeypatch.setattr(sampling, "decode_phases", lambda n: decode_phases(n, first_phase))
    assert len(sampling.decode_phases(N)) == (1 if first_phase == 32 else 3)
    out = sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), GREEDY)
    ref = greedy_reference(full_logits, PROMPTS, N)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (6, N)
    for i in range(6):
        assert tokens[i].tolist() == ref[i // 2], f"row {i} (prompt {i // 2})"
    assert np.all(out.mask) and np.all(out.truncated) and np.all(np.asarray(out.lengths) == N)
    assert np.all(np.asarray(out.logprobs) == 0.0)  # greedy samples from a point mass
    # The prompts come back as the trainer needs them: right-padded, with a mask, per completion row.
    assert np.asarray(out.prompt_tokens)[3, :11].tolist() == PROMPTS[1]
    assert np.asarray(out.prompt_mask).sum(1).tolist() == [5, 5, 11, 11, 3, 3]


def test_greedy_decode_equals_transformers_generate(tmp_path):
    """A tiny Llama 3 (llama3 RoPE scaling past its original 16 positions, GQA 4, untied) built and saved by
    transformers: greedy completions of prompts of three lengths, batched, equal `generate` on each prompt
    alone, stopping at the first of two stop ids; policy log-probs equal log_softmax of its logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from r1jax.model import load_hf

    hf_cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    graphdef, state = nnx.split(load_hf(tmp_path))

    def hf_generate(prompt, n, eos):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=list(eos) or None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, 1)[0].double().numpy()
        return out.sequences[0, len(prompt):].tolist(), logits

    n = 16
    free = [hf_generate(p, n, ())[0] for p in PROMPTS]
    stop = (free[0][3], free[2][9])
    out = sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), GREEDY.replace(max_new_tokens=n, eos_ids=stop))
    for i, prompt in enumerate(PROMPTS):
        ref, logits = hf_generate(prompt, n, stop)
        for row in (2 * i, 2 * i + 1):
            length = int(out.lengths[row])
            assert np.asarray(out.tokens)[row, :length].tolist() == ref, f"row {row}"
            assert bool(out.truncated[row]) == (ref[-1] not in stop) and (length == n or ref[-1] in stop)
            policy = np.take_along_axis(log_softmax64(logits), np.asarray(ref)[:, None], -1)[:, 0]
            np.testing.assert_allclose(np.asarray(out.policy_logprobs)[row, :length], policy, atol=1e-5, rtol=0)
    assert int(out.lengths[0]) <= 4


def test_blockwise_prefill_gives_the_same_samples_and_log_probs(split_model):
    """With 4-query attention blocks the prompts' prefill (up to 11 tokens) runs block by block; the
    decode's single queries do not. Same key: the same tokens, log-probs to rounding."""
    graphdef, state = split_model
    blockwise = abstract_model(CFG.replace(attention_block=4))[0]
    one_shot, blocks = (sample_groups(g, state, PROMPTS, 2, jax.random.key(3), FILTERED) for g in (graphdef, blockwise))
    np.testing.assert_array_equal(np.asarray(blocks.tokens), np.asarray(one_shot.tokens))
    for name in ("logprobs", "policy_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(blocks, name)), np.asarray(getattr(one_shot, name)), atol=1e-5)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.9), (1.0, 0, 1.0)])
def test_logprobs_equal_a_full_forward_recompute(split_model, full_logits, temperature, top_k, top_p):
    graphdef, state = split_model
    config = SamplingConfig(max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample_groups(graphdef, state, PROMPTS, 3, jax.random.key(1), config)
    logits = rescore(full_logits, PROMPTS, out, 3)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert mask.all()
    # policy_logprobs: log_softmax(logits / T), unfiltered — what the trainer recomputes (grpo.token_logprobs).
    policy = np.take_along_axis(log_softmax64(logits / temperature), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.policy_logprobs, policy, atol=1e-5, rtol=0)
    trainer = token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens), jnp.asarray(mask),
                             temperature=temperature)
    np.testing.assert_allclose(out.policy_logprobs, trainer, atol=1e-5, rtol=0)
    # logprobs: under the tempered, filtered, renormalised distribution the tokens were drawn from.
    probs = reference_filtered_probs(logits, temperature, top_k, top_p)
    picked = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
    assert np.all(picked > 0), "a token outside the filtered set was sampled"
    np.testing.assert_allclose(out.logprobs, np.log(picked), atol=1e-5, rtol=0)
    if top_k or top_p < 1.0:
        assert np.all(np.asarray(out.logprobs) >= np.asarray(out.policy_logprobs) - 1e-6)
    else:
        np.testing.assert_array_equal(out.logprobs, out.policy_logprobs)
    # The G samples of one prompt share its prefill but are drawn independently.
    assert not np.array_equal(tokens[0], tokens[1])


def test_each_prompt_is_prefilled_once_for_its_group(split_model):
    """The traced program holds [P, L, D] hidden states (prefill) and never [P·G, L, D] ones."""
    graphdef, state = split_model
    tokens, lengths = sampling.pad_prompts(PROMPTS[:2], min_length=16)  # P = 2, L = 16
    program = jax.make_jaxpr(lambda st, t, n: sampling._generate(graphdef, st, t, n, jax.random.key(0), GREEDY,
                                                                 group_size=4, phases=(N,)))
    shapes = set()

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                collect(sub)

    collect(program(state, tokens, lengths).jaxpr)
    assert (2, 16, CFG.hidden_size) in shapes and (8, 16, CFG.hidden_size) not in shapes
    assert (8, 1, CFG.hidden_size) in shapes  # decode runs on all P·G rows


def test_same_key_same_output_other_key_other_output(split_model):
    graphdef, state = split_model
    config = FILTERED
    a = sample_groups(graphdef, state, PROMPTS, 3, jax.random.key(1), config)
    b = sample_groups(graphdef, state, PROMPTS, 3, jax.random.key(1), config)
    c = sample_groups(graphdef, state, PROMPTS, 3, jax.random.key(2), config)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens, c.tokens)


# ------------------------------------------------------------------------------------ filters


FILTER_PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 6, 0.7), (0.5, 0, 0.8), (1.5, 4, 1.0)])
def test_filtered_sampling_frequencies_match_the_renormalised_distribution(temperature, top_k, top_p):
    draws = 40_000
    logits = np.log(FILTER_PROBS)[np.random.default_rng(0).permutation(10)]  # the top tokens are not ids 0, 1, …
    config = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, logits.size))
    tokens, logp, policy_logp = jax.jit(lambda x, k: sample_logits(x, k, config))(batch, jax.random.key(3))
    expected = reference_filtered_probs(logits, temperature, top_k, top_p)
    counts = np.bincount(np.asarray(tokens), minlength=logits.size)
    assert np.all(counts[expected == 0] == 0), "a token outside the top-k / nucleus set was sampled"
    observed = counts / draws
    support = expected > 0
    assert 0.5 * np.abs(observed - expected).sum() < 0.01
    chi2 = float(np.sum((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])))
    assert chi2 < 30.0, f"chi-square {chi2:.1f} with {support.sum() - 1} degrees of freedom"  # p ≈ 1e-4 at df 9
    np.testing.assert_allclose(logp, np.log(expected[np.asarray(tokens)]), atol=1e-5)
    np.testing.assert_allclose(policy_logp, log_softmax64(logits / temperature)[np.asarray(tokens)], atol=1e-5)


def test_generated_first_tokens_follow_each_prompts_filtered_distribution(split_model, full_logits):
    """Through prefill, row repetition and the decode loop: each prompt's G first tokens are draws from
    its own tempered, top-k, top-p distribution (float64, from a full forward), independent across rows."""
    graphdef, state = split_model
    g, prompts = 4096, PROMPTS[:2]
    config = SamplingConfig(max_new_tokens=2, temperature=0.7, top_k=20, top_p=0.9)
    out = sample_groups(graphdef, state, prompts, g, jax.random.key(9), config)
    padded, lengths = sampling.pad_prompts(prompts, min_length=REF_WIDTH)
    logits = full_logits(padded, np.arange(REF_WIDTH)[None, :] < lengths[:, None])
    for i, n in enumerate(lengths):
        expected = reference_filtered_probs(logits[i, n - 1], 0.7, 20, 0.9)
        counts = np.bincount(np.asarray(out.tokens)[i * g:(i + 1) * g, 0], minlength=CFG.vocab_size)
        support, dof = expected > 0, int((expected > 0).sum()) - 1
        assert dof >= 3 and not counts[~support].any(), f"prompt {i}: a filtered-out token was drawn"
        chi2 = float(np.sum((counts[support] - g * expected[support]) ** 2 / (g * expected[support])))
        limit = dof * (1 - 2 / (9 * dof) + 3.72 * np.sqrt(2 / (9 * dof))) ** 3  # P(χ² > limit) ≈ 1e-4 (Wilson–Hilferty)
        assert chi2 < limit, f"prompt {i}: chi-square {chi2:.1f} ≥ {limit:.1f} at {dof} degrees of freedom"


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p():
    logits = jnp.log(jnp.array([[0.05, 0.9, 0.05]]))
    config = SamplingConfig(max_new_tokens=1, top_p=0.5)
    np.testing.assert_array_equal(sampling.filter_logits(logits, config)[0] > -jnp.inf, [False, True, False])
    tokens, logp, _ = sample_logits(logits, jax.random.key(0), config)
    assert int(tokens[0]) == 1 and abs(float(logp[0])) < 1e-7


def test_top_p_after_top_k_counts_the_mass_of_tokens_tied_with_the_kth():
    """Top-k keeps every token tied with the k-th logit; top-p then measures mass over all of them (float64
    rule: keep a token iff the mass of the strictly more likely ones is < top_p). Normalising over the k
    sorted values alone overstated the top token's mass (0.73 for 0.58) and dropped both tied tokens."""
    logits = np.array([1.0, 2.0, -5.0, 1.0, 0.0])  # top-2 keeps ids 1, 0 and 3 (tied with the 2nd)
    probs = np.exp(logits[[1, 0, 3]] - np.log(np.exp(logits[[1, 0, 3]]).sum()))
    mass_before = {1: 0.0, 0: probs[0], 3: probs[0]}  # tied tokens: only the top one is strictly more likely
    config = SamplingConfig(max_new_tokens=1, top_k=2, top_p=0.7)
    kept = np.asarray(sampling.filter_logits(jnp.asarray(logits[None], jnp.float32), config)[0]) > -np.inf
    np.testing.assert_array_equal(np.flatnonzero(kept), sorted(i for i, m in mass_before.items() if m < 0.7))


# ------------------------------------------------------------------------------------ stopping


@pytest.fixture(scope="module")
def greedy_free(split_model):
    """Greedy completions without stop tokens (what the stop-token tests stop early)."""
    graphdef, state = split_model
    return np.asarray(sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), GREEDY).tokens)[::2]


def first_index(row, ids):
    hits = [i for i, t in enumerate(row) if t in ids]
    return hits[0] if hits else None


def test_eos_and_extra_stop_ids_end_rows_with_masks_lengths_and_truncation(split_model, greedy_free, full_logits):
    graphdef, state = split_model
    stop = (int(greedy_free[0, 4]), int(greedy_free[1, 6]))  # an "eos" and an extra stop id
    config = GREEDY.replace(eos_ids=stop, pad_id=0)
    out = sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), config)
    np.testing.assert_array_equal(out.tokens[::2], out.tokens[1::2])  # greedy: the G samples agree
    out = jax.tree.map(lambda x: x[::2] if x.ndim else x, out)
    ref = greedy_reference(full_logits, PROMPTS, N, eos_ids=stop)
    for i, row in enumerate(greedy_free):
        end = first_index(row.tolist(), stop)
        length = N if end is None else end + 1
        assert int(out.lengths[i]) == length == len(ref[i])
        assert bool(out.truncated[i]) == (end is None)
        assert np.asarray(out.tokens)[i, :length].tolist() == ref[i]  # the stop token is kept
        assert np.all(np.asarray(out.tokens)[i, length:] == 0)
        assert np.asarray(out.mask)[i].tolist() == [j < length for j in range(N)]
        assert np.all(np.asarray(out.policy_logprobs)[i, length:] == 0.0)
    assert int(out.lengths[0]) <= 5 and not bool(out.truncated[0])


def test_loop_exits_early_once_every_row_has_stopped(split_model, greedy_free):
    graphdef, state = split_model
    stop = tuple(sorted({int(t) for t in greedy_free[:, 1]}))  # every row has a stop token by its 2nd token
    out = sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), GREEDY.replace(eos_ids=stop))
    ends = [first_index(row.tolist(), stop) + 1 for row in greedy_free]
    assert out.lengths[::2].tolist() == ends and max(ends) <= 2
    assert int(out.steps) == max(ends) < N  # the decode loop ran only as long as needed
    assert int(sample_groups(graphdef, state, PROMPTS, 2, jax.random.key(0), GREEDY).steps) == N


def test_batch_of_padding_rows_runs_no_step(split_model):
    """Also where no row can stop early (no stop ids; stops banned to the end), whose loop tests no row."""
    graphdef, state = split_model
    tokens, lengths = jnp.zeros((2, 16), jnp.int32), jnp.zeros(2, jnp.int32)
    for config in (GREEDY, GREEDY.replace(eos_ids=(2,)), GREEDY.replace(eos_ids=(2,), min_new_tokens=N)):
        out = sampling.generate(graphdef, state, tokens, lengths, jax.random.key(0), config)
        assert int(out.steps) == 0 and not np.any(out.mask)


def test_min_new_tokens_bans_stop_ids_until_reached(split_model, greedy_free):
    graphdef, state = split_model
    stop = tuple(sorted({int(t) for t in greedy_free[:, 1]}))
    config = SamplingConfig(max_new_tokens=N, temperature=1.0, eos_ids=stop, min_new_tokens=5)
    out = sample_groups(graphdef, state, PROMPTS, 4, jax.random.key(5), config)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    assert np.all(lengths >= 5) and np.any(lengths < N)  # stop tokens do end rows, but only from the 5th on
    assert not np.isin(tokens[:, :4], stop).any()
    # The renormalised distribution excludes the banned ids: logprobs differ from the policy's there.
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((4, 128)), jnp.float32)
    for step, banned in ((0, True), (4, True), (5, False)):
        _, logp, policy = sample_logits(logits, jax.random.key(0), config, step)
        assert np.all(np.asarray(logp) > np.asarray(policy)) == banned


def test_min_new_tokens_at_least_max_new_tokens_forces_full_length():
    stop = (3, 7)
    config = SamplingConfig(max_new_tokens=4, eos_ids=stop, min_new_tokens=4)
    logits = jnp.zeros((20_000, 8)).at[:, 3].set(5.0)  # the stop token would be drawn almost always
    tokens, logp, _ = jax.jit(lambda x, k: sample_logits(x, k, config, 3))(logits, jax.random.key(0))
    assert not np.isin(np.asarray(tokens), stop).any()
    np.testing.assert_allclose(logp, np.log(1 / 6), atol=1e-6)  # uniform over the 6 allowed ids


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 0.05}, {"top_k": 1, "greedy": True},
                                     {"top_p": 0.05, "greedy": True}])
def test_the_stop_id_ban_comes_before_top_k_and_top_p(filters):
    """As in HF, the filters choose among the tokens that may be drawn: banned after them, a stop id that
    was the only kept token left nothing to draw (token 0 with a NaN log-prob)."""
    raw = np.array([0.0, 1.0, 2.0, 5.0, 0.5])  # the stop id 3 is the most likely token
    logits = jnp.asarray(raw[None], jnp.float32)
    config = SamplingConfig(max_new_tokens=8, eos_ids=(3,), min_new_tokens=2, **filters)
    tokens, logp, policy = sample_logits(logits, jax.random.key(0), config, 0)
    assert int(tokens[0]) == 2 and abs(float(logp[0])) < 1e-7  # the best allowed token, kept alone
    np.testing.assert_allclose(policy, log_softmax64(raw)[2], atol=1e-6)
    tokens, logp, _ = sample_logits(logits, jax.random.key(0), config, 2)  # the ban is over
    assert int(tokens[0]) == 3 and abs(float(logp[0])) < 1e-7


def test_the_inverse_cdf_never_lands_on_a_zero_mass_token_where_the_running_sum_dips():
    p = jnp.asarray([[0.5, 0.0, 0.5, 0.0]])
    cdf = jnp.asarray([[0.5, np.nextafter(np.float32(0.5), np.float32(0)), 1.0, 1.0]])  # a rounding dip at token 1
    for threshold, expected in ((0.25, 0), (float(cdf[0, 1]), 0), (0.5, 2), (0.99, 2), (1.0, 2)):
        assert int(sampling._first_crossing(p, cdf, jnp.asarray([threshold], jnp.float32))[0]) == expected, threshold


def test_the_draw_never_chooses_a_block_or_token_of_zero_mass():
    """Blocks of filtered tokens and the padding past V are never chosen, nor a filtered token inside a chosen
    block; the uniforms' extremes draw the first and the last token of nonzero mass."""
    v = 128
    sizes = sampling._draw_levels(v)
    assert len(sizes) == 2 and sizes[0] * sizes[1] > v  # blocks, and padding in the last one
    kept = np.asarray([13, 15, 40, 41, 45, 90])  # blocks of 12: 1, 3 and 7 hold mass, the others none
    logits = np.full(v, -np.inf, np.float32)
    logits[kept] = np.random.default_rng(0).standard_normal(kept.size)
    x = jnp.asarray(logits[None])
    draw = jax.jit(lambda x, u: sampling._inverse_cdf(x, u)[0])
    assert int(draw(x, jnp.zeros((2, 1)))[0]) == 13
    assert int(draw(x, jnp.ones((2, 1)))[0]) == 90  # threshold = total: the last entry of nonzero mass, twice
    u = jax.random.uniform(jax.random.key(0), (2, 20_000))
    tokens = np.asarray(draw(jnp.broadcast_to(x, (20_000, v)), u))
    assert set(np.unique(tokens).tolist()) == set(kept.tolist())


def test_a_rows_draw_depends_on_its_index_alone_and_stays_in_the_vocabulary():
    """A row draws the same token whatever rows follow it (padding to another bucket, another mesh's
    share), at every level of a three-level draw; a row with no mass (NaN or -inf logits, e.g. diverged
    weights) draws a real token id, V - 1, not one of the padding past V."""
    v = 151_936
    assert len(sampling._draw_levels(v)) == 3
    x = jax.random.normal(jax.random.key(1), (8, v)) * 3
    key = jax.random.key(2)
    np.testing.assert_array_equal(np.asarray(sampling._inverse_cdf_draw(x[:3], key)[0]),
                                  np.asarray(sampling._inverse_cdf_draw(x, key)[0])[:3])
    dead = jnp.stack([jnp.full(v, jnp.nan), jnp.full(v, -jnp.inf)])
    for width in (v, 65, 4097):
        tokens = np.asarray(sampling._inverse_cdf_draw(dead[:, :width], key)[0])
        assert (tokens == width - 1).all(), (width, tokens)


def drawn_probability(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The exact probability that the sampler draws each token from one row of logits [V]: each level's uniform
    takes the 2^24 values k·2^-24, and the entry a level chooses is monotone in its uniform. Level by level (top
    first, the levels above held inside the token's path), bisection finds the interval of k that keeps to the
    token's path; the probability is the product of the intervals' widths."""
    sizes, grid = sampling._draw_levels(logits.size), 1 << 24
    n = len(tokens)
    draw = jax.jit(lambda x, u: sampling._inverse_cdf(jnp.broadcast_to(x, (2 * n, x.shape[-1])), u)[0])
    x, u, prob = jnp.asarray(logits[None]), np.full((len(sizes), 2 * n), grid // 2), np.ones(n)
    for level in range(len(sizes)):
        span = int(np.prod(sizes[level + 1:]))  # tokens under one entry of this level
        target = np.concatenate([tokens // span, tokens // span + 1])  # [first k reaching the entry, first past it]
        lo, hi = np.zeros(2 * n, np.int64), np.full(2 * n, grid)
        for _ in range(25):  # smallest k with drawn entry ≥ target
            mid = (lo + hi) // 2
            u[level] = np.minimum(mid, grid - 1)
            reached = np.asarray(draw(x, jnp.asarray(u / grid, jnp.float32))) // span >= target
            reached |= mid == grid
            lo, hi = np.where(reached, lo, mid + 1), np.where(reached, mid, hi)
        prob *= (hi[n:] - hi[:n]) / grid
        u[level] = np.minimum(np.concatenate([hi[:n], hi[:n]]), grid - 1)  # inside the token's entry
    return prob


def test_rare_tokens_are_drawn_at_their_probability_at_qwen_vocabulary_size():
    """At V = 151,936 one float32 running sum over the vocabulary resolves ~1e-7 of the mass: tokens of
    probability 1e-9 … 1e-6 were drawn at 0 to 70 times their rate (σ = 2 logits; total variation 3e-3).
    The draw by levels resolves each token's rate to about 1e-7 of its block of 54: within 10 % at 1e-9,
    2 % from 1e-8 on."""
    v = 151_936
    rng = np.random.default_rng(0)
    logits = (2.0 * rng.standard_normal(v)).astype(np.float32)
    probs = np.exp(log_softmax64(logits))
    tokens = np.concatenate([rng.choice(np.flatnonzero((probs >= lo) & (probs < 10 * lo)), 16, replace=False)
                             for lo in (1e-9, 1e-8, 1e-7)])
    ratio = drawn_probability(logits, tokens) / probs[tokens]
    tolerance = np.where(probs[tokens] < 1e-8, 0.1, 0.02)
    assert np.all(np.abs(ratio - 1) < tolerance), list(zip(probs[tokens], ratio, strict=True))


# ------------------------------------------------------------------------------------ shapes and meshes


def test_new_prompt_lengths_and_counts_in_a_bucket_do_not_recompile(split_model):
    graphdef, state = split_model
    key = jax.random.key(0)
    sample_groups(graphdef, state, PROMPTS, 3, key, FILTERED)  # 3 prompts ≤ 16 tokens: compiled here or earlier
    first = sampling.trace_count()
    sample_groups(graphdef, state, [[1] * 16, [2] * 7, [3], [4] * 12], 3, key, FILTERED)  # other lengths, 4 prompts
    out = sample_groups(graphdef, state, [[1] * 5, [9] * 3, [7] * 14], 3, key, FILTERED)
    assert sampling.trace_count() == first and out.tokens.shape == (9, N)  # same buckets: 16 slots, 4 prompts
    sample_groups(graphdef, state, [[1] * 17, [2] * 3, [5] * 8], 3, key, FILTERED)  # 17 tokens -> 32 slots
    assert sampling.trace_count() == first + 1


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((4, 1, 2), marks=pytest.mark.slow)])
def test_sharded_output_equals_unsharded(split_model, mesh_shape):
    graphdef, state = split_model
    mesh = make_mesh(*mesh_shape)
    sharded_state = jax.device_put(state, state_shardings(state, mesh))  # as init_model(cfg, seed, mesh) places it
    assert "tensor" in sharded_state["layers"][0]["attn"]["q"][...].sharding.spec
    ref = sample_groups(graphdef, state, PROMPTS, 4, jax.random.key(7), FILTERED)
    out = sample_groups(graphdef, sharded_state, PROMPTS, 4, jax.random.key(7), FILTERED, mesh=mesh)
    assert set(out.tokens.sharding.device_set) == set(mesh.devices.flat)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.mask, ref.mask)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.policy_logprobs, ref.policy_logprobs, atol=1e-5, rtol=0)


def test_decode_on_an_fsdp_mesh_gathers_no_weight_per_step(split_model):
    """Weights split over `fsdp` stay in place during decode: inside the decode loop XLA all-gathers
    activations only (with rows split over `fsdp` too it gathered every weight at every step), and the
    samples equal the unsharded ones."""
    graphdef, state = split_model
    mesh = make_mesh(1, 8, 1)
    sharded_state = jax.device_put(state, state_shardings(state, mesh))
    ref = sample_groups(graphdef, state, PROMPTS, 4, jax.random.key(7), FILTERED)
    out = sample_groups(graphdef, sharded_state, PROMPTS, 4, jax.random.key(7), FILTERED, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.policy_logprobs, ref.policy_logprobs, atol=1e-5, rtol=0)

    tokens, lengths = sampling.pad_prompts(PROMPTS, min_batch=8)
    with jax.set_mesh(mesh):
        hlo = sampling._generate_jit.lower(
            graphdef, sharded_state, global_rows(tokens, mesh), global_rows(lengths, mesh), jax.random.key(7),
            config=FILTERED, group_size=4, phases=tuple(sampling.decode_phases(N))).compile().as_text()
    in_loop = [line for line in hlo.splitlines()
               if (" all-gather(" in line or " all-gather-start(" in line) and "while/body" in line]
    assert in_loop  # the check reads the loop's collectives (activations are gathered there)
    weight_shapes = {tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim > 1}
    gathered = {tuple(int(d) for d in re.search(r"= \(?\w+\[([\d,]*)\]", line).group(1).split(",") if d)
                for line in in_loop}
    assert not gathered & weight_shapes, gathered & weight_shapes
