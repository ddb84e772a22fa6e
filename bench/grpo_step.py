"""GRPO step time: r1jax's `GRPOTrainer` against TRL's `GRPOTrainer` on the shared workload, in one run.

WORKLOAD.md's "GRPO step": the bench Qwen2 (3.18 M parameters, the seed-0 weights of
`bench/workload.py` in both frameworks), 8 prompts × G = 8 completions per step, 16-token prompts
(step k uses prompts 8(k−1) … 8k−1), exactly 64 new tokens per completion (TRL
`min_new_tokens=64`; r1jax bans EOS until the end), temperature 1, β = 0.04 against a frozen
reference copy (k3 KL), ε = 0.2, μ = 1 (old log-probs = the current ones), loss_type "grpo"
(per-sequence token mean, then batch mean), AdamW lr 1e-5 constant, betas (0.9, 0.999), eps 1e-8,
no weight decay, no gradient clipping, one optimizer step per 64 completions, the digit-run reward,
6 steps. Figures are medians over steps 2–6 (step 1 compiles / warms up).

The frameworks alternate step by step: TRL's `Trainer.train()` drives its steps, and a callback
times each one (`on_step_begin` → `on_step_end`: generation, reference pass, rewards, loss,
backward, AdamW) and then runs r1jax's step k, so both see the same machine load. Every step is
timed in wall and in process CPU seconds (the box is shared: CPU time depends much less on the
other jobs). Torch uses 2 intra-op threads, XLA:CPU its default pool.

Time split, by wrapping the method that does each phase (wall and CPU):
  r1jax  generate = `trainer.sample` (blocked on); reference = the reference `_score` pass;
         reward = `_score_rewards` (decoding + reward); update = the jitted `_update` (policy
         forward + backward + AdamW); other = the rest of `step` (host arrays, advantages, metrics).
  TRL    generate = `_generate_single_turn` (HF `generate`); reference =
         `_get_per_token_logps_and_entropies` on `ref_model`; reward = `_calculate_rewards`;
         update = the step minus `_prepare_inputs` (policy forward + backward, grad norm, AdamW,
         zero_grad); other = the rest of `_prepare_inputs` (tokenizing, padding, decoding, advantages).

TRL settings that differ from its defaults, so that it runs the workload and nothing more:
bf16=False (fp32 like r1jax), gradient_checkpointing=False (TRL's default recomputes the forward
during the backward, work r1jax does not do), max_grad_norm=0 (no clipping; the norm is still
computed for logging, as r1jax does), shuffle_dataset=False (the workload's prompt order),
use_cpu, report_to none, no logging or saving. The run checks what it relies on: TRL's settings,
its optimizer's hyper-parameters, 64-token completions on both sides, one reference pass and one
policy pass per TRL step (no old-log-prob pass), no recompilation in r1jax after step 1.

Roofline: the step's model FLOPs (generation: 2 × matmul parameters per token plus attention over
the context, each distinct prompt prefilled once; one reference forward and one policy
forward + backward ≈ 3 × forward over 64 × 80 tokens, the LM head where logits are taken) per
second, divided by the fp32 matmul
FLOP/s measured in the same run (a 2048³ jitted `jnp.dot`, as bench/sampler.py), per wall second
and per CPU second. The same FLOP count serves both frameworks (it is the workload's work, not
what an implementation happens to compute; r1jax's reference and policy passes run each prompt once
per group, ≈ 17 % fewer FLOPs in those passes than this count, so its fraction is an effective
one); `torch.mm` is measured too, for reference.

    python -m bench.grpo_step               # both frameworks, alternating
    python -m bench.grpo_step --no-trl      # r1jax alone (e.g. with --profile DIR for a trace of step 3)
    python -m bench.grpo_step --torch-threads 1   # TRL with 1 intra-op thread (outside the workload)
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m bench.grpo_step   # r1jax on 2 CPU devices
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from bench import workload
from bench.workload import EOS_ID, PAD_ID, PROMPT_TOKENS, build_tokenizer, encode_prompts, prompts
from r1jax import sampling
from r1jax.grpo import GRPOConfig
from r1jax.rewards import combine
from r1jax.sampling import SamplingConfig
from r1jax.sharding import make_mesh
from r1jax.trainers.optim import OptimConfig
from r1jax.trainers.rl import GRPOTrainer, RLConfig, forward_flops, generation_flops

PROMPTS_PER_STEP = 8
GROUP = 8
NEW_TOKENS = 64
STEPS = 6
BETA = 0.04
EPSILON = 0.2
LEARNING_RATE = 1e-5
PHASES = ("generate", "reference", "reward", "update", "other")


def digit_run_reward(prompts, completions, answer, **_) -> list[float]:
    """The workload's reward, in the signature both trainers call: (prompts, completions, **columns)."""
    return [workload.reward(c, a) for c, a in zip(completions, answer, strict=True)]


