"""Jitted pure functions shared by the trainers: completion log-probs, gradient accumulation, updates.

A training row is the sampler's layout: L prompt slots (right-padded, `prompt_mask`) followed by N
completion slots (`mask`). Positions count real tokens only, so they equal the RoPE positions the
sampler used; completion token i is predicted by the hidden state of the previous *real* token
(the last prompt token for i = 0), gathered before the chunked log-softmax so that no
[B, L+N, V] logits exist.

Gradient accumulation splits the batch into M micro-batches inside one `jit` (`lax.scan`) and sums
their gradients. Losses take *global* normalisers (sequence and token counts of the whole batch),
so the sum equals the one-big-batch gradient exactly. Micro-batch m takes rows m, m+M, m+2M, …, so
a batch sharded over devices stays spread over all of them (in GRPO, runs of rows with the same
prompt instead of single rows: each prompt then goes through the model once per run).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.grpo import GRPOConfig, batch_counts, chunked_token_logprobs, grpo_loss
from r1jax.model import init_cache
from r1jax.sharding import optimizer_state_sharding

Batch = dict[str, jax.Array]
# objective(model, batch, (sequences, tokens) of the whole batch, prompt_run) -> (loss, metrics)
Objective = Callable[[nnx.Module, Batch, tuple[jax.Array, jax.Array], int], tuple[jax.Array, dict[str, jax.Array]]]

# XLA:CPU's default hands dots and reductions to YNNPACK. The training programs' matmuls are large
# ([rows·tokens, d] × [d, f]), where XLA's own (Eigen) dot kernels are faster; the sampler's decode
# program, whose matmuls have one row per sequence, is faster with the default. In-process A/B on the
# bench model's GRPO update and reference pass (2 CPU devices, bench/RESULTS.md): 6-12 % less CPU time.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_CPU_TRAINING_OPTIONS = {_YNN_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def training_compiler_options() -> dict[str, str]:
    """XLA options for the training programs (update and scoring): YNNPACK kept for reductions only on
    CPU; none elsewhere, where XLA_FLAGS sets the option (the user's choice stands), or where this XLA
    does not know the (experimental) option."""
    if jax.default_backend() != "cpu" or _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    try:
        jax.jit(lambda x: x + 1).lower(0.0).compile(_CPU_TRAINING_OPTIONS)
    except jax.errors.JaxRuntimeError:  # the option was renamed or removed: XLA's defaults are fine
        return {}
    return dict(_CPU_TRAINING_OPTIONS)


def completion_logprobs(
    model: nnx.Module, batch: Batch, *, prompt_run: int = 1, temperature: float = 1.0, chunk_size: int = 512,
    entropy: bool = False,
):
    """log π(completion token | prefix) [B, N] (and the entropy [B, N] when asked).

    prompt_run: the rows come in runs of this many consecutive rows with the same prompt (a GRPO group
    or part of one). Each prompt then goes through the model once, and its keys/values are shared by
    the run's completions: the same values (and gradients, which the sharing sums), while the prompt
    tokens' forward and backward cost 1/prompt_run of what one pass over every row costs.
    """
    prompt, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    tokens, mask = batch["tokens"], batch["mask"]
    slots, n = prompt.shape[1], tokens.shape[1]
    last_prompt = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32) - 1  # [B]
    if prompt_run == 1:
        h, _ = model.hidden_states(jnp.concatenate([prompt, tokens], 1), valid=jnp.concatenate([prompt_mask, mask], 1))
        pred = jnp.where(jnp.arange(n)[None, :] == 0, last_prompt[:, None], slots + jnp.arange(n)[None, :] - 1)
        h = jnp.take_along_axis(h, pred[..., None], axis=1)  # [B, N, D]
    else:
        h = _hidden_with_shared_prompts(model, prompt, prompt_mask, tokens, mask, last_prompt, prompt_run)
    return chunked_token_logprobs(h, model.unembedding(), tokens, mask, chunk_size=min(chunk_size, n),
                                  temperature=temperature, return_entropy=entropy)


def _hidden_with_shared_prompts(model, prompt, prompt_mask, tokens, mask, last_prompt, run: int) -> jax.Array:
    """The hidden states [B, N, D] that predict each completion token, each run's prompt run once: the
    prompt fills a KV cache, which is repeated over the run's rows, and the completions attend to it
    as the sampler's decode does (same slots, positions and masks as one pass over prompt ‖ completion)."""
    if prompt.shape[0] % run:
        raise ValueError(f"{prompt.shape[0]} rows do not form runs of prompt_run={run}")
    once = lambda x: x.reshape(-1, run, *x.shape[1:])[:, 0]  # the first row of every run
    # The prompts' cache holds their slots only (a pass over it never looks further), then grows.
    h_prompt, cache = model.hidden_states(once(prompt), valid=once(prompt_mask),
                                          cache=init_cache(model.cfg, prompt.shape[0] // run, prompt.shape[1]))
    cache = cache.extended(prompt.shape[1] + tokens.shape[1])
    positions = jnp.maximum(last_prompt[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32), 0)  # as one pass counts
    h_completion, _ = model.hidden_states(tokens, positions=positions, valid=mask, cache=cache.repeat_rows(run))
    h_last = jnp.take_along_axis(h_prompt, once(last_prompt)[:, None, None], axis=1)  # [B / run, 1, D]
    return jnp.concatenate([jnp.repeat(h_last, run, axis=0), h_completion[:, :-1]], axis=1)


def grpo_objective(config: GRPOConfig, *, temperature: float, chunk_size: int) -> Objective:
    def objective(model, batch, counts, prompt_run):
        logp, ent = completion_logprobs(model, batch, prompt_run=prompt_run, temperature=temperature,
                                        chunk_size=chunk_size, entropy=True)
        old_logp = batch.get("old_logp", logp)  # absent: on-policy, π_old = these log-probs (detached by the loss)
        return grpo_loss(logp, old_logp, batch.get("ref_logp"), batch["advantages"], batch["mask"], config,
                         num_sequences=counts[0], num_tokens=counts[1], entropy=ent)

    return objective


def sft_objective(*, chunk_size: int) -> Objective:
    """Mean negative log-likelihood over the completion tokens of the whole batch."""

    def objective(model, batch, counts, prompt_run):
        logp = completion_logprobs(model, batch, prompt_run=prompt_run, chunk_size=chunk_size)
        nll = -jnp.sum(jnp.where(batch["mask"], logp, 0.0))
        return nll / jnp.maximum(counts[1], 1), {"nll_sum": nll, "tokens": jnp.sum(batch["mask"])}

    return objective


def _micro_batches(batch: Batch, m: int, run: int) -> Batch:
    """M micro-batches of units of `run` consecutive rows: micro-batch i takes units i, i+M, i+2M, …"""
    def split(x):
        if x.shape[0] % (m * run):
            raise ValueError(f"batch of {x.shape[0]} rows does not split into micro_batches={m} of runs of {run}")
        units = x.reshape(x.shape[0] // (m * run), m, run, *x.shape[1:])
        return jnp.swapaxes(units, 0, 1).reshape(m, x.shape[0] // m, *x.shape[1:])

    return jax.tree.map(split, batch)


def _reduce_metrics(stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-micro-batch metrics → the whole batch's: extrema combine by min/max; everything else is already
    divided by whole-batch counts (or is a count) and adds up, but `advantage_std`, each call's own std
    over its `num_sequences`, which `_pooled_std` pools into the whole batch's (a mean of the micro-batches'
    stds is not the batch's std)."""
    out = {}
    for k, v in stacked.items():
        if k.endswith("_max"):
            out[k] = jnp.max(v)
        elif k.endswith("_min"):
            out[k] = jnp.min(v)
        elif k == "advantage_std":  # grpo_loss reports it with advantage_mean and num_sequences
            out[k] = _pooled_std(v, stacked["advantage_mean"], stacked["num_sequences"])
        else:
            out[k] = jnp.sum(v)
    return out


def _pooled_std(stds: jax.Array, means: jax.Array, counts: jax.Array) -> jax.Array:
    """The population std of the union of M parts, from each part's std and count and its share of the
    union's mean (`means[m]` = sum of part m / the union's count, as `grpo_loss` reports `advantage_mean`):
    Σ_m n_m (σ_m² + (μ_m − μ)²) / N, which does not cancel as E[x²] − μ² can."""
    n = counts.astype(stds.dtype)  # [M]
    total = jnp.maximum(jnp.sum(n), 1)
    mean = jnp.sum(means)  # the union's mean: the shares add up
    part_mean = means * total / jnp.maximum(n, 1)  # [M]; an empty part (n = 0) weighs nothing
    return jnp.sqrt(jnp.sum(n * (stds**2 + (part_mean - mean) ** 2)) / total)


def prompt_run(group_size: int, rows: int, micro_batches: int) -> int:
    """How many consecutive rows share one prompt pass in each of M micro-batches of a batch whose
    rows come in groups of `group_size` with the same prompt: gcd(G, rows per micro-batch)."""
    return math.gcd(group_size, rows // micro_batches)


def accumulate_gradients(graphdef, params, batch: Batch, objective: Objective, micro_batches: int,
                         group_size: int = 1):
    """Σ over micro-batches of ∇ objective, with the whole batch's counts as normalisers.

    group_size: the batch's rows come in groups of this many with the same prompt (GRPO's G). The
    micro-batches keep runs of gcd(G, rows per micro-batch) of them together, and the objective
    runs each such run's prompt once (`completion_logprobs`' prompt_run)."""
    counts = batch_counts(batch["mask"])
    run = prompt_run(group_size, batch["mask"].shape[0], micro_batches)

    def loss_fn(p, mb):
        return objective(nnx.merge(graphdef, p), mb, counts, run)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, grads, metrics

    def body(carry, mb):
        loss_acc, grad_acc = carry
        (loss, metrics), grads = grad_fn(params, mb)
        return (loss_acc + loss, jax.tree.map(jnp.add, grad_acc, grads)), metrics

    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), metrics = jax.lax.scan(body, init, _micro_batches(batch, micro_batches, run))
    return loss, grads, _reduce_metrics(metrics)


def make_update_step(graphdef, optimizer: optax.GradientTransformation, objective: Objective, micro_batches: int = 1,
                     *, group_size: int = 1, state_shardings: tuple[Any, Any] | None = None):
    """`step(params, opt_state, batch) -> (params, opt_state, metrics)`, jitted, params/opt_state donated.

    `state_shardings` = (params, opt_state) shardings: the new state is pinned to them. Left to
    propagation, the outputs come back with other (if equivalent) specs, e.g. `P('fsdp')` for
    `P('fsdp', None, None)`, and the next call, seeing new input shardings, compiles again.
    """

    def step(params, opt_state, batch):
        loss, grads, metrics = accumulate_gradients(graphdef, params, batch, objective, micro_batches, group_size)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
        return params, opt_state, metrics

    out_shardings = None if state_shardings is None else (*state_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings,
                   compiler_options=training_compiler_options())


def opt_state_shardings(optimizer: optax.GradientTransformation, params) -> Any:
    """Where the optimizer state of `params` (arrays or `jax.ShapeDtypeStruct`s with shardings) lives:
    parameter-shaped leaves (Adam's μ, ν) sharded like their parameter and further over the
    data-parallel axis (`sharding.optimizer_state_sharding`: each replica updates only its slice,
    ZeRO-1), the rest (step counts) replicated."""
    first = jax.tree.leaves(params)[0].sharding
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_utils.tree_map_params(optimizer, lambda _, p: optimizer_state_sharding(p), abstract,
                                            params, transform_non_params=lambda _: replicated)


def init_opt_state(optimizer: optax.GradientTransformation, params) -> Any:
    """The optimizer state, created in place where `opt_state_shardings` puts it. A plain
    `jit(optimizer.init)` replicates μ and ν on every device, which costs FSDP its memory saving."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params))(params)


def init_train_state(graphdef, params, optimizer: optax.GradientTransformation, objective: Objective,
                     micro_batches: int, mesh: Mesh | None, group_size: int = 1) -> tuple[Any, Any, Callable]:
    """(params, opt_state, update step) for a trainer: the params committed to their devices, the
    optimizer state placed by `init_opt_state`, and the update step pinned to both shardings, as its outputs
    are (otherwise step 2, seeing new input shardings, compiles again)."""
    params = jax.device_put(params, shardings_of(params))
    with mesh_context(mesh):
        opt_state = init_opt_state(optimizer, params)
    update = make_update_step(graphdef, optimizer, objective, micro_batches, group_size=group_size,
                              state_shardings=shardings_of((params, opt_state)))
    return params, opt_state, update


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def make_score_fn(graphdef, *, group_size: int = 1, temperature: float = 1.0, chunk_size: int = 512):
    """`score(params, batch) -> logp [B, N]`: reference / old-policy log-probs, forward only; rows in
    groups of `group_size` with the same prompt (each prompt run once)."""

    def score(params, batch):
        return completion_logprobs(nnx.merge(graphdef, params), batch, prompt_run=group_size, temperature=temperature,
                                   chunk_size=chunk_size)

    return jax.jit(score, compiler_options=training_compiler_options())


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing when running unsharded."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
