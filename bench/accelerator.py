"""Accelerator benchmarks for a ≥ 0.5B config: decode tokens/s against the HBM roofline, GRPO
train-step MFU, and the peak each is measured against, all in one run on the default device.

Random weights (the numbers depend on shapes only), bf16 compute.

* decode (#3): `sampling.generate` with P prompts of 16 tokens and N new tokens per row forced to full
  length (no stop id), temperature 1.0, bf16 parameters and KV cache. tokens/s = P·N / wall time of
  one call (median of 3 after a warm-up; the 16-token prefill is included). A decode step must read
  every parameter once plus the filled part of each row's KV cache, so the step's floor is
  (parameter bytes + KV bytes at the mean context) / HBM bandwidth: `roofline` is that floor's
  tokens/s, against both the measured copy bandwidth and the chip's specification.
* train (#6): one GRPO update (`trainers.steps.make_update_step` with the GRPO objective, β > 0, so
  the old and reference log-probs come in the batch) on B rows of L prompt + N completion tokens,
  fp32 parameters and AdamW state, bf16 compute; median of 5 steps after the compiling one.
  MFU = model FLOPs / step time / the chip's dense bf16 peak; model FLOPs = 3 × forward, where the
  forward counts 2 × matmul parameters per token, causal attention over each token's own context,
  and the LM head only where a log-prob is taken (the N completion tokens). Attention runs block by
  block past the preset's `attention_block` queries (`--attention-block 0`: one-shot, as in session 3),
  and the log-softmax over the vocabulary in chunks of `--logit-chunk` completion tokens (the trainer's
  default; session 3 took the whole completion at once).

    python -m bench.accelerator                                  # qwen2.5-0.5b: decode P=1, 64; train
    python -m bench.accelerator --preset qwen2.5-1.5b --skip-train
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.grpo import GRPOConfig
from r1jax.metrics import peak_flops_per_device
from r1jax.model import abstract_model, get_preset
from r1jax.sampling import SamplingConfig, decode_phases, generate
from r1jax.trainers.optim import OptimConfig, make_optimizer
from r1jax.trainers.rl import RLConfig, forward_flops
from r1jax.trainers.steps import grpo_objective, init_train_state

PROMPT_TOKENS = 16
# Specified HBM bandwidth (bytes/s) by device-kind substring; the measured copy bandwidth is printed too.
_SPEC_BANDWIDTH = (("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h200", 4.8e12), ("a100", 2.0e12))


def spec_bandwidth(device) -> float | None:
    kind = device.device_kind.lower()
    return next((bw for pattern, bw in _SPEC_BANDWIDTH if pattern in kind), None)


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a jitted elementwise op over an `n_bytes` bf16 array."""
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    double = jax.jit(lambda a: a * 2)
    return 2 * n_bytes / median_seconds(lambda: double(x), 5)


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def kv_bytes_per_token(cfg) -> int:
    """Bytes of keys + values one token holds in the cache, over all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def random_model(cfg):
    """(graphdef, state) of normal(0, 0.02) parameters drawn on the host: `init_model`'s one jitted
    initialiser compiles every parameter's RNG separately, which took minutes on the H100 (see RESULTS)."""
    graphdef, abstract = abstract_model(cfg)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32), x.dtype), abstract)
    return graphdef, state


def bench_decode(cfg, batch: int, new_tokens: int, bandwidths: dict[str, float]) -> dict[str, float]:
    graphdef, state = random_model(cfg)
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, PROMPT_TOKENS)), jnp.int32)
    lengths = jnp.full((batch,), PROMPT_TOKENS, jnp.int32)
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    calls = iter(range(1 << 30))
    seconds = median_seconds(
        lambda: generate(graphdef, state, prompts, lengths, jax.random.key(next(calls)), config).tokens, 3)
    # Per decode step: every parameter once, plus the filled KV cache at the mean context.
    mean_context = PROMPT_TOKENS + (new_tokens - 1) / 2
    step_bytes = state_bytes(state) + batch * mean_context * kv_bytes_per_token(cfg)
    tokens_per_s = batch * new_tokens / seconds
    out = {"batch": batch, "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": tokens_per_s,
           "step_ms": 1e3 * seconds / new_tokens, "param_gb": state_bytes(state) / 1e9, "step_gb": step_bytes / 1e9,
           "phases": len(decode_phases(new_tokens))}
    for name, bw in bandwidths.items():
        out[f"roofline_tokens_per_s[{name}]"] = batch * bw / step_bytes
        out[f"fraction[{name}]"] = tokens_per_s / (batch * bw / step_bytes)
    return out