def step_flops(cfg) -> float:
    """Model FLOPs of one workload step (the same for both frameworks; see the module docstring)."""
    rows = PROMPTS_PER_STEP * GROUP
    prompt_lengths = np.full(rows, PROMPT_TOKENS)
    generate = generation_flops(cfg, prompt_lengths, np.full(rows, NEW_TOKENS), GROUP)
    return generate + (1 + 3) * forward_flops(cfg, 0, prompt_lengths + NEW_TOKENS, logits=NEW_TOKENS)


class StepClock:
    """Wall and CPU seconds of each phase and of each whole step; calls counted per phase."""

    def __init__(self, name: str):
        self.name = name
        self.steps: list[dict[str, tuple[float, float]]] = []
        self.calls: list[dict[str, int]] = []
        self._phases: dict[str, tuple[float, float]] = {}
        self._calls: dict[str, int] = {}
        self._start = (0.0, 0.0)

    def add(self, phase: str, wall: float, cpu: float) -> None:
        w, c = self._phases.get(phase, (0.0, 0.0))
        self._phases[phase] = (w + wall, c + cpu)
        self._calls[phase] = self._calls.get(phase, 0) + 1

    def wrap(self, fn: Callable, phase: str, *, when: Callable[..., bool] | None = None, block: bool = False):
        """`fn`, timed into `phase` (only the calls for which `when(*args)` holds); `block` waits for JAX outputs."""

        def timed_fn(*args, **kwargs):
            if when is not None and not when(*args, **kwargs):
                return fn(*args, **kwargs)
            w, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
            self.add(phase, time.perf_counter() - w, time.process_time() - c)
            return out

        return timed_fn

    def start(self) -> None:
        self._phases, self._calls = {}, {}
        self._start = (time.perf_counter(), time.process_time())

    def stop(self) -> dict[str, tuple[float, float]]:
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        phases = dict(self._phases)
        if "prepare" in phases:  # TRL: the update is what the step does besides preparing its inputs
            prep = phases.pop("prepare")
            phases["update"] = (wall - prep[0], cpu - prep[1])
            inner = [phases.get(p, (0.0, 0.0)) for p in ("generate", "reference", "reward")]
            phases["other"] = (prep[0] - sum(w for w, _ in inner), prep[1] - sum(c for _, c in inner))
        else:
            phases["other"] = (wall - sum(w for w, _ in phases.values()), cpu - sum(c for _, c in phases.values()))
        phases["step"] = (wall, cpu)
        self.steps.append(phases)
        self.calls.append(dict(self._calls))
        print(f"  {self.name:5s} step {len(self.steps)}: {wall:6.2f} s wall, {cpu:6.2f} s CPU  ("
              + ", ".join(f"{p} {phases.get(p, (0.0, 0.0))[0]:.2f}" for p in PHASES) + ")", flush=True)
        return phases


# ------------------------------------------------------------------------------------ r1jax


def r1jax_trainer(tokenizer) -> GRPOTrainer:
    config = RLConfig(
        steps=STEPS, prompts_per_step=PROMPTS_PER_STEP,
        loss=GRPOConfig.preset("grpo", group_size=GROUP, beta=BETA, epsilon_low=EPSILON, epsilon_high=EPSILON,
                               num_iterations=1, kl_estimator="k3", aggregation="seq_mean_token_mean"),
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, eos_ids=(EOS_ID,),
                                min_new_tokens=NEW_TOKENS, pad_id=PAD_ID),
        optim=OptimConfig(learning_rate=LEARNING_RATE, schedule="constant", b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=0.0, max_grad_norm=0.0),
        num_minibatches=1, micro_batches=1, seed=0,
    )
    # Several JAX devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2, one per core): a data mesh.
    mesh = make_mesh(data=jax.device_count(), fsdp=1, tensor=1) if jax.device_count() > 1 else None
    return GRPOTrainer(config, workload.r1jax_model(mesh), tokenizer, combine({"digit_run": (digit_run_reward, 1.0)}),
                       mesh=mesh)


