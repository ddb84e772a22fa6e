"""The stages a config can name: each takes the run context and a model, trains, returns the model.

* `pretrain` — next-token training on the synthetic corpus: the embedded default's base model.
* `rl` — R1-Zero GRPO with rule rewards, held-out evaluation every N steps, curves and a report.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

from r1jax.data.pipeline import prompt_dataset
from r1jax.data.templates import get_template
from r1jax.evaluate import evaluate_model
from r1jax.grpo import GRPOConfig
from r1jax.metrics import plot_curves, read_jsonl, write_report
from r1jax.model import ModelConfig
from r1jax.pipeline import ConfigError, RunContext, StageManifest, finished_stages
from r1jax.rewards import CombinedReward, RewardPool, combine, get_reward
from r1jax.sampling import SamplingConfig
from r1jax.trainers.loop import run_loop
from r1jax.trainers.optim import OptimConfig
from r1jax.trainers.rl import GRPOTrainer, RLConfig
from r1jax.trainers.sft import SFTConfig, SFTTrainer


def optim_config(section, total_steps: int, updates_per_step: int = 1) -> OptimConfig:
    """The section's AdamW settings. `warmup_steps` and `total_steps` count trainer steps; the optax
    schedule counts optimizer updates, `updates_per_step` of them per step (GRPO: μ × minibatches)."""
    return OptimConfig(learning_rate=section.learning_rate, warmup_steps=section.warmup_steps * updates_per_step,
                       schedule=section.schedule, total_steps=total_steps * updates_per_step,
                       weight_decay=section.weight_decay, max_grad_norm=section.max_grad_norm)


def pretrain_config(c: ConfigDict) -> SFTConfig:
    return sft_run_config(c.pretrain, c.seed)


def grpo_run_config(section, sampling: SamplingConfig, seed: int) -> RLConfig:
    """The RLConfig of a GRPO config section — R1-Zero's `rl`, the R1 pipeline's `reasoning_rl` and
    `rl_all`, distillation's `student_rl` — so that every RL stage reads its section the same way.
    Fields a section leaves out take RLConfig's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(RLConfig) if f.default is not dataclasses.MISSING}
    optional = {name: section.get(name, defaults[name]) for name in
                ("num_minibatches", "micro_batches", "ref_update_every", "dynamic_sampling", "max_sampling_rounds",
                 "chunk_size", "old_logprobs")}
    updates_per_step = section.num_iterations * optional["num_minibatches"]
    return RLConfig(steps=section.steps, prompts_per_step=section.prompts_per_step,
                    loss=grpo_config(section, sampling.max_new_tokens), sampling=sampling,
                    optim=optim_config(section, section.steps, updates_per_step), seed=seed, **optional)


def rl_config(c: ConfigDict, eos_id: int, pad_id: int) -> RLConfig:
    s = c.sampling
    sampling = SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, eos_ids=(eos_id,), pad_id=pad_id)
    return grpo_run_config(c.rl, sampling, c.seed)


def eval_sampling(c: ConfigDict, eos_id: int, pad_id: int) -> SamplingConfig:
    e = c.eval
    return SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                          eos_ids=(eos_id,), pad_id=pad_id)


def reward_table(rewards: ConfigDict) -> dict[str, tuple[Callable[..., Any], float]]:
    """{name: (reward, weight)} from a config's `rewards` table, whose entries are `name: weight` or, for a
    reward with options, `name: {weight: w, option: value, …}` — e.g. DAPO's overlong shaping,
    `overlong: {weight: 1.0, max_length: 4096, cache_length: 512}` (the trainer passes token counts)."""
    table = {}
    for name, spec in rewards.items():
        if isinstance(spec, ConfigDict | dict):
            options = dict(spec)
            weight = options.pop("weight", 1.0)
            table[name] = (get_reward(name, **options), float(weight))
        else:
            table[name] = (get_reward(name), float(spec))
    return table


def rewards_of(c: ConfigDict) -> CombinedReward:
    return combine(reward_table(c.rl.rewards))


def per_process(batch_size: int, name: str) -> int:
    """This process's share of a global batch (configs give global sizes; each host loads its share)."""
    if batch_size % jax.process_count():
        raise ValueError(f"{name}={batch_size} must split evenly over {jax.process_count()} processes")
    return batch_size // jax.process_count()


