"""Building models: abstract shapes, shardings from the table, sharded init under `jit`.

Parameters are described once, in the modules (shape, dtype, logical axes, initializer);
the abstract state, the shardings and the sharded initialisation all derive from that.
Every jit boundary takes `(graphdef, state)` pytrees; `nnx.merge` happens inside.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.model.config import ModelConfig
from r1jax.model.transformer import Transformer
from r1jax.sharding import DEFAULT_RULES, ShardingRules, named_sharding


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """graphdef and a state of `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def logical_axes(state: nnx.State) -> nnx.State:
    """The logical axis names of every parameter, as a pytree shaped like `state`'s arrays."""
    return jax.tree.map(lambda v: v.get_metadata("axes"), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding of every parameter, from its logical axes through the one table."""

    def sharding(v: nnx.Variable) -> NamedSharding:
        axes = v.get_metadata("axes") if v.has_metadata("axes") else None
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return named_sharding(v.shape, axes, mesh, rules)

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_abstract_state(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """graphdef and a state of `jax.ShapeDtypeStruct`s carrying the table's shardings (restore targets)."""
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh, rules)
    flat = jax.tree.leaves(shardings)
    leaves, treedef = jax.tree.flatten(abstract)
    placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(leaves, flat, strict=True)]
    return graphdef, jax.tree.unflatten(treedef, placed)


def init_model(
    cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES
) -> Transformer:
    """A randomly initialised model whose parameters are created already sharded."""
    graphdef, abstract = abstract_model(cfg)

    def init() -> nnx.State:
        return nnx.state(Transformer(cfg, nnx.Rngs(seed)))

    out = None if mesh is None else state_shardings(abstract, mesh, rules)
    state = jax.jit(init, out_shardings=out)()
    return nnx.merge(graphdef, state)


def shard_model(model: Transformer, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Transformer:
    """Place an existing model's parameters as the table says (a copy only where layouts differ)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)