class R1jaxRun:
    """r1jax's trainer with its phases timed; `step()` runs the next workload step."""

    def __init__(self, tokenizer, profile_dir: str | None = None):
        self.tokenizer, self.profile_dir = tokenizer, profile_dir
        self.trainer = t = r1jax_trainer(tokenizer)
        self.clock = clock = StepClock("r1jax")
        self.update_fn, self.score_fn = t._update, t._score
        t.sample = clock.wrap(t.sample, "generate", block=True)
        t._score = clock.wrap(t._score, "reference", block=True)
        t._score_rewards = clock.wrap(t._score_rewards, "reward")
        t._update = clock.wrap(t._update, "update", block=True)
        self.metrics: list[dict[str, float]] = []

    def next_batch(self) -> dict:
        batch = prompts(PROMPTS_PER_STEP, PROMPTS_PER_STEP * self.trainer.step_count)
        texts = [p.text for p in batch]
        return {"prompt": texts, "prompt_ids": encode_prompts(self.tokenizer, texts).tolist(),
                "answer": [p.answer for p in batch]}

    def step(self) -> None:
        profile = self.profile_dir is not None and self.trainer.step_count == 2
        if profile:
            jax.profiler.start_trace(self.profile_dir)
        self.clock.start()
        m = self.trainer.step(self.next_batch)
        self.clock.stop()
        if profile:
            jax.profiler.stop_trace()
        if not (m["completion/length_mean"] == m["completion/length_max"] == NEW_TOKENS):
            raise AssertionError(f"r1jax completions must all be {NEW_TOKENS} tokens: {m}")
        self.metrics.append(m)

    def check(self) -> str:
        compiled = {"sampler traces": sampling.trace_count(), "update programs": self.update_fn._cache_size(),
                    "score programs": self.score_fn._cache_size()}
        if any(n != 1 for n in compiled.values()):
            raise AssertionError(f"r1jax compiled more than once: {compiled}")
        for calls in self.clock.calls:
            if calls != {"generate": 1, "reference": 1, "reward": 1, "update": 1}:
                raise AssertionError(f"r1jax step did other work than one pass of each phase: {calls}")
        return ", ".join(f"{k} {v}" for k, v in compiled.items())


# ------------------------------------------------------------------------------------ TRL


def trl_trainer(tokenizer, folder: str, output_dir: str, callback, attn: str):
    import datasets
    import trl

    items = prompts(STEPS * PROMPTS_PER_STEP)
    data = datasets.Dataset.from_dict({"prompt": [p.text for p in items], "answer": [p.answer for p in items]})
    args = trl.GRPOConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", seed=0, max_steps=STEPS,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0, top_p=1.0, top_k=0, beta=BETA, epsilon=EPSILON, num_iterations=1, loss_type="grpo",
        scale_rewards="group", importance_sampling_level="token", mask_truncated_completions=False,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=0.0, bf16=False, fp16=False, gradient_checkpointing=False,
        shuffle_dataset=False, logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32", "attn_implementation": attn},
    )
    return trl.GRPOTrainer(model=folder, reward_funcs=digit_run_reward, args=args, train_dataset=data,
                           processing_class=tokenizer, callbacks=[callback])