def batches_of(items: list[Any], batch_size: int, seed: int):
    """A checkpointable iterator of shuffled global batches of `batch_size` (lists), repeating forever:
    each host reads its own shard and yields its share of every batch."""
    shard = items[jax.process_index()::jax.process_count()]
    ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat(None).batch(per_process(batch_size, "batch_size"),
                                                                                batch_fn=list)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def pretrain(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    p, tok = ctx.config.pretrain, ctx.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None else [tok.eos_id]
    # Prompt and completion are tokenized apart and concatenated, exactly as the RL stage and the
    # evaluator feed prompts and read completions (one text could merge pieces across the seam).
    pairs = [(bos, tok.encode(prompt) + tok.encode(completion, add_eos=True))
             for prompt, completion in ctx.corpus_pairs()]
    cfg = pretrain_config(ctx.config)
    trainer = SFTTrainer(cfg, model, pad_id=tok.pad_id, mesh=ctx.mesh)
    history = run_loop(trainer, batches_of(pairs, p.batch_size, ctx.config.seed), steps=p.steps, workdir=stage_dir,
                       save_every=ctx.config.checkpoint.every, keep=ctx.config.checkpoint.keep,
                       show={"loss": "train/loss"})
    return trainer.model, (history[-1] if history else {})


_PRESET_FIELDS = ("beta", "epsilon_low", "epsilon_high", "kl_estimator", "advantage_scale", "advantage_std_ddof",
                  "advantage_eps")


def grpo_config(rl, max_new_tokens: int) -> GRPOConfig:
    """The section's loss: its preset, with the fields the section sets (None or absent: the preset's)."""
    overrides = dict(group_size=rl.group_size, num_iterations=rl.num_iterations)
    overrides.update({k: v for k in _PRESET_FIELDS if (v := rl.get(k)) is not None})
    if rl.preset == "dr_grpo":  # Dr. GRPO's constant normaliser: the completion budget
        overrides["max_completion_length"] = max_new_tokens
    return GRPOConfig.preset(rl.preset, **overrides)


def eval_fn(ctx: RunContext, records: list[dict[str, Any]]):
    """Held-out pass@1 (R1 protocol: k samples at temperature 0.6, top-p 0.95) as metrics."""
    e, tok = ctx.config.eval, ctx.tokenizer
    sampling = eval_sampling(ctx.config, tok.eos_id, tok.pad_id)
    key = jax.random.key(ctx.config.seed + 1)

    def evaluate(trainer) -> dict[str, float]:
        summary, per_problem = evaluate_model(
            trainer.graphdef, trainer.params, records, tok, template=ctx.config.data.template, k=e.k,
            sampling=sampling, key=jax.random.fold_in(key, trainer.step_count), mesh=ctx.mesh)
        lengths = [n for r in per_problem for n in r["lengths"]]
        out = {"eval/pass1": summary["pass@1"], "eval/pass1_stderr": summary["pass@1_stderr"],
               "eval/length_mean": float(np.mean(lengths))}
        out.update({f"eval/{k}": v for k, v in summary.items() if k.startswith(("pass@", "cons@")) and k != "pass@1"})
        tqdm.write(f"[r1jax] step {trainer.step_count}: held-out pass@1 {summary['pass@1']:.3f} "
                   f"± {summary['pass@1_stderr']:.3f} ({len(records)} problems × k={e.k}), "
                   f"mean length {out['eval/length_mean']:.1f}", file=sys.stdout)
        sys.stdout.flush()
        return out

    return evaluate


def rl(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, tok = ctx.config, ctx.tokenizer
    r = c.rl
    cfg = rl_config(c, tok.eos_id, tok.pad_id)
    reward = rewards_of(c)
    pool = RewardPool(num_workers=r.reward_workers, timeout=r.reward_timeout) if r.reward_workers else None
    prompts = prompt_dataset(ctx.records("train"), c.data.template, tok,
                             per_process(r.prompts_per_step, "rl.prompts_per_step"), seed=c.seed,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             max_prompt_length=c.data.max_prompt_length)
    trainer = GRPOTrainer(cfg, model, tok, reward, mesh=ctx.mesh, reward_pool=pool)
    try:
        history = run_loop(trainer, iter(prompts), steps=r.steps, workdir=stage_dir, save_every=c.checkpoint.every,
                           keep=c.checkpoint.keep, evaluate=eval_fn(ctx, ctx.records("eval")), eval_every=c.eval.every,
                           show={"reward": "reward/mean", "pass@1": "eval/pass1", "len": "completion/length_mean"})
    finally:
        if pool is not None:
            pool.close()
    if jax.process_index() == 0:  # the report reads metrics.jsonl, which process 0 alone writes
        figures = plot_curves(stage_dir / "metrics.jsonl", stage_dir)
        summary = _summary(stage_dir / "metrics.jsonl")
        report = write_report(stage_dir, summary, figures)
        if summary:
            print(f"[r1jax] held-out pass@1: base {summary['base pass@1 (held-out)']:.3f} → final "
                  f"{summary['final pass@1 (held-out)']:.3f} ({summary['pass@1 gain (points)']:+.1f} points)",
                  flush=True)
        print(f"[r1jax] report: {report}", flush=True)
    return trainer.model, (history[-1] if history else {})


def _summary(metrics_path: Path) -> dict[str, Any]:
    rows = read_jsonl(metrics_path)
    evals = [r for r in rows if r.get("eval/pass1") is not None]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    return {
        "base pass@1 (held-out)": first["eval/pass1"], "final pass@1 (held-out)": last["eval/pass1"],
        "pass@1 gain (points)": 100 * (last["eval/pass1"] - first["eval/pass1"]),
        "base mean length": first.get("eval/length_mean"), "final mean length": last.get("eval/length_mean"),
        "steps": last["step"],
    }


@dataclasses.dataclass(frozen=True)
class StageOrder:
    """What the stages of one invocation can build on: the stages it runs (config.stages, in order) and
    those an earlier invocation finished in the workdir."""

    names: list[str]
    finished: dict[str, StageManifest] = dataclasses.field(default_factory=dict)

    def before(self, name: str) -> list[str]:
        """The stages `name` can build on: those before it in config.stages, then those finished earlier."""
        earlier = self.names[:self.names.index(name)]
        return earlier + [s for s in self.finished if s not in earlier and s != name]


# Checks of a stage's own config section, `check(ctx, section_name, order)`, run by `validate_config` for
# each stage of the run that has one (the R1 and distillation stage modules add theirs).
SECTION_CHECKS: dict[str, Callable[[RunContext, str, StageOrder], None]] = {}
STAND_IN_TOKENIZER = types.SimpleNamespace(eos_id=0, pad_id=0)  # sampling sections are checked before it exists


def check_init(ctx: RunContext, name: str, order: StageOrder) -> None:
    """`<name>.init` is "previous", "initial", "base" or a stage it can build on (`StageOrder.before`)."""
    source = ctx.config[name].get("init", "previous")
    if source not in ("previous", "initial", "base") and source not in order.before(name):
        raise ValueError(f"{name}.init={source!r}; accepted: 'previous', 'initial', 'base' or a stage before "
                         f"it or finished in the workdir: {order.before(name)}")


def stated_model_config(ctx: RunContext) -> ModelConfig:
    """The model `ctx`'s config describes, before the tokenizer exists: an HF folder's config.json, or the
    config's fields with `tokenizer.vocab_size` standing in for the tokenizer's vocabulary."""
    if ctx.config.model.hf_path:
        return ctx.initial_model_config()
    return ctx.model_config(vocab_size=ctx.config.tokenizer.vocab_size)


def check_room(field: str, max_new: int, positions: int, whose: str = "the model's") -> None:
    """A sampling budget, `field`=max_new tokens, leaves room for a prompt under the sampling model's
    `positions` (the prompts' lengths are known only once tokenized): else a sampler fails at its first
    call, after the stages before it trained."""
    if max_new >= positions:
        raise ValueError(f"{field}={max_new} leaves no room for a prompt under {whose} "
                         f"max_position_embeddings={positions}")


def check_room_under_model(ctx: RunContext, name: str) -> None:
    """`<name>.max_new_tokens` leaves room for a prompt under this run's model (`check_room`)."""
    check_room(f"{name}.max_new_tokens", ctx.config[name].max_new_tokens,
               stated_model_config(ctx).max_position_embeddings)


def check_fraction(section, name: str, field: str) -> None:
    """`<name>.<field>`, a share of a mix, lies in [0, 1)."""
    if field in section and not 0 <= section[field] < 1:
        raise ValueError(f"{name}.{field}={section[field]!r} must lie in [0, 1)")


def check_counts(section, name: str, *fields: str) -> None:
    """The fields of `section` that it has are ints >= 1."""
    for field in fields:
        if field in section and not (isinstance(section[field], int) and section[field] >= 1):
            raise ValueError(f"{name}.{field}={section[field]!r} must be an int >= 1")


def sft_run_config(section, seed: int) -> SFTConfig:
    """The SFTConfig of an SFT section (`cold_start`, `rejection_sft`, `distill`)."""
    return SFTConfig(steps=section.steps, batch_size=section.batch_size, optim=optim_config(section, section.steps),
                     micro_batches=section.micro_batches, max_length=section.max_length, seed=seed)


def validate_config(c: ConfigDict, names: list[str], workdir: Path | None = None) -> None:
    """Build every section the named stages read, before the tokenizer, data or model cost anything.
    `workdir`: where stages that an earlier invocation finished may be built on (none if None).

    Raises `ConfigError` naming the section (the dataclasses' own checks name the field).
    """
    try:
        ctx = RunContext(c, Path(workdir or "."))  # builds the mesh only
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e
    finished = finished_stages(Path(workdir)) if workdir is not None else {}

    def model():
        return stated_model_config(ctx)

    def leaves_room(field: str, max_new: int) -> None:
        check_room(field, max_new, model().max_position_embeddings)

    def checkpoint():
        for name in ("every", "keep"):
            if not isinstance(c.checkpoint[name], int) or c.checkpoint[name] < 1:
                raise ValueError(f"checkpoint.{name}={c.checkpoint[name]!r} must be an int >= 1")

    def rl():
        rl_config(c, 0, 0)
        leaves_room("sampling.max_new_tokens", c.sampling.max_new_tokens)
        rewards_of(c)
        if c.rl.reward_workers < 0 or not c.rl.reward_timeout > 0:
            raise ValueError(f"rl.reward_workers={c.rl.reward_workers} must be >= 0 and "
                             f"rl.reward_timeout={c.rl.reward_timeout} > 0")

    def evaluation():
        eval_sampling(c, 0, 0)
        leaves_room("eval.max_new_tokens", c.eval.max_new_tokens)
        if c.eval.k < 1 or c.eval.every < 0:
            raise ValueError(f"eval.k={c.eval.k} must be >= 1 and eval.every={c.eval.every} >= 0 (0 = never)")

    def data():
        get_template(c.data.template)
        ctx.task_spec  # noqa: B018 - validates the synthetic task's knobs
        for split in ("train", "eval"):
            size, synthetic = c.data[f"{split}_size"], c.data[split].startswith("synthetic")
            if not isinstance(size, int) or size < int(synthetic):
                raise ValueError(f"data.{split}_size={size!r} must be an int >= {int(synthetic)}"
                                 + ("" if synthetic else " (0: the whole benchmark)"))

    def pretraining():
        pretrain_config(c)
        for field in ("correct_fraction", "mix_fraction"):
            if not 0 <= c.pretrain.get(field, 0.0) <= 1:
                raise ValueError(f"pretrain.{field}={c.pretrain[field]!r} must lie in [0, 1]")

    import r1jax.stages_distill  # noqa: F401 - registers the R1 and distillation stages' SECTION_CHECKS
    checks = {"model": model, "checkpoint": checkpoint, "data": data}
    if "pretrain" in names:
        checks["pretrain"] = pretraining
        if c.model.hf_path:
            raise ConfigError(f"config.stages={c.stages!r}: the pretrain stage trains the embedded synthetic corpus "
                              f"into a model from scratch; with model.hf_path={c.model.hf_path!r} (a base model "
                              "already) leave it out, e.g. --config.stages=rl")
    if "rl" in names:
        checks.update(rl=rl, eval=evaluation)
    for name in names:
        if name in SECTION_CHECKS:
            checks[name] = functools.partial(SECTION_CHECKS[name], ctx, name, StageOrder(names, finished))
            checks["eval"] = evaluation  # every such stage ends with a held-out evaluation
    for section, check in checks.items():
        try:
            check()
        except (ValueError, TypeError, KeyError, AttributeError, FileNotFoundError) as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ConfigError(f"config.{section}: {reason}") from e


STAGES = {"pretrain": pretrain, "rl": rl}
