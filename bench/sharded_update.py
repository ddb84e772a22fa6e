"""Compile, without running, the trainer's GRPO update for a preset on a mesh: per-device memory and
the collectives the SPMD partitioner chose.

For planning a pod-slice run (and checking the sharding table) on a host without the chips: fake CPU
devices stand in for them. The parameters, AdamW state (ZeRO-1 over `data`, as the trainer places
it) and a batch of R rows of P prompt + N completion tokens in groups of G are abstract
(`jax.ShapeDtypeStruct`s with the table's shardings); `trainers.steps.make_update_step` with the GRPO
objective (β > 0: old and reference log-probs in the batch) is lowered and compiled. Printed: XLA's
per-device memory report (arguments, outputs, temporaries) and, per collective kind, how many the
program runs and the bytes of their results, with the largest all-gathers. XLA:CPU's buffer
assignment is not XLA:TPU's or XLA:GPU's (session 3 saw XLA:CPU report ≈ 1.8× what XLA:GPU needed for
one shape), so read the memory figures as a comparison between configurations, not as a device's need.
The partitioner's "Involuntary full rematerialization" warnings, if any, appear on stderr.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.sharded_update    # 0.5B, (1, 8, 1)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m bench.sharded_update \\
        --preset qwen2.5-7b --layers 2 --mesh 2 2 2 --rows 16 --prompt 256 --completion 8192
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import time

import jax

from bench.attention import grpo_batch
from r1jax.grpo import GRPOConfig
from r1jax.model import get_preset
from r1jax.model.build import sharded_abstract_state
from r1jax.sharding import make_mesh, named_sharding
from r1jax.trainers.optim import OptimConfig, make_optimizer
from r1jax.trainers.rl import RLConfig
from r1jax.trainers.steps import grpo_objective, make_update_step, opt_state_shardings, shardings_of

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}


def collectives(hlo: str) -> dict[str, list[tuple[int, str]]]:
    """Collective kind → [(result bytes, result type)] over the compiled program's instructions (an
    async pair counted once, at its start; a tuple result as the sum of its arrays)."""
    found = collections.defaultdict(list)
    for line in hlo.splitlines():
        for kind in COLLECTIVES:
            for op in (f" {kind}(", f" {kind}-start("):
                if op in line and " = " in line:
                    result = line.split(" = ", 1)[1].split(op, 1)[0]
                    arrays = _ARRAY.findall(result)
                    size = sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
                    found[kind].append((size, result.strip()))
    return found


def abstract_batch(rows: int, prompt: int, completion: int, group: int, vocab: int, mesh):
    """`bench.attention`'s GRPO batch as `jax.ShapeDtypeStruct`s, rows split as the trainer splits them."""
    def rows_split(shape):
        return named_sharding(shape, ("batch",) + (None,) * (len(shape) - 1), mesh)

    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows_split(v.shape))
            for k, v in grpo_batch(rows, prompt, completion, group, vocab).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--mesh", type=int, nargs=3, default=[1, 8, 1], metavar=("DATA", "FSDP", "TENSOR"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--completion", type=int, default=512)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--logit-chunk", type=int, default=RLConfig.chunk_size)
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay fp32)")
    args = parser.parse_args()

    overrides = {} if args.layers is None else {"num_layers": args.layers}
    cfg = get_preset(args.preset, param_dtype="float32", dtype=args.dtype, **overrides)
    mesh = make_mesh(*args.mesh)
    graphdef, params = sharded_abstract_state(cfg, mesh)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-6, max_grad_norm=1.0))
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt,
                             opt_state_shardings(optimizer, params))
    objective = grpo_objective(GRPOConfig.preset("grpo", group_size=args.group, beta=0.04), temperature=1.0,
                               chunk_size=args.logit_chunk)
    batch = abstract_batch(args.rows, args.prompt, args.completion, args.group, cfg.vocab_size, mesh)
    with jax.set_mesh(mesh):
        update = make_update_step(graphdef, optimizer, objective, args.micro_batches, group_size=args.group,
                                  state_shardings=shardings_of((params, opt_state)))
        start = time.perf_counter()
        compiled = update.lower(params, opt_state, batch).compile()
    seconds = time.perf_counter() - start

    gib = 2 ** 30
    memory = compiled.memory_analysis()
    print(f"{args.preset} ({cfg.num_layers} layers, {args.dtype} compute), mesh (data, fsdp, tensor) = "
          f"{tuple(args.mesh)}, {args.rows} × ({args.prompt} + {args.completion}) tokens, G = {args.group}, "
          f"{args.micro_batches} micro-batch(es), logit chunk {args.logit_chunk}; compiled in {seconds:.0f} s")
    print(f"per device: arguments {memory.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{memory.output_size_in_bytes / gib:.2f} GiB, temporaries {memory.temp_size_in_bytes / gib:.2f} GiB")
    found = collectives(compiled.as_text())
    for kind in COLLECTIVES:
        sizes = found.get(kind, [])
        print(f"{kind:>18}: {len(sizes):4d} ops, {sum(b for b, _ in sizes) / 2**20:10,.0f} MiB of results")
    largest = sorted(found.get("all-gather", []), reverse=True)[:6]
    print("largest all-gathers: " + ", ".join(f"{t} ({b / 2**20:,.0f} MiB)" for b, t in largest))


if __name__ == "__main__":
    main()
