"""Generation throughput: r1jax's sampler vs HF `generate` on the shared workload, in one run.

WORKLOAD.md's generation-throughput workload: the first 64 prompts (16 tokens each), 128 new
tokens per row with every row forced to full length (EOS banned until the end: HF
`min_new_tokens=128`, ours `min_new_tokens=max_new_tokens`), temperature 1.0, no top-k/top-p,
KV cache on. One warm-up call, then 3 timed calls; a call includes tokenization and decoding.
tokens/s = 64·128 / wall time of one call. The 64-new-token variant (the GRPO length) likewise.
Calls of the two frameworks are interleaved so that both see the same machine load.

Besides wall time, each call's process CPU time is recorded: on a shared machine the wall time
of a 2-thread program depends on what else runs, CPU time much less so. The roofline is this
CPU's achieved fp32 matmul FLOP/s (a large jitted `jnp.dot`), measured in the same run, both
per wall second and per CPU second; the model's FLOPs per token are 2 × matmul parameters plus
attention over the mean context. `--hf-1thread` adds HF with one intra-op thread (not the
workload's setting: a contention-robust reference, since 2 spinning OpenMP threads degrade badly
when the cores are oversubscribed).

    python -m bench.sampler                      # both lengths, r1jax and HF
    python -m bench.sampler --new-tokens 128 --no-hf
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.sampler   # r1jax on a 2-device mesh

With several JAX devices (on CPU: the XLA flag above, one device per core), r1jax runs on a
`data` mesh over all of them, rows split between devices, as it runs sharded in training; XLA:CPU
runs each device's program on its own thread. HF keeps its 2 torch threads.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from bench import workload
from bench.workload import BOS_ID, EOS_ID, PAD_ID, PROMPT_TOKENS, build_tokenizer, encode_prompts, prompts
from r1jax.sampling import SamplingConfig, sample_groups
from r1jax.sharding import make_mesh

BATCH = 64


def run_r1jax(texts, tokenizer, graphdef, state, new_tokens: int, key, mesh=None) -> list[str]:
    ids = encode_prompts(tokenizer, texts)
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, eos_ids=(EOS_ID,),
                            min_new_tokens=new_tokens, pad_id=PAD_ID)
    lengths = np.full(len(ids), ids.shape[1], np.int32)
    out = sample_groups(graphdef, state, (ids, lengths), 1, key, config, mesh=mesh)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (len(texts), new_tokens) and bool(np.all(out.mask)), "every row must run full length"
    return tokenizer.batch_decode(tokens)


def run_hf(texts, tokenizer, model, new_tokens: int) -> list[str]:
    import torch

    enc = tokenizer(texts, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, use_cache=True, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
            bos_token_id=BOS_ID,
        )
    completions = out[:, enc["input_ids"].shape[1]:]
    assert completions.shape == (len(texts), new_tokens), completions.shape
    return tokenizer.batch_decode(completions)


def bench(calls: dict, new_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per call: median tokens/s (wall) and tokens per CPU second; calls are interleaved."""
    for call in calls.values():
        call(0)  # warm-up (compilation for r1jax)
    times = {name: [] for name in calls}
    for i in range(repeats):
        for name, call in calls.items():
            times[name].append(workload.timed(lambda call=call, i=i: call(i + 1)))
    result = {}
    tokens = BATCH * new_tokens
    for name, ts in times.items():
        wall, cpu = np.array([t[0] for t in ts]), np.array([t[1] for t in ts])
        result[name] = {"tps": tokens / float(np.median(wall)), "tpcs": tokens / float(np.median(cpu))}
        print(f"  {name:10s} wall {', '.join(f'{t:.2f}' for t in wall)} s, CPU {', '.join(f'{t:.2f}' for t in cpu)} s"
              f" -> {result[name]['tps']:,.0f} tokens/s (median wall), {result[name]['tpcs']:,.0f} tokens/CPU-s")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--hf-1thread", action="store_true", help="also time HF with 1 torch thread")
    parser.add_argument("--hf-attn", default="sdpa", help="HF's attn_implementation (sdpa: transformers' default)")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    texts = [p.text for p in prompts(BATCH)]
    assert encode_prompts(tokenizer, texts).shape == (BATCH, PROMPT_TOKENS)
    mesh = make_mesh(data=jax.device_count(), fsdp=1, tensor=1) if jax.device_count() > 1 else None
    graphdef, state = nnx.split(workload.r1jax_model(mesh))
    cfg = nnx.merge(graphdef, state).cfg
    hf = None if args.no_hf else workload.hf_model(args.hf_attn)
    jiffies = workload.cpu_jiffies()
    print(workload.run_header())
    roof_wall, roof_cpu = workload.matmul_roofline()
    print(f"fp32 matmul roofline (2048³ jnp.dot): {roof_wall / 1e9:.1f} GFLOP/s per wall second, "
          f"{roof_cpu / 1e9:.1f} per CPU second")

    for n in args.new_tokens:
        print(f"batch {BATCH} × {PROMPT_TOKENS}-token prompts × {n} new tokens (forced), temperature 1.0; "
              f"HF attention {args.hf_attn}")

        def ours(i, n=n):
            return run_r1jax(texts, tokenizer, graphdef, state, n, jax.random.key(i), mesh)

        def theirs(i, n=n, threads=workload.TORCH_THREADS):
            import torch

            torch.set_num_threads(threads)
            torch.manual_seed(i)
            try:
                return run_hf(texts, tokenizer, hf, n)
            finally:
                torch.set_num_threads(workload.TORCH_THREADS)

        calls = {"r1jax": ours}
        if hf is not None:
            calls["HF"] = theirs
            if args.hf_1thread:
                calls["HF 1thread"] = lambda i, n=n: theirs(i, n, threads=1)
        r = bench(calls, n, args.repeats)
        flops = np.mean([cfg.flops_per_token(PROMPT_TOKENS + j + 1) for j in range(n)])
        ours_wall, ours_cpu = r["r1jax"]["tps"] * flops, r["r1jax"]["tpcs"] * flops
        print(f"  r1jax: {flops / 1e6:.2f} MFLOP/token -> {ours_wall / 1e9:.1f} GFLOP/s = {ours_wall / roof_wall:.0%}"
              f" of the wall roofline; per CPU second {ours_cpu / 1e9:.1f} GFLOP = {ours_cpu / roof_cpu:.0%}")
        for other in [k for k in r if k != "r1jax"]:
            print(f"  r1jax / {other}: {r['r1jax']['tps'] / r[other]['tps']:.2f}× tokens/s (wall), "
                  f"{r['r1jax']['tpcs'] / r[other]['tpcs']:.2f}× tokens per CPU second")
    print(workload.steal_report(jiffies))


if __name__ == "__main__":
    main()