def bench_train(cfg, rows: int, prompt: int, completion: int, chunk: int, peak: float | None) -> dict[str, float]:
    start = time.perf_counter()
    graphdef, params = random_model(cfg)
    loss = GRPOConfig.preset("grpo", group_size=8, beta=0.04)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-6, max_grad_norm=1.0))
    objective = grpo_objective(loss, temperature=1.0, chunk_size=chunk)
    params, opt_state, update = init_train_state(graphdef, params, optimizer, objective, 1, None)
    init_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    logp = -rng.exponential(2.0, (rows, completion)).astype(np.float32)
    batch = {
        "prompt_tokens": rng.integers(3, cfg.vocab_size, (rows, prompt)), "prompt_mask": np.ones((rows, prompt), bool),
        "tokens": rng.integers(3, cfg.vocab_size, (rows, completion)), "mask": np.ones((rows, completion), bool),
        "old_logp": logp, "ref_logp": logp + rng.normal(0, 0.05, logp.shape).astype(np.float32),
        "advantages": rng.normal(size=rows).astype(np.float32),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    start = time.perf_counter()
    update = update.lower(params, opt_state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state = {"params": params, "opt_state": opt_state}

    def step():
        state["params"], state["opt_state"], metrics = update(state["params"], state["opt_state"], batch)
        return metrics["loss"]

    seconds = median_seconds(step, 5)
    flops = 3 * forward_flops(cfg, 0, np.full(rows, prompt + completion), logits=completion)  # fwd + bwd
    out = {"rows": rows, "prompt": prompt, "completion": completion, "remat": cfg.remat,
           "attention_block": cfg.attention_block, "logit_chunk": min(chunk, completion),
           "init_seconds": init_seconds, "compile_seconds": compile_seconds, "seconds": seconds,
           "tokens_per_s": rows * (prompt + completion) / seconds, "tflops_per_s": flops / seconds / 1e12}
    if peak:
        out["mfu"] = flops / seconds / peak
    return out


def report(kind: str, result: dict) -> None:
    print(kind + " " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--train", nargs="+", default=["16x128x896:none"],
                        help="ROWSxPROMPTxCOMPLETION:REMAT configurations of the update step")
    parser.add_argument("--attention-block", type=int, default=None,
                        help="model.attention_block of the update step (default: the preset's; 0: one-shot attention)")
    parser.add_argument("--logit-chunk", type=int, default=RLConfig.chunk_size,
                        help="completion tokens per log-softmax chunk (rl.chunk_size; session 3: the whole completion)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    bandwidths = {"measured copy": copy_bandwidth()}
    if spec_bandwidth(device):
        bandwidths["spec"] = spec_bandwidth(device)
    print("HBM bandwidth: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bandwidths.items()))
    cfg = get_preset(args.preset, param_dtype="bfloat16", dtype="bfloat16")
    print(f"model: {args.preset}, {cfg.num_params / 1e6:.0f}M parameters")
    for b in [] if args.skip_decode else args.decode_batches:
        report("decode", bench_decode(cfg, b, args.new_tokens, bandwidths))
    if args.skip_train:
        return
    peak = peak_flops_per_device(device)
    print(f"dense bf16 peak: {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    for spec in args.train:
        shape, remat = spec.split(":")
        rows, prompt, completion = (int(x) for x in shape.split("x"))
        train_cfg = get_preset(args.preset, param_dtype="float32", dtype="bfloat16", remat=remat)
        if args.attention_block is not None:
            train_cfg = train_cfg.replace(attention_block=args.attention_block)
        try:
            report("train", bench_train(train_cfg, rows, prompt, completion, args.logit_chunk, peak))
        except Exception as e:  # noqa: BLE001 — an out-of-memory configuration is reported, the next one runs
            print(f"train {spec}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
