"""The transformer against HF transformers (torch CPU): logits, KV-cache decode, export round trip."""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import KVCache, get_preset, init_cache, init_model, load_hf, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4

# Four tiny configs: Qwen2 (bias, tied) and Llama (untied, Llama-3 rope scaling) with GQA ratios 2 and 4,
# plus MHA with a head_dim that differs from hidden/heads, and Llama with attention bias.
HF_CONFIGS = {
    "qwen2_bias_tied_gqa2": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_rope3_gqa4": ("Llama", dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "qwen2_untied_mha_headdim": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                                 tie_word_embeddings=False, rope_theta=1e6)),
    "llama_bias_tied_gqa2": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                           tie_word_embeddings=True)),
}


def make_hf_model(kind: str, overrides: dict, folder, seed: int = 0):
    cfg_cls = getattr(transformers, f"{kind}Config")
    model_cls = getattr(transformers, f"{kind}ForCausalLM")
    cfg = cfg_cls(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                  max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random everything, so biases and norms matter too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.array(tokens))).logits.float().numpy()


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    kind, overrides = HF_CONFIGS[request.param]
    hf = make_hf_model(kind, overrides, folder)
    return hf, load_hf(folder), folder


def tokens(batch=2, length=40, seed=1):
    return np.random.default_rng(seed).integers(0, 128, (batch, length))


def test_full_forward_matches_hf(hf_pair):
    hf, model, _ = hf_pair
    x = tokens()
    assert rel_err(model(jnp.asarray(x)), hf_logits(hf, x)) <= TOL


def test_padded_rows_match_hf_on_each_row(hf_pair):
    """Right and left padding: each row's real tokens give the logits HF gives the unpadded row."""
    hf, model, _ = hf_pair
    x = tokens(2, 20)
    lens = [20, 13]
    right = x.copy()
    right[1, 13:] = 0
    valid_r = np.arange(20)[None, :] < np.array(lens)[:, None]
    left = np.zeros_like(x)
    left[0] = x[0]
    left[1, 7:] = x[1, :13]
    valid_l = valid_r[:, ::-1]
    out_r = np.asarray(model(jnp.asarray(right), valid=jnp.asarray(valid_r)))
    out_l = np.asarray(model(jnp.asarray(left), valid=jnp.asarray(valid_l)))
    ref1 = hf_logits(hf, x[1:, :13])[0]
    assert rel_err(out_r[1, :13], ref1) <= TOL
    assert rel_err(out_l[1, 7:], ref1) <= TOL
    assert rel_err(out_r[0], hf_logits(hf, x[:1])[0]) <= TOL


def test_prefill_then_decode_through_cache_matches_hf(hf_pair):
    hf, model, _ = hf_pair
    x = tokens(2, 24, seed=2)
    ref = hf_logits(hf, x)
    prefill = 7
    cache = init_cache(model.cfg, batch=2, length=32)
    step = jax.jit(lambda tok, pos, c: model.hidden_states(tok, pos, None, c))
    h, cache = step(jnp.asarray(x[:, :prefill]), jnp.broadcast_to(jnp.arange(prefill), (2, prefill)), cache)
    assert isinstance(cache, KVCache) and int(cache.index) == prefill
    got = [np.asarray(model.logits(h))]
    for t in range(prefill, x.shape[1]):
        h, cache = step(jnp.asarray(x[:, t:t + 1]), jnp.full((2, 1), t), cache)
        got.append(np.asarray(model.logits(h)))
    assert rel_err(np.concatenate(got, axis=1), ref) <= TOL


def test_default_positions_through_the_cache_count_the_cached_tokens():
    """Without positions, a token's RoPE position is the count of real tokens before it, the cached ones
    included: left-padded prompts of two lengths prefilled, then decoded one token at a time, give each
    row the logits of a full forward over its unpadded tokens (decode steps read position 0 before)."""
    model = init_model(get_preset("tiny-llama"), seed=0)
    x = tokens(2, 14, seed=4)
    lens, width = np.array([9, 5]), 9
    left, valid = np.zeros((2, width), np.int64), np.arange(width)[None, :] >= width - lens[:, None]
    for i, n in enumerate(lens):
        left[i, width - n:] = x[i, :n]
    cache = init_cache(model.cfg, batch=2, length=width + 5)
    h, cache = model.hidden_states(jnp.asarray(left), valid=jnp.asarray(valid), cache=cache)
    got = [np.asarray(model.logits(h))[np.arange(2), -1]]
    for t in range(5):
        h, cache = model.hidden_states(jnp.asarray(x[np.arange(2), lens + t][:, None]), cache=cache)
        got.append(np.asarray(model.logits(h))[:, 0])
    for i, n in enumerate(lens):
        ref = np.asarray(model(jnp.asarray(x[i:i + 1, :n + 5])))[0, n - 1:]
        assert rel_err(np.stack(got, 1)[i], ref) <= TOL, f"row {i}"


