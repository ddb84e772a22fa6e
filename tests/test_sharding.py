"""Sharded forward on 8 fake CPU devices, parameter placements, and checkpoint error cases."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from r1jax.model import ModelConfig, get_preset, init_model, load_hf, logical_axes, save_hf, shard_model
from r1jax.model.config import from_hf_config
from r1jax.sharding import (
    ShardingRules,
    embedding_lookup,
    make_mesh,
    optimizer_state_sharding,
    spec_for,
    use_rules,
)

# heads 8 / kv 4 / mlp 128 / vocab 128 / embed 64: every sharded dim divides every mesh below.
CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, intermediate_size=128,
                  qkv_bias=True, architecture="qwen2")
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]

# What the default table says, written out by hand: a parameter's logical axes → its PartitionSpec.
SHARDED = {
    ("vocab", "embed"): P("tensor", "fsdp"),
    ("embed", "vocab"): P("fsdp", "tensor"),
    ("embed", "heads", "head_dim"): P("fsdp", "tensor", None),
    ("embed", "kv_heads", "head_dim"): P("fsdp", "tensor", None),
    ("heads", "head_dim", "embed"): P("tensor", None, "fsdp"),
    ("heads", "head_dim"): P("tensor", None),
    ("kv_heads", "head_dim"): P("tensor", None),
    ("embed", "mlp"): P("fsdp", "tensor"),
    ("mlp", "embed"): P("tensor", "fsdp"),
    ("norm",): P(None),
}
EXPECTED = {
    (8, 1, 1): {axes: P(*[None] * len(axes)) for axes in SHARDED},  # pure data parallel: replicated
    (2, 2, 2): SHARDED,
    (1, 2, 4): SHARDED,
}


def _tokens():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 128, (8, 12))
    valid = np.ones((8, 12), bool)
    valid[3, 9:] = False
    return jnp.asarray(x), jnp.asarray(valid)


@pytest.fixture(scope="module")
def reference():
    model = init_model(CFG, seed=3)
    x, valid = _tokens()
    return model, np.asarray(model(x, valid=valid))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_single_device(reference, shape):
    model, ref = reference
    mesh = make_mesh(*shape)
    sharded = init_model(CFG, seed=3, mesh=mesh)
    graphdef, state = nnx.split(sharded)
    for path, v in nnx.to_flat_state(state):
        spec = EXPECTED[shape][v.get_metadata("axes")]
        assert v[...].sharding.spec == spec, (path, v[...].sharding.spec, spec)

    x, valid = _tokens()

    @jax.jit
    def forward(state, x, valid):
        return nnx.merge(graphdef, state)(x, valid=valid)

    with jax.set_mesh(mesh):
        out = forward(state, jax.device_put(x, jax.NamedSharding(mesh, P(("data", "fsdp")))), valid)
    assert out.sharding.spec[0] == spec_for(out.shape, ("batch", "seq", "vocab"), mesh)[0]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize(("shape", "rules"), [
    ((2, 2, 2), ShardingRules()),
    ((1, 2, 4), ShardingRules()),
    ((1, 8, 1), ShardingRules()),
    ((8, 1, 1), ShardingRules()),
    ((2, 2, 2), ShardingRules(vocab="fsdp", embed="tensor")),  # the vocabulary split like the batch
    ((2, 4, 1), ShardingRules(vocab=None)),
    ((2, 2, 2), ShardingRules(vocab=("fsdp", "tensor"), embed=None)),  # vocabulary blocks over two axes
])
def test_embedding_lookup_keeps_activations_split(shape, rules):
    """Values and table gradient against NumPy; the result in the activation layout; and the only
    all-gather the lookup compiles to is of the integer tokens (XLA's own partitioning of the gather
    all-gathers the table and the whole [b, t, d] result on these meshes)."""
    mesh = make_mesh(*shape)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(256, 64)).astype(np.float32)
    tokens = rng.integers(0, 256, (16, 12)).astype(np.int32)
    weight = rng.normal(size=(16, 12, 64))

    def loss(t, ids):
        return jnp.sum(jnp.sin(embedding_lookup(t, ids)) * weight.astype(np.float32))

    with jax.set_mesh(mesh), use_rules(rules):
        t = jax.device_put(table, jax.NamedSharding(mesh, spec_for(table.shape, ("vocab", "embed"), mesh, rules)))
        ids = jax.device_put(tokens, jax.NamedSharding(mesh, spec_for(tokens.shape, ("batch", "seq"), mesh, rules)))
        looked_up = jax.jit(embedding_lookup)
        out = looked_up(t, ids)
        hlo = looked_up.lower(t, ids).compile().as_text()
        grad = jax.jit(jax.grad(loss))(t, ids)
        half = jax.jit(embedding_lookup, static_argnums=2)(t, ids, jnp.bfloat16)
        expected = jax.NamedSharding(mesh, spec_for(out.shape, ("batch", "seq", "act_embed"), mesh, rules))
    assert out.sharding.is_equivalent_to(expected, out.ndim), (out.sharding.spec, expected.spec)
    np.testing.assert_array_equal(np.asarray(out), table[tokens])
    np.testing.assert_array_equal(np.asarray(half), np.asarray(jnp.asarray(table[tokens]).astype(jnp.bfloat16)))
    gathered = [line.split("=", 1)[1].split()[0] for line in hlo.splitlines()
                if " all-gather(" in line or " all-gather-start(" in line]
    assert all(g.startswith("s32[") for g in gathered), gathered
    expected = np.zeros(table.shape)
    np.add.at(expected, tokens, np.cos(table[tokens].astype(np.float64)) * weight)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=0, atol=1e-5)


def test_load_hf_places_shards_and_undivisible_dims_replicate(tmp_path):
    """Qwen2.5-0.5B-like: 2 KV heads on tensor=4 cannot split, so the table's fallback replicates them."""
    cfg = CFG.replace(num_kv_heads=2)
    save_hf(init_model(cfg, seed=1), tmp_path)
    mesh = make_mesh(1, 2, 4)
    model = load_hf(tmp_path, mesh=mesh)
    state = nnx.state(model)
    assert state["layers"][0]["attn"]["k"][...].sharding.spec == P("fsdp", None, None)
    assert state["layers"][0]["attn"]["q"][...].sharding.spec == P("fsdp", "tensor", None)
    unsharded = nnx.state(load_hf(tmp_path))
    np.testing.assert_array_equal(np.asarray(state["embed"][...]), np.asarray(unsharded["embed"][...]))