def check_trl_setup(trainer, optimizer, scheduler, threads: int) -> str:
    """Fail unless TRL runs exactly the workload's algorithm; returns a one-line summary."""
    import torch

    a, g = trainer.args, trainer.generation_config
    groups = optimizer.param_groups
    want = {
        "beta": (trainer.beta, BETA), "epsilon_low": (trainer.epsilon_low, EPSILON),
        "epsilon_high": (trainer.epsilon_high, EPSILON), "loss_type": (trainer.loss_type, "grpo"),
        "num_iterations": (trainer.num_iterations, 1),
        "gradient_accumulation_steps": (a.gradient_accumulation_steps, 1),
        "steps_per_generation": (a.steps_per_generation, 1),
        "generation_batch_size": (a.generation_batch_size, PROMPTS_PER_STEP * GROUP),
        "max_grad_norm": (a.max_grad_norm, 0.0), "bf16": (a.bf16, False), "fp16": (a.fp16, False),
        "gradient_checkpointing": (a.gradient_checkpointing, False), "use_vllm": (trainer.use_vllm, False),
        "max_new_tokens": (g.max_new_tokens, NEW_TOKENS), "min_new_tokens": (g.min_new_tokens, NEW_TOKENS),
        "do_sample": (g.do_sample, True), "temperature": (g.temperature, 1.0), "top_p": (g.top_p, 1.0),
        "top_k": (g.top_k, 0), "reference model": (trainer.ref_model is not None, True),
        "lr": ({x["lr"] for x in groups}, {LEARNING_RATE}), "betas": ({x["betas"] for x in groups}, {(0.9, 0.999)}),
        "adam eps": ({x["eps"] for x in groups}, {1e-8}), "weight_decay": ({x["weight_decay"] for x in groups}, {0.0}),
        "torch threads": (torch.get_num_threads(), threads),
        "policy dtype": (trainer.model.dtype, torch.float32),
    }
    bad = {k: v for k, (v, w) in want.items() if v != w}
    if bad:
        raise AssertionError(f"TRL is not set up as the workload says: {bad}")
    weights = workload.hf_weights()
    for model in (trainer.model, trainer.ref_model):
        state = model.state_dict()
        if any(not np.array_equal(state[k].detach().numpy(), w) for k, w in weights.items()):
            raise AssertionError("TRL's policy/reference weights differ from the workload's seed-0 weights")
    return (f"{type(optimizer.optimizer if hasattr(optimizer, 'optimizer') else optimizer).__name__} "
            f"({trainer.args.optim}), {type(scheduler).__name__}, attention {trainer.model.config._attn_implementation}"
            f", β {trainer.beta}, ε {trainer.epsilon_low}/{trainer.epsilon_high}, loss_type {trainer.loss_type}, "
            f"{threads} torch thread(s)")