def test_export_round_trip_loads_in_transformers(hf_pair, tmp_path):
    _, model, src = hf_pair
    out = save_hf(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens(2, 16, seed=3)
    assert rel_err(model(jnp.asarray(x)), hf_logits(reloaded, x)) <= TOL
    assert type(reloaded).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]


def test_sharded_export_writes_index_and_reloads(tmp_path):
    model = init_model(get_preset("tiny-llama"), seed=0)
    out = save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_hf(out)
    x = jnp.asarray(tokens(1, 8))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert rel_err(model(x), hf_logits(hf, np.asarray(x))) <= TOL


def test_export_over_an_earlier_export_leaves_only_the_new_weights(tmp_path):
    """Sharded after single and single after sharded: the earlier files would shadow the new weights
    (transformers prefers model.safetensors, load_hf the index), so they go; the special ids of a
    tokenizer reach config.json and generation_config.json."""
    old, new = (init_model(get_preset("tiny-llama"), seed=s) for s in (0, 1))
    x = jnp.asarray(tokens(1, 8))
    for first, second in (({}, {"max_shard_bytes": 40_000}), ({"max_shard_bytes": 40_000}, {})):
        out = tmp_path / f"export{len(first)}"
        save_hf(old, out, **first)
        (out / "notes.safetensors.txt").write_text("kept")  # not a weight file of ours
        save_hf(new, out, tokenizer=types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0), **second)
        assert (out / "model.safetensors.index.json").exists() == bool(second) != (out / "model.safetensors").exists()
        assert (out / "notes.safetensors.txt").exists()
        np.testing.assert_array_equal(np.asarray(load_hf(out)(x)), np.asarray(new(x)))
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert rel_err(new(x), hf_logits(hf, np.asarray(x))) <= TOL
        generation = transformers.GenerationConfig.from_pretrained(out)
        assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
        assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)


def test_special_ids_in_extra_config_win_over_the_tokenizers_in_both_files(tmp_path):
    """extra_config is the explicit choice (Llama 3 Instruct stops at a list of EOS ids, its tokenizer names one):
    its special ids win in config.json and generation_config.json; the same ids as the tokenizer's are no error."""
    model, tok = init_model(get_preset("tiny-llama"), seed=0), types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0)
    out = save_hf(model, tmp_path / "same", tokenizer=tok, extra_config={"eos_token_id": 2, "pad_token_id": 0})
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    out = save_hf(model, tmp_path / "list", tokenizer=tok, extra_config={"eos_token_id": [2, 5], "use_cache": False})
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"], config["use_cache"]) == (
        1, [2, 5], 0, False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert (hf.generation_config.bos_token_id, hf.generation_config.eos_token_id) == (1, [2, 5])


def test_export_without_tokenizer_removes_an_earlier_generation_config(tmp_path):
    """transformers takes the stop ids of generate() from generation_config.json over config.json: one left by an
    earlier export with another tokenizer would stop generation at its EOS, so an export that writes none removes
    it (as save_pretrained rewrites it); files of others stay."""
    model = init_model(get_preset("tiny-llama"), seed=0)
    out = save_hf(model, tmp_path / "export", tokenizer=types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0))
    (out / "tokenizer.json").write_text("{}")
    save_hf(model, out, extra_config={"eos_token_id": 7})
    assert not (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == 7


def test_a_failed_export_leaves_the_previous_export_as_it_was(tmp_path, monkeypatch):
    """A full disk halfway through the weights, or a config value JSON cannot write: the new files are
    written aside and moved in only when all are complete, so the earlier export still loads, unchanged."""
    import r1jax.model.hf as hf_module

    old, new = (init_model(get_preset("tiny-llama"), seed=s) for s in (0, 1))
    out = save_hf(old, tmp_path / "export", tokenizer=types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_save_file, calls, fail_at = hf_module.save_file, [], [0]

    def disk_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < fail_at[0]:
            return real_save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_module, "save_file", disk_full)
    for kwargs, fail_at[0] in (({}, 1), ({"max_shard_bytes": 40_000}, 2)):  # the single file; the second shard
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            save_hf(new, out, **kwargs)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    monkeypatch.setattr(hf_module, "save_file", real_save_file)
    with pytest.raises(TypeError, match="int64"):
        save_hf(new, out, extra_config={"eos_token_id": np.int64(2)})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    x = jnp.asarray(tokens(1, 8))
    np.testing.assert_array_equal(np.asarray(load_hf(out)(x)), np.asarray(old(x)))
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = out / f".save_hf-{gone.stdout.strip()}@{host}-x1"  # an export killed mid-write (no `finally` ran)
    running = [out / f".save_hf-{os.getpid()}@{host}-x2", out / ".save_hf-123@another-host-x3"]  # may be writing
    for staging in (killed, *running):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"partial")
    save_hf(new, out)
    assert not killed.exists() and all(staging.exists() for staging in running)
    assert sorted(out.glob(".save_hf-*")) == sorted(running)
    np.testing.assert_array_equal(np.asarray(load_hf(out)(x)), np.asarray(new(x)))


