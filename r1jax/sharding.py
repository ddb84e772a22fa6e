"""Meshes and the one logical-axis → mesh-axis table.

Every parameter, activation and cache array is described by *logical* axis names (`vocab`,
`embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `batch`, …). `ShardingRules` maps each
logical name to mesh axes (`data`, `fsdp`, `tensor`); nothing else in the code base names a
mesh axis. Two choices:

* A mesh axis may appear at most once in one array's spec; a table that would place two
  logical axes of one array on the same mesh axis is rejected when the spec is built.
* A dimension that the mapped mesh axes do not divide evenly is replicated instead (e.g.
  Qwen2.5-0.5B's 2 KV heads on `tensor=4`). `spec_for` is the single place that decides
  this, so parameters, activations and caches agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


def _entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name → mesh axis (or axes, or None for replicated).

    Parameters: `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `norm`.
    Activations and caches: `batch`, `seq`, `act_embed`; the KV cache's rows `cache_batch` (as `batch`
    by default; `decode_rules` splits a decode step's activations otherwise) and slots `cache_seq`.
    Optimizer state: `optimizer_extra`, mesh axes over which a parameter-shaped optimizer leaf
    (Adam's μ, ν) is split beyond its parameter's own sharding (`optimizer_state_sharding`).
    """

    batch: MeshAxes = ("data", "fsdp")
    cache_batch: MeshAxes = ("data", "fsdp")
    seq: MeshAxes = None
    act_embed: MeshAxes = None
    cache_seq: MeshAxes = None
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    heads: MeshAxes = "tensor"
    kv_heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None
    mlp: MeshAxes = "tensor"
    norm: MeshAxes = None
    # ZeRO-1: data-parallel replicas hold a parameter whole but each keeps (and updates) only its
    # slice of the parameter's Adam state; the update step gathers the new parameters.
    optimizer_extra: MeshAxes = "data"

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        if not hasattr(self, logical):
            names = [f.name for f in dataclasses.fields(self)]
            raise ValueError(f"unknown logical axis {logical!r}; the sharding table knows {names}")
        return _entry_axes(getattr(self, logical))

    @classmethod
    def from_dict(cls, table: Mapping[str, MeshAxes]) -> ShardingRules:
        known = {f.name for f in dataclasses.fields(cls)}
        for name, axes in table.items():
            if name not in known:
                raise ValueError(f"sharding rule for unknown logical axis {name!r}; known: {sorted(known)}")
            for a in _entry_axes(axes):
                if a not in MESH_AXES:
                    raise ValueError(f"sharding rule {name}={axes!r}: mesh axis {a!r} not in {MESH_AXES}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})


DEFAULT_RULES = ShardingRules()


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def spec_for(
    shape: Sequence[int],
    logical: Sequence[str | None],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: ShardingRules = DEFAULT_RULES,
) -> PartitionSpec:
    """The PartitionSpec the table gives an array of `shape` with these logical axes."""
    if len(shape) != len(logical):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: dict[str, str] = {}
    spec = []
    for dim, name in zip(shape, logical, strict=True):
        axes = tuple(a for a in rules.mesh_axes(name) if mesh.shape.get(a, 1) > 1)
        for a in axes:
            if a in used:
                raise ValueError(
                    f"sharding table maps both {used[a]!r} and {name!r} of axes {tuple(logical)} "
                    f"onto mesh axis {a!r}"
                )
            used[a] = name
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
        else:
            spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def named_sharding(shape, logical, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec_for(shape, logical, mesh, rules))


def _without(entry, drop: set[str]):
    """A PartitionSpec entry without the mesh axes in `drop`."""
    kept = tuple(a for a in _entry_axes(entry) if a not in drop)
    return kept[0] if len(kept) == 1 else (kept or None)


def optimizer_state_sharding(param: jax.Array, rules: ShardingRules = DEFAULT_RULES) -> jax.sharding.Sharding:
    """Where a parameter-shaped optimizer leaf of `param` lives: the parameter's sharding, each
    `optimizer_extra` mesh axis it does not use yet added on its first dimension that is replicated
    and divisible (else that axis keeps the leaf whole, as a parameter's undividable dimension)."""
    sharding = param.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh = sharding.mesh
    spec = list(sharding.spec) + [None] * (param.ndim - len(sharding.spec))
    used = {a for entry in spec for a in _entry_axes(entry)}
    for axis in rules.mesh_axes("optimizer_extra"):
        size = mesh.shape.get(axis, 1)
        if size == 1 or axis in used:
            continue
        dim = next((i for i, (entry, n) in enumerate(zip(spec, param.shape, strict=True))
                    if entry is None and n % size == 0), None)
        if dim is not None:
            spec[dim] = axis
    return NamedSharding(mesh, PartitionSpec(*spec))


def row_blocks(mesh: Mesh) -> int:
    """Into how many process-held blocks the mesh's `batch` axes cut the rows of a batch."""
    axes = DEFAULT_RULES.mesh_axes("batch")
    return math.prod(mesh.shape[a] for a in axes) // math.prod(mesh.local_mesh.shape[a] for a in axes)


def _row_spec(rows: int, ndim: int, mesh: Mesh) -> PartitionSpec:
    """The spec of a global batch of `rows` rows: rows over the table's `batch` axes. Where those axes
    span processes the rows must split evenly: each process's rows live on its own devices only, so a
    replicated batch would be wrong, not merely slower."""
    spec = spec_for((rows,) + (1,) * (ndim - 1), ("batch",) + (None,) * (ndim - 1), mesh)
    if row_blocks(mesh) > 1 and spec[0] is None:
        raise ValueError(f"a batch of {rows} rows does not split over the mesh's batch axes "
                         f"{DEFAULT_RULES.mesh_axes('batch')} across {jax.process_count()} processes")
    return spec


def global_rows(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """This process's rows of a batch → the global array, rows over the mesh's `batch` axes, each
    process's rows on its own devices (one process: a `device_put`; no mesh: the default device)."""
    if mesh is None:
        return jnp.asarray(x)
    return multihost_utils.host_local_array_to_global_array(x, mesh, _row_spec(x.shape[0] * row_blocks(mesh),
                                                                                x.ndim, mesh))


def host_rows(x: jax.Array, mesh: Mesh) -> jax.Array:
    """The inverse of `global_rows`: the rows of a row-sharded global array that this process holds
    (one process: `x` itself)."""
    if x.is_fully_addressable:
        return x
    return multihost_utils.global_array_to_host_local_array(x, mesh, _row_spec(x.shape[0], x.ndim, mesh))


def gather_processes(tree):
    """Every process's host arrays, concatenated along axis 0 in process order (one process: `tree`)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def sum_processes(x: np.ndarray) -> np.ndarray:
    """The sum over processes of a host array (one process: `x`)."""
    return x if jax.process_count() == 1 else np.asarray(multihost_utils.process_allgather(x)).sum(0)


def process_zero_first(fn: Callable[[], T], name: str) -> T:
    """`fn()` on process 0, then on the others once it has returned (a barrier named `name`): for work
    that writes a shared file the other processes then read, such as a trained tokenizer."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        result = fn()
        multihost_utils.sync_global_devices(name)
        return result
    multihost_utils.sync_global_devices(name)
    return fn()


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process: a decision they all take together."""
    return flag if jax.process_count() == 1 else bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


_active_rules: list[ShardingRules] = [DEFAULT_RULES]


def decode_rules() -> ShardingRules:
    """The active table as a decode step uses it: activation rows split only over the `batch` axes that
    split no weight's input dimension (`embed`), the KV cache's rows as before.

    A decode step multiplies a few rows by every weight. With rows split over `fsdp` like the weights'
    input dimension, XLA all-gathers every weight at every step (the whole model per token); with the
    rows whole on those devices, each multiplies its own weight block and the small products are summed
    (an all-reduce of [rows, out] per projection)."""
    rules = _active_rules[-1]
    return dataclasses.replace(rules, batch=_without(rules.batch, set(rules.mesh_axes("embed"))))


class use_rules:  # noqa: N801 - used as a context manager like jax.set_mesh
    """Context manager choosing the table that `constrain` uses for activations."""

    def __init__(self, rules: ShardingRules):
        self.rules = rules

    def __enter__(self):
        _active_rules.append(self.rules)
        return self.rules

    def __exit__(self, *exc):
        _active_rules.pop()


def _active_mesh() -> jax.sharding.AbstractMesh | None:
    """The `jax.set_mesh` mesh when it splits anything, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(mesh.shape.get(a, 1) == 1 for a in MESH_AXES):
        return None
    return mesh


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrain an activation by logical names; a no-op outside a mesh (`jax.set_mesh`)."""
    mesh = _active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(x.shape, logical, mesh, _active_rules[-1]))


def embedding_lookup(table: jax.Array, tokens: jax.Array, dtype=None) -> jax.Array:
    """`table[tokens]` for a [vocab, embed] table and [b, t] tokens, cast to `dtype` (default: the
    table's), laid out as ("batch", "seq", "act_embed").

    On a mesh, XLA's partitioner turns a gather from a table whose columns are split over an axis that
    also splits the batch (the default table's `fsdp`) into an all-gather of the whole [b, t, d] result
    ("Involuntary full rematerialization"). Here each device looks its tokens up in its own block of
    the table instead: tokens gathered over the table's mesh axes (integers, cheap), rows outside the
    device's vocabulary block zeroed and the blocks summed over the `vocab` axes, and the result — split
    like the table's columns — moved to the activation layout by one all-to-all.
    """
    dtype = table.dtype if dtype is None else dtype
    mesh = _active_mesh()
    rules = _active_rules[-1]
    vocab, embed = (None, None) if mesh is None else spec_for(table.shape, ("vocab", "embed"), mesh, rules)
    table_axes = set(_entry_axes(vocab) + _entry_axes(embed))
    if not table_axes:
        return constrain(jnp.take(table, tokens, axis=0).astype(dtype), ("batch", "seq", "act_embed"))
    vocab_axes = _entry_axes(vocab)
    batch, seq = (_without(e, table_axes) for e in spec_for(tokens.shape, ("batch", "seq"), mesh, rules))

    def local(block, ids):
        if not vocab_axes:
            return jnp.take(block, ids, axis=0).astype(dtype)
        rows = block.shape[0]
        ids = ids - jax.lax.axis_index(vocab_axes) * rows
        inside = (ids >= 0) & (ids < rows)
        x = jnp.take(block, jnp.clip(ids, 0, rows - 1), axis=0).astype(dtype)
        return jax.lax.psum(jnp.where(inside[..., None], x, 0), vocab_axes)

    x = jax.shard_map(local, in_specs=(PartitionSpec(vocab, embed), PartitionSpec(batch, seq)),
                      out_specs=PartitionSpec(batch, seq, embed))(table, tokens)
    return constrain(x, ("batch", "seq", "act_embed"))