def test_shard_model_moves_to_table_layout():
    mesh = make_mesh(2, 2, 2)
    model = shard_model(init_model(CFG, seed=0), mesh)
    emb = nnx.state(model)["embed"][...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert logical_axes(nnx.state(model))["embed"] == ("vocab", "embed")


def test_optimizer_state_splits_over_data_where_a_dimension_is_free():
    """ZeRO-1: a parameter-shaped optimizer leaf keeps its parameter's sharding and adds `data` on the first
    replicated dimension it divides; none such (or the rule off, or `data` used already): as the parameter."""
    mesh = make_mesh(2, 2, 2)

    def placed(shape, spec):
        return jax.device_put(jnp.zeros(shape), jax.sharding.NamedSharding(mesh, spec))

    assert optimizer_state_sharding(placed((4, 3, 8), P("fsdp"))).spec == P("fsdp", None, "data")
    assert optimizer_state_sharding(placed((3, 5), P(None, None))).spec == P(None, None)  # nothing divides
    assert optimizer_state_sharding(placed((4, 6), P("tensor", "fsdp"))).spec == P("tensor", "fsdp")
    assert optimizer_state_sharding(placed((8,), P("data"))).spec == P("data")
    assert optimizer_state_sharding(placed((8,), P(None)), ShardingRules(optimizer_extra=None)).spec == P(None)
    assert optimizer_state_sharding(placed((4, 8), P()), ShardingRules(optimizer_extra=("data", "fsdp"))).spec == \
        P("data", "fsdp")


def test_table_rejects_two_logical_axes_on_one_mesh_axis():
    mesh = make_mesh(2, 2, 2)
    with pytest.raises(ValueError, match="both 'vocab' and 'embed'.*'fsdp'"):
        spec_for((128, 64), ("vocab", "embed"), mesh, ShardingRules(vocab="fsdp"))
    with pytest.raises(ValueError, match="unknown logical axis 'expert'"):
        spec_for((4,), ("expert",), mesh)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        ShardingRules.from_dict({"heads": "model"})
    with pytest.raises(ValueError, match=r"needs 16 devices, have 8"):
        make_mesh(2, 2, 4)


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture()
def saved(tmp_path):
    save_hf(init_model(get_preset("tiny-qwen2"), seed=0), tmp_path)
    return tmp_path


def test_missing_files_are_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_hf(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(saved)


def test_missing_tensor_is_named(saved):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf(saved)


def test_unknown_architecture_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MixtralForCausalLM"):
        load_hf(saved)
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        from_hf_config({**cfg, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn"}})


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 256  # the file holds 128
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\).*\(256, 64\)"):
        load_hf(saved)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model.num_heads=6 must be a multiple of model.num_kv_heads=4"):
        CFG.replace(num_heads=6)
    with pytest.raises(ValueError, match="model.remat='some'"):
        CFG.replace(remat="some")
    with pytest.raises(ValueError, match="model.attention_block=-1 must be ≥ 0"):
        CFG.replace(attention_block=-1)