def test_extra_config_that_contradicts_the_weights_is_refused_by_name(tmp_path):
    """Fields that describe the written weights must agree with the model: tie_word_embeddings=False over a tied
    model gave transformers a random lm_head, True over an untied one dropped it, a rope_theta of its own gave
    transformers one RoPE and load_hf another, a sliding window made transformers compute another model. The
    model's own config (as an HF config.json has it), the stop ids and max_position_embeddings (a length limit)
    pass; nothing is written for a refused export."""
    from r1jax.model.config import to_hf_config

    tied, untied = init_model(get_preset("tiny-qwen2"), seed=0), init_model(get_preset("tiny-llama"), seed=0)
    for model, key, value in ((tied, "tie_word_embeddings", False), (untied, "tie_word_embeddings", True),
                              (untied, "rope_theta", 10_000.0), (untied, "num_hidden_layers", 3)):
        with pytest.raises(ValueError, match=rf"extra_config\['{key}'\]={value}.*{getattr(model.cfg, key, '')}"):
            save_hf(model, tmp_path / key, extra_config={key: value})
        assert not (tmp_path / key / "config.json").exists()
    window = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}  # transformers would slide it
    with pytest.raises(ValueError, match="extra_config.*use_sliding_window=true"):
        save_hf(tied, tmp_path / "window", extra_config=window)
    own = {**to_hf_config(untied.cfg), "rope_theta": 500_000, "torch_dtype": "bfloat16"}  # int theta, as HF has it
    out = save_hf(untied, tmp_path / "own", extra_config={**own, "max_position_embeddings": 1024, "eos_token_id": 2})
    config = json.loads((out / "config.json").read_text())
    assert (config["max_position_embeddings"], config["eos_token_id"], config["torch_dtype"]) == (1024, 2, "float32")
    x = jnp.asarray(tokens(1, 8))
    np.testing.assert_array_equal(np.asarray(load_hf(out)(x)), np.asarray(untied(x)))


def test_corrupt_weights_and_null_config_fields_are_errors_that_name_the_file(tmp_path):
    out = save_hf(init_model(get_preset("tiny-llama"), seed=0), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_attention_heads": None}))
    with pytest.raises(ValueError, match=r"config\.json: cannot read model config"):
        load_hf(out)
    (out / "config.json").write_text(json.dumps(config))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf(out)


_LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope_fields", [
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **_LLAMA3}},
    {"rope_scaling": {"type": "llama3", **_LLAMA3}, "rope_theta": 5e5},  # transformers 4's spelling
    # Both spellings: transformers reads rope_scaling over rope_parameters, whole (not key by key)
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"type": "llama3", **_LLAMA3},
     "rope_theta": 5e5},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
     "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **_LLAMA3},
     "rope_scaling": {"type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}},
])
def test_rope_config_reads_as_transformers_reads_it_or_is_refused(rope_fields, tmp_path):
    """RoPE type and theta as transformers reads the config.json; a type other than default / llama3 is a
    ValueError naming it, never a default RoPE (config.json with rope_parameters 'default' and an older
    rope_scaling 'yarn' loaded as plain RoPE, a 'llama3' one without its scaling)."""
    from r1jax.model.config import from_hf_config, to_hf_config

    hf = {k: v for k, v in to_hf_config(get_preset("tiny-llama")).items() if not k.startswith("rope_")}
    hf.update(rope_fields)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    rope = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    if rope["rope_type"] not in ("default", "llama3"):
        with pytest.raises(ValueError, match=f"rope type '{rope['rope_type']}' is not supported"):
            from_hf_config(hf)
        return
    cfg = from_hf_config(hf)
    assert cfg.rope_theta == rope["rope_theta"]
    assert (cfg.rope_scaling is None) == (rope["rope_type"] == "default")
    if cfg.rope_scaling is not None:
        assert {k: rope[k] for k in _LLAMA3} == vars(cfg.rope_scaling)