def run_both(tokenizer, r1: R1jaxRun, attn: str, threads: int) -> StepClock:
    """TRL's steps, each followed by r1jax's step of the same index."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    clock = StepClock("TRL")
    summary = {}

    class Alternate(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            summary["setup"] = check_trl_setup(trainer, optimizer, lr_scheduler, threads)

        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            clock.stop()
            for name in ("reward", "kl"):  # TRL's log() clears its metrics at the end of train()
                summary.setdefault(name, []).append(trainer._metrics["train"][name][-1])
            if lr_scheduler.get_last_lr() != [LEARNING_RATE] * len(lr_scheduler.get_last_lr()):
                raise AssertionError(f"TRL learning rate is not constant: {lr_scheduler.get_last_lr()}")
            r1.step()

    def generated(fn):
        def check(*args, **kwargs):
            completion_ids, logprobs = fn(*args, **kwargs)
            lengths = sorted({len(c) for c in completion_ids})
            if len(completion_ids) != PROMPTS_PER_STEP * GROUP or lengths != [NEW_TOKENS]:
                raise AssertionError(f"TRL generated {len(completion_ids)} completions of lengths {lengths}")
            return completion_ids, logprobs

        return check

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(workload.write_hf_folder(os.path.join(tmp, "model")))
        trainer = trl_trainer(tokenizer, folder, os.path.join(tmp, "out"), Alternate(), attn)
        trainer.remove_callback(transformers.PrinterCallback)  # its end-of-training summary, not ours
        is_ref = lambda model, *a, **k: model is trainer.ref_model
        is_policy = lambda model, *a, **k: model is not trainer.ref_model
        trainer._generate_single_turn = clock.wrap(generated(trainer._generate_single_turn), "generate")
        logps = trainer._get_per_token_logps_and_entropies
        trainer._get_per_token_logps_and_entropies = clock.wrap(clock.wrap(logps, "reference", when=is_ref),
                                                                "policy pass", when=is_policy)
        trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "reward")
        trainer._prepare_inputs = clock.wrap(trainer._prepare_inputs, "prepare")
        trainer.train()
    print(f"TRL: {summary['setup']}")
    for calls in clock.calls:  # the policy pass belongs to the update: drop it from the split
        if calls != {"generate": 1, "reference": 1, "policy pass": 1, "reward": 1, "prepare": 1}:
            raise AssertionError(f"TRL step did other work than one pass of each phase: {calls}")
    for phases in clock.steps:
        phases.pop("policy pass")
    clock.rewards, clock.kl = summary["reward"], summary["kl"]
    return clock


# ------------------------------------------------------------------------------------ report


def summarise(clock: StepClock, flops: float, roof: tuple[float, float]) -> dict[str, float]:
    timed = clock.steps[1:]  # steps 2–6
    wall = float(np.median([s["step"][0] for s in timed]))
    cpu = float(np.median([s["step"][1] for s in timed]))
    mean_wall = float(np.mean([s["step"][0] for s in timed]))
    split = {p: float(np.mean([s.get(p, (0.0, 0.0))[0] for s in timed])) for p in PHASES}
    split_cpu = {p: float(np.mean([s.get(p, (0.0, 0.0))[1] for s in timed])) for p in PHASES}
    walls = ", ".join(f"{s['step'][0]:.2f}" for s in timed)
    print(f"{clock.name}: median step {wall:.3f} s wall, {cpu:.3f} s CPU (steps 2–{len(clock.steps)}: {walls} s wall)")
    print("  split, mean of steps 2–6, wall (CPU): " + ", ".join(
        f"{p} {split[p]:.3f} s = {split[p] / mean_wall:.0%} ({split_cpu[p]:.3f} s)" for p in PHASES))
    print(f"  {flops / wall / 1e9:.1f} GFLOP/s = {flops / wall / roof[0]:.0%} of the wall roofline; "
          f"{flops / cpu / 1e9:.1f} GFLOP per CPU second = {flops / cpu / roof[1]:.0%} of the per-CPU-second roofline")
    return {"wall": wall, "cpu": cpu}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-trl", action="store_true", help="r1jax alone")
    parser.add_argument("--trl-attention", default="sdpa", choices=("sdpa", "eager"),
                        help="attn_implementation of TRL's models (sdpa: transformers' default)")
    parser.add_argument("--torch-threads", type=int, default=workload.TORCH_THREADS,
                        help="TRL intra-op threads (workload: 2; 1 is a contention-robust reference on a busy box)")
    parser.add_argument("--profile", metavar="DIR", help="jax.profiler trace of r1jax's step 3 into DIR")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    jiffies = workload.cpu_jiffies()
    print(workload.run_header())
    roof = workload.matmul_roofline()
    print(f"fp32 matmul roofline (2048³ jnp.dot): {roof[0] / 1e9:.1f} GFLOP/s per wall second, "
          f"{roof[1] / 1e9:.1f} per CPU second")
    if not args.no_trl:
        import torch

        torch.set_num_threads(args.torch_threads)
        t_roof = workload.matmul_roofline(backend="torch")
        print(f"  for reference, torch.mm ({torch.__version__}, {torch.get_num_threads()} threads): "
              f"{t_roof[0] / 1e9:.1f} GFLOP/s per wall second, {t_roof[1] / 1e9:.1f} per CPU second")

    r1 = R1jaxRun(tokenizer, args.profile)
    flops = step_flops(r1.trainer.model_config)
    print(f"{PROMPTS_PER_STEP} prompts × G={GROUP}, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens (forced), "
          f"β={BETA}, ε={EPSILON}, μ=1, AdamW {LEARNING_RATE}; {STEPS} steps; model FLOPs per step "
          f"{flops / 1e9:.1f} GFLOP")
    if args.no_trl:
        for _ in range(STEPS):
            r1.step()
        trl = None
    else:
        trl = run_both(tokenizer, r1, args.trl_attention, args.torch_threads)
    print(f"r1jax: compiled once ({r1.check()})")
    print("mean reward per step: r1jax " + ", ".join(f"{m['reward/digit_run']:.3f}" for m in r1.metrics)
          + ("" if trl is None else "; TRL " + ", ".join(f"{r:.3f}" for r in trl.rewards)))
    print("KL per step: r1jax " + ", ".join(f"{m['train/kl']:.2e}" for m in r1.metrics)
          + ("" if trl is None else "; TRL " + ", ".join(f"{k:.2e}" for k in trl.kl)))

    ours = summarise(r1.clock, flops, roof)
    if trl is not None:
        theirs = summarise(trl, flops, roof)
        print(f"r1jax vs TRL: {theirs['wall'] / ours['wall']:.2f}× faster per step (median wall), "
              f"{theirs['cpu'] / ours['cpu']:.2f}× fewer CPU seconds per step")
    end = os.getloadavg()
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in end)}; {workload.steal_report(jiffies)}")


if __name__ == "__main__":
    main()
