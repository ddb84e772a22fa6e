"""Throughput of the math accuracy reward: 4,096 completions graded sequentially and in a RewardPool.

    python bench/rewards.py [--n 4096] [--workers N] [--data-dir PATH]

Completions are built deterministically (seed 0) from MATH-500 and GSM8K test: the gold solution,
the gold answer in R1-Zero tags, and the same two with a perturbed answer (an integer answer plus
one, else another problem's answer), so about half are correct and half must go through sympy
before being rejected, which is the expensive path. Both runs must agree sample for sample.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

from r1jax.rewards import RewardPool, accuracy_reward

DEFAULT_DATA = Path(os.environ.get("R1JAX_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _perturbed(answer: str, other: str) -> str:
    if re.fullmatch(r"-?\d+", answer.replace(",", "")):
        return str(int(answer.replace(",", "")) + 1)
    return other


def build_completions(data_dir: Path, n: int, seed: int = 0) -> tuple[list[str], list[str], list[bool]]:
    """(completions, gold answers, whether each completion is meant to be correct)."""
    math500 = [(r["solution"], r["answer"]) for r in _rows(data_dir / "math500.jsonl")]
    gsm8k = [(r["answer"], r["answer"].rsplit("####", 1)[1].strip())
             for r in _rows(data_dir / "gsm8k_test.jsonl")]
    rng = random.Random(seed)
    completions, golds, correct = [], [], []
    for i in range(n):
        pool = math500 if i % 2 == 0 else gsm8k
        solution, gold = pool[rng.randrange(len(pool))]
        other = pool[rng.randrange(len(pool))][1]
        reasoning = solution.rsplit("####", 1)[0]
        kind = rng.randrange(4)
        if kind == 0:
            text, ok = solution, True
        elif kind == 1:
            text, ok = f"<think>{reasoning}</think> <answer>{gold}</answer>", True
        elif kind == 2:
            wrong = _perturbed(gold, other)
            text = f"{reasoning}\nThe final answer is $\\boxed{{{wrong}}}$."
            ok = wrong == gold
        else:
            wrong = _perturbed(gold, other)
            text, ok = f"<think>{reasoning}</think> <answer>{wrong}</answer>", wrong == gold
        completions.append(text)
        golds.append(gold)
        correct.append(ok)
    return completions, golds, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    completions, golds, intended = build_completions(args.data_dir, args.n)
    prompts = [""] * args.n
    print(f"{args.n} completions ({sum(intended)} built correct), {os.cpu_count()} CPUs")

    start, cpu_start = time.perf_counter(), time.process_time()
    latencies, sequential = [], []
    for c, g in zip(completions, golds, strict=True):
        t = time.perf_counter()
        sequential += accuracy_reward([""], [c], answer=[g])
        latencies.append(time.perf_counter() - t)
    seq_s, seq_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    ms = sorted(x * 1e3 for x in latencies)
    print(f"sequential: {seq_s:.1f} s, {args.n / seq_s:.0f} completions/s, "
          f"accuracy {sum(sequential) / args.n:.3f}; "
          f"per completion p50 {statistics.median(ms):.2f} ms, p99 {ms[int(0.99 * len(ms))]:.1f} ms, "
          f"max {ms[-1]:.0f} ms; CPU {seq_cpu / args.n * 1e3:.2f} ms per completion")

    start = time.perf_counter()
    with RewardPool(num_workers=args.workers, timeout=30.0) as pool:
        warm = slice(0, args.workers)
        pool.score(accuracy_reward, prompts[warm], completions[warm], answer=golds[warm])
        startup_s = time.perf_counter() - start
        pids = [w.proc.pid for w in pool._workers]
        cpu_before = [_cpu_seconds(pid) for pid in pids]
        start = time.perf_counter()
        pooled = pool.score(accuracy_reward, prompts, completions, answer=golds)
        pool_s = time.perf_counter() - start
        cpu_after = [_cpu_seconds(pid) for pid in pids]
        stats = pool.stats
    if None in cpu_before or None in cpu_after:
        pool_cpu = float("nan")
    else:
        pool_cpu = sum(cpu_after) - sum(cpu_before)
    print(f"pool ({args.workers} workers): {pool_s:.1f} s, {args.n / pool_s:.0f} completions/s "
          f"(+{startup_s:.1f} s start-up and warm-up); workers' CPU {pool_cpu / args.n * 1e3:.2f} ms per "
          f"completion; stats {stats}")
    disagree = sum(a != b for a, b in zip(sequential, pooled, strict=True))
    mismatched = sum((s == 1.0) != ok for s, ok in zip(sequential, intended, strict=True))
    print(f"sequential vs pool disagreements: {disagree}; graded differently from construction: {mismatched}")


if __name__ == "__main__":
    main()