def test_model_config_reads_a_rope_scaling_dict_and_refuses_other_types():
    """A rope_scaling dict (an asdict round trip, or HF's spelling with its type) is Llama-3 scaling; another
    type is a ValueError naming it (it was a TypeError about an unexpected keyword)."""
    from r1jax.model import Llama3RopeScaling, ModelConfig

    base = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    for spelling in ({}, {"rope_type": "llama3"}, {"type": "llama3"}):
        assert ModelConfig(**base, rope_scaling={**spelling, **_LLAMA3}).rope_scaling == Llama3RopeScaling(**_LLAMA3)
    for bad in ({"rope_type": "yarn", "factor": 4.0}, {"type": "linear", "factor": 2.0}):
        with pytest.raises(ValueError, match=rf"model.rope_scaling type '{bad.get('rope_type', bad.get('type'))}'"):
            ModelConfig(**base, rope_scaling=bad)
    with pytest.raises(ValueError, match="model.rope_scaling=.*beta_fast"):
        ModelConfig(**base, rope_scaling={**_LLAMA3, "beta_fast": 32})


def test_a_sliding_window_over_no_layer_is_full_attention():
    """Qwen2 slides its window over layers ≥ max_window_layers: with that ≥ the layer count (or layer_types
    all full) every layer attends fully and the config loads; a window over some layer is refused."""
    from r1jax.model.config import from_hf_config, to_hf_config

    hf = to_hf_config(get_preset("tiny-qwen2"))
    layers = hf["num_hidden_layers"]
    full = {**hf, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": layers,
            "layer_types": ["full_attention"] * layers}
    assert from_hf_config(full) == from_hf_config(hf)
    with pytest.raises(ValueError, match="max_window_layers=1 < num_hidden_layers"):
        from_hf_config({**full, "max_window_layers": 1})
    with pytest.raises(ValueError, match="layer_types"):
        from_hf_config({**hf, "layer_types": ["sliding_attention"] * layers})


def test_bench_preset_matches_workload_parameter_count():
    assert get_preset("bench-qwen2-3m").num_params == 3_182_848


def test_mlp_matmul_gradient_equals_autodiff():
    """The gate/up matmul's custom weight gradient, (dyᵀ·x)ᵀ, is autodiff's xᵀ·dy (float64 reference)."""
    from r1jax.model.transformer import _widening_matmul

    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((3, 5, 4)), rng.standard_normal((4, 6)), rng.standard_normal((3, 5, 6))
    out, vjp = jax.vjp(_widening_matmul, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("btd,btf->df", x, dy), rtol=1e-5, atol=1e-5)


def test_random_init_scales_each_matrix_by_its_matmul_fan_in():
    """N(0, 1/fan_in) with fan-in the dimensions the matmul contracts: d for q/k/v/gate/up, heads × head_dim
    for the attention output (not the head count alone), the MLP width for down."""
    cfg = get_preset("tiny-qwen2")  # d 64, 4 heads × 16, 2 KV heads, MLP 128
    layer = init_model(cfg, seed=0).layers[0]
    fan_in = {"q": 64, "k": 64, "v": 64, "o": 4 * 16, "gate": 64, "up": 64, "down": 128}
    for name, n in fan_in.items():
        w = np.asarray(getattr(layer.attn if name in ("q", "k", "v", "o") else layer.mlp, name)[...])
        np.testing.assert_allclose(w.std(), 1 / np.sqrt(n), rtol=0.06, err_msg=name)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_recomputes_blocks_in_training_and_leaves_sampling_alone(remat):
    """model.remat checkpoints each block for the backward pass (a remat in the gradient's program, same
    gradient as without it) and does not stop the sampler: its decode loop runs the same model (it raised
    TraceContextError inside the loop, so every real-size config failed at its first sampling)."""
    from flax import nnx

    from r1jax.sampling import SamplingConfig, sample_groups

    plain = init_model(get_preset("tiny-qwen2"), seed=0)
    rematted = init_model(get_preset("tiny-qwen2", remat=remat), seed=0)
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 3]])

    def loss(model):
        return jnp.sum(jax.nn.log_softmax(model(tokens).astype(jnp.float32))[..., 4])

    grads = [jax.tree.leaves(nnx.grad(loss)(m)) for m in (plain, rematted)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert "remat" in str(jax.make_jaxpr(nnx.grad(loss))(rematted))
    assert "remat" not in str(jax.make_jaxpr(nnx.grad(loss))(plain))
    config = SamplingConfig(max_new_tokens=5, temperature=0.7)
    out = [sample_groups(*nnx.split(m), [[1, 2, 3], [1, 4]], 2, jax.random.key(0), config) for m in (plain, rematted)]
    np.testing.assert_array_equal(np.asarray(out[1].tokens), np.asarray(out[0].tokens))
