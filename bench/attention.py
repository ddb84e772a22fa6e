"""One-shot against blockwise attention on long GRPO rows: update-step time and XLA's memory report.

The bench model of WORKLOAD.md (its seed-0 weights), a GRPO update (`trainers.steps` with the GRPO
objective, β = 0.04, old and reference log-probs in the batch, AdamW) on R rows of P prompt + N
completion tokens in groups of G with the same prompt, on a `data` mesh of every JAX device. The
update program is compiled once per `model.attention_block` value (0: one-shot), the programs are
called alternately, and each reports its median wall and process CPU time per call, the temporaries
XLA's buffer assignment gives it, and its first update's loss and gradient norm (the same work: they
agree to rounding).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.attention    # 8 × (64 + 1024), blocks 0 256
    python -m bench.attention --rows 8 --completion 2048 --blocks 0 256 512
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.workload import cpu_jiffies, r1jax_model, steal_report, timed
from r1jax.grpo import GRPOConfig
from r1jax.model import abstract_model
from r1jax.sharding import global_rows, make_mesh
from r1jax.trainers.optim import OptimConfig, make_optimizer
from r1jax.trainers.steps import grpo_objective, init_train_state, mesh_context


def grpo_batch(rows: int, prompt: int, completion: int, group: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    logp = -rng.exponential(2.0, (rows, completion)).astype(np.float32)
    return {
        "prompt_tokens": np.repeat(rng.integers(3, vocab, (rows // group, prompt)), group, axis=0).astype(np.int32),
        "prompt_mask": np.ones((rows, prompt), bool),
        "tokens": rng.integers(3, vocab, (rows, completion)).astype(np.int32),
        "mask": np.ones((rows, completion), bool),
        "old_logp": logp, "ref_logp": logp + rng.normal(0, 0.05, logp.shape).astype(np.float32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 256])
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()

    n = jax.device_count()
    mesh = make_mesh(n, 1, 1) if n > 1 else None
    model = r1jax_model(mesh)
    params0 = nnx.state(model)
    batch = grpo_batch(args.rows, args.prompt, args.completion, args.group, model.cfg.vocab_size)
    batch = {k: global_rows(v, mesh) for k, v in batch.items()}
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-5, max_grad_norm=0.0))
    objective = grpo_objective(GRPOConfig(group_size=args.group, beta=0.04), temperature=1.0, chunk_size=512)
    print(f"bench model, {n} JAX device(s); GRPO update on {args.rows} rows × ({args.prompt} + {args.completion}) "
          f"tokens, groups of {args.group}; {args.calls} alternating calls per program")

    runs = {}
    for block in args.blocks:
        cfg = model.cfg.replace(attention_block=block, max_position_embeddings=args.prompt + args.completion)
        with mesh_context(mesh):
            params, opt_state, update = init_train_state(abstract_model(cfg)[0], jax.tree.map(jnp.copy, params0),
                                                         optimizer, objective, 1, mesh, group_size=args.group)
            update = update.lower(params, opt_state, batch).compile()
            params, opt_state, metrics = update(params, opt_state, batch)
        temp = update.memory_analysis().temp_size_in_bytes
        first = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        runs[block] = {"state": (params, opt_state), "update": update, "temp": temp, "first": first, "times": []}

    start = cpu_jiffies()
    for _ in range(args.calls):
        for run in runs.values():
            def call(run=run):
                with mesh_context(mesh):
                    run["state"] = run["update"](*run["state"], batch)[:2]
                    jax.block_until_ready(run["state"])
            run["times"].append(timed(call))
    for block, run in runs.items():
        wall, cpu = (statistics.median(x) for x in zip(*run["times"], strict=True))
        name = "one-shot" if block == 0 else f"block {block}"
        print(f"attention {name:>10}: update {wall * 1e3:,.0f} ms (CPU {cpu * 1e3:,.0f} ms), temporaries "
              f"{run['temp'] / 1e6:,.0f} MB; first update's loss {run['first']['loss']:.7g}, "
              f"gradient norm {run['first']['grad_norm']:.7g}")
    print(steal_report(start))


if __name__ == "__main__":
    main()
