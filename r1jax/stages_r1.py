"""DeepSeek-R1's four stages after the base model, as pipeline stages (`R1_STAGES`).

    base ─► cold_start ─► reasoning_rl ─► rejection_sft (SFT from the *base*, on stage-2 samples) ─► rl_all

* `cold_start` — SFT on long-CoT data in R1's `|special_token| reasoning |special_token| summary`
  format: a user JSONL file (`cold_start.data_path`), or, on the embedded default, R1-Zero-style
  samples of the input model (R1-Zero template) kept when correct, in one language and readable
  (`r1jax.data.filters`), rewritten into R1's format; topped up with the task's worked traces when
  too few pass.
* `reasoning_rl` — GRPO with accuracy + R1 format + language consistency (R1 eq. 7), summed.
* `rejection_sft` — k samples per train prompt from `sample_from` (stage 2), keep the correct ones,
  drop mixed-language CoTs, long paragraphs and code blocks, mix in non-reasoning data without CoT
  (`r1jax.data.general` on the embedded default), SFT from `init` (R1 retrains the base: "base").
* `rl_all` — GRPO over reasoning and general prompts: rule rewards on reasoning prompts, the
  pluggable preference rewards (`r1jax.rewards.preference`) on general ones — helpfulness on the
  summary, harmlessness on the whole response.

Every stage caches the data it builds (`<stage>/data.jsonl`, written atomically) before training,
so a run killed mid-stage resumes training from the stage's last Orbax checkpoint without sampling
again; every stage ends with a held-out evaluation (pass@1 over k, format rate, language
consistency, helpfulness on general prompts) written to its manifest and to `<workdir>/report.md`.
Distillation stages live in `r1jax.stages_distill`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from r1jax.data import general
from r1jax.data.filters import FilterConfig, filter_samples, language_stats, split_reasoning
from r1jax.data.pipeline import prompt_dataset
from r1jax.data.synthetic import solution_trace, summary_text
from r1jax.data.templates import DEFAULT_SPECIAL_TOKEN, format_cold_start, format_prompt, parse_r1_zero
from r1jax.evaluate import evaluate_completions, grader_from_reward, sample_completions, summarize
from r1jax.metrics import plot_curves
from r1jax.pipeline import (
    RunContext,
    StageManifest,
    finished_stage,
    finished_stages,
    previous_names_none,
    stage_names,
)
from r1jax.rewards import RewardPool, combine, get_reward
from r1jax.rewards.format import follows_r1_format, follows_r1_zero_format
from r1jax.rewards.math import voting_answer
from r1jax.rewards.preference import (
    get_preference_model,
    harmlessness_reward,
    helpfulness_reward,
    only_for,
    r1_language_reward,
)
from r1jax.sampling import SamplingConfig
from r1jax.stages import (
    SECTION_CHECKS,
    STAND_IN_TOKENIZER,
    StageOrder,
    batches_of,
    check_counts,
    check_fraction,
    check_init,
    check_room_under_model,
    grpo_run_config,
    per_process,
    sft_run_config,
)
from r1jax.trainers.loop import run_loop
from r1jax.trainers.rl import GRPOTrainer
from r1jax.trainers.sft import SFTTrainer

DATA_FILE = "data.jsonl"


# ------------------------------------------------------------------------------------ small helpers


def write_jsonl_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if jax.process_index() != 0:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_plain) + "\n")
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=_plain), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def latest_checkpoint_step(stage_dir: Path) -> int | None:
    """The newest committed Orbax step under `stage_dir/checkpoints` (tmp folders are not digits)."""
    ckpt = stage_dir / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    return max(steps) if steps else None


def finished_model(ctx: RunContext, source: str, current: str) -> tuple[nnx.Module, Path]:
    """(model, its folder) of stage `source`'s final parameters ("previous": the stage before `current` in
    config.stages), finished in this workdir by this invocation or an earlier one, checked against the hash
    it recorded (`RunContext.stage_model`)."""
    names = stage_names(ctx.config)
    if source == "previous":
        i = names.index(current)
        if i == 0:
            raise ValueError(f"{current}.sample_from='previous' but {current} is the first stage")
        source = names[i - 1]
    manifest = finished_stage(ctx.workdir, source)
    if manifest is None:
        raise ValueError(f"{current}: stage {source!r} has no finished checkpoint under {ctx.workdir / source}")
    model, _ = ctx.stage_model(manifest)
    return model, ctx.final_dir(source)


def reasoning_reward_name(ctx: RunContext) -> str:
    """The rule that grades the reasoning task: countdown checks the expression, else math accuracy."""
    return "countdown" if ctx.config.data.train.startswith("synthetic:countdown") else "accuracy"


def reasoning_records(ctx: RunContext, split: str) -> list[dict[str, Any]]:
    return [{**r, "kind": "reasoning"} for r in ctx.records(split)]


def completion_ids(tok, prompt: str, text: str) -> list[int]:
    """Token ids (EOS last) of completion `text` as it follows `prompt`: joined by one space unless either
    side already has one there — a sampled completion decoded by a byte-level BPE keeps the space the
    model drew, a chat template's prompt ends in a newline (sentencepiece adds the joining space itself)."""
    from r1jax.data.tokenizer import SentencePieceTokenizer

    joined = isinstance(tok, SentencePieceTokenizer) or text[:1].isspace() or prompt[-1:].isspace()
    return tok.encode(text if joined else " " + text, add_eos=True)


def sampling_config(section, tok, *, temperature: float | None = None) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=section.max_new_tokens,
                          temperature=section.temperature if temperature is None else temperature,
                          top_p=section.get("top_p", 1.0), eos_ids=(tok.eos_id,), pad_id=tok.pad_id)


def filter_config(section, c) -> FilterConfig:
    f = section.filters
    return FilterConfig(target_language=c.data.get("target_language", "en"),
                        max_paragraph_chars=f.max_paragraph_chars, drop_code_blocks=f.drop_code_blocks,
                        require_correct=f.require_correct, require_format=f.require_format, max_chars=f.max_chars,
                        check_arithmetic=f.get("check_arithmetic", True))


# ------------------------------------------------------------------------------------ sampling & grading


def sample_graded(ctx: RunContext, graphdef, params, records: list[dict[str, Any]], *, template: str, k: int,
                  sampling: SamplingConfig, key: jax.Array, tokenizer=None) -> list[dict[str, Any]]:
    """k completions per record, each graded by the task's rule: [{question, completion, correct, ...}]."""
    tok = tokenizer or ctx.tokenizer
    texts, lengths = sample_completions(graphdef, params, records, tok, template=template, k=k, sampling=sampling,
                                        key=key, mesh=ctx.mesh, prompts_per_batch=ctx.config.eval.get("batch", 64))
    grader = grader_from_reward(get_reward(reasoning_reward_name(ctx)))
    out = []
    for record, comps, lens in zip(records, texts, lengths, strict=True):
        scores = grader(comps, record)
        for completion, score, n in zip(comps, scores, lens, strict=True):
            out.append({"id": record.get("id"), "question": record["question"], "answer": record.get("answer"),
                        "completion": completion, "correct": score is not None and float(score) > 0.5,
                        "length": int(n)})
    return out


def evaluate_policy(ctx: RunContext, graphdef, params, *, template: str, step: int = 0) -> dict[str, float]:
    """Held-out metrics of a policy: pass@1 over k (R1 protocol), format rate, language, helpfulness."""
    c, e, tok = ctx.config, ctx.config.eval, ctx.tokenizer
    sampling = SamplingConfig(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                              eos_ids=(tok.eos_id,), pad_id=tok.pad_id)
    key = jax.random.fold_in(jax.random.key(c.seed + 1), step)
    records = ctx.records("eval")
    texts, lengths = sample_completions(graphdef, params, records, tok, template=template, k=e.k, sampling=sampling,
                                        key=key, mesh=ctx.mesh, prompts_per_batch=e.get("batch", 64))
    per_problem = evaluate_completions(records, texts, grader_from_reward(get_reward(reasoning_reward_name(ctx))),
                                       extract_answer=voting_answer, lengths_per_problem=lengths)
    summary = summarize(per_problem, ks=[1])
    flat = [t for ts in texts for t in ts]
    follows = follows_r1_format if template == "r1" else follows_r1_zero_format
    cots = [(split_reasoning(t) or (t, ""))[0] for t in flat]
    lang = language_stats(cots, c.data.get("target_language", "en"))
    out = {"eval/pass1": summary["pass@1"], "eval/pass1_stderr": summary["pass@1_stderr"],
           "eval/format": float(np.mean([follows(t) for t in flat])),
           "eval/lang_consistent": lang["consistent_fraction"],
           "eval/length_mean": float(np.mean([n for ls in lengths for n in ls]))}
    if e.get("general_size", 0):
        grecords = general.generate("test", e.general_size, seed=c.seed)
        gtexts, _ = sample_completions(graphdef, params, grecords, tok, template=template, k=e.get("general_k", 2),
                                       sampling=sampling, key=jax.random.fold_in(key, 1), mesh=ctx.mesh)
        scores = [s for r, ts in zip(grecords, gtexts, strict=True)
                  for s in helpfulness_reward([r["question"]] * len(ts), ts, reference=[r["reference"]] * len(ts))]
        out["eval/helpfulness"] = float(np.mean(scores))
    return out


# ------------------------------------------------------------------------------------ training helpers


def train_sft(ctx: RunContext, model: nnx.Module, stage_dir: Path, section, examples: list[dict[str, Any]],
              template: str) -> tuple[SFTTrainer, list[dict[str, float]]]:
    """SFT on {question, completion} examples under `template`'s prompt; resumes from the stage's checkpoints."""
    c, tok = ctx.config, ctx.tokenizer
    prompts = [format_prompt(template, ex["question"], tokenizer=tok) for ex in examples]
    pairs = [(tok.encode(prompt, add_bos=True), completion_ids(tok, prompt, ex["completion"]))
             for prompt, ex in zip(prompts, examples, strict=True)]
    trainer = SFTTrainer(sft_run_config(section, c.seed), model, pad_id=tok.pad_id, mesh=ctx.mesh)
    _say_resume(stage_dir)
    history = run_loop(trainer, batches_of(pairs, section.batch_size, c.seed), steps=section.steps,
                       workdir=stage_dir, save_every=c.checkpoint.every, keep=c.checkpoint.keep,
                       show={"loss": "train/loss"})
    return trainer, history


def cached_examples(stage_dir: Path, build: Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]]
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(examples, data metrics) of an SFT stage: those an earlier attempt at it cached (`data.jsonl` and
    `data_stats.json`), else `build()`'s, cached before training so that a killed run resumes training
    without sampling again (the statistics are written first: a `data.jsonl` always has them)."""
    data_file = stage_dir / DATA_FILE
    if data_file.exists():
        examples, metrics = read_jsonl(data_file), json.loads((stage_dir / "data_stats.json").read_text())
        print(f"[r1jax] {stage_dir.name}: reusing {len(examples)} examples from {data_file}", flush=True)
    else:
        examples, metrics = build()
        write_json_atomic(stage_dir / "data_stats.json", metrics)
        write_jsonl_atomic(data_file, examples)
    metrics["data/examples"] = len(examples)
    return examples, metrics


def check_examples(stage_dir: Path, examples: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    if not examples:
        counts = {k: v for k, v in metrics.items() if k.startswith("data/")}
        raise ValueError(f"{stage_dir.name}: no SFT examples survived the filters ({counts}); sample more "
                         f"(prompts, samples_per_prompt), relax `filters`, or set top_up_with_traces=True")


def _say_resume(stage_dir: Path) -> None:
    step = latest_checkpoint_step(stage_dir)
    if step is not None:
        print(f"[r1jax] stage {stage_dir.name}: resuming training from its checkpoint at step {step}", flush=True)


class GRPORun:
    """A GRPO trainer with its prompt stream and reward pool, run to a step count (again, to go on)."""

    def __init__(self, ctx: RunContext, model: nnx.Module, stage_dir: Path, section, records: list[dict[str, Any]],
                 reward, template: str):
        c, tok = ctx.config, ctx.tokenizer
        self.ctx, self.stage_dir, self.template = ctx, stage_dir, template
        cfg = grpo_run_config(section, sampling_config(section, tok), c.seed)
        per_host = per_process(section.prompts_per_step, "prompts_per_step")
        self.prompts = iter(prompt_dataset(records, template, tok, per_host, seed=c.seed,
                                           shard_index=jax.process_index(), shard_count=jax.process_count(),
                                           max_prompt_length=c.data.max_prompt_length))
        workers = section.get("reward_workers", 0)
        self.pool = RewardPool(num_workers=workers) if workers else None
        self.trainer = GRPOTrainer(cfg, model, tok, reward, mesh=ctx.mesh, reward_pool=self.pool)

    def run(self, steps: int) -> list[dict[str, float]]:
        """Train to `steps` (resuming from the stage's checkpoints), evaluating every `eval.every` steps."""
        c = self.ctx.config
        every = c.eval.get("every", 0)
        evaluate = (lambda t: evaluate_policy(self.ctx, t.graphdef, t.params, template=self.template,
                                              step=t.step_count)) if every else None
        _say_resume(self.stage_dir)
        return run_loop(self.trainer, self.prompts, steps=steps, workdir=self.stage_dir,
                        save_every=c.checkpoint.every, keep=c.checkpoint.keep, evaluate=evaluate, eval_every=every,
                        show={"reward": "reward/mean", "len": "completion/length_mean"})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def train_grpo(ctx: RunContext, model: nnx.Module, stage_dir: Path, section, records: list[dict[str, Any]],
               reward, template: str) -> tuple[GRPOTrainer, list[dict[str, float]]]:
    run = GRPORun(ctx, model, stage_dir, section, records, reward, template)
    try:
        return run.trainer, run.run(section.steps)
    finally:
        run.close()


def finish(ctx: RunContext, stage_dir: Path, graphdef, params, *, template: str, metrics: dict[str, Any],
           history: list[dict[str, float]], t0: float, cpu0: float) -> dict[str, Any]:
    """Train-time metrics + the held-out evaluation; updates `<workdir>/report.md`. `t0`, `cpu0`: the
    stage's start in `time.time()` and `time.process_time()` (CPU seconds tell the cost on a busy box)."""
    metrics["time/train_s"] = time.time() - t0
    metrics["time/train_cpu_s"] = time.process_time() - cpu0  # all threads: the cost on an idle machine
    if history:
        metrics.update({k: v for k, v in history[-1].items() if k.startswith(("train/loss", "reward/"))})
    metrics.update(evaluate_policy(ctx, graphdef, params, template=template, step=10_000))
    metrics["eval/template"] = template  # what `python -m r1jax.evaluate --workdir` prompts this stage's model with
    metrics["time/stage_s"] = time.time() - t0
    metrics["time/stage_cpu_s"] = time.process_time() - cpu0
    write_pipeline_report(ctx, {stage_dir.name: metrics})
    return metrics


REPORT_COLUMNS = (("eval/pass1", "held-out pass@1"), ("eval/format", "format"),
                  ("eval/lang_consistent", "one-language CoTs"), ("eval/helpfulness", "helpfulness"),
                  ("eval/length_mean", "mean length"), ("time/stage_s", "stage time (s)"))


def write_pipeline_report(ctx: RunContext, current: dict[str, dict[str, Any]]) -> Path:
    """`<workdir>/report.md`: one row per stage that has metrics (finished, or `current`): the stages finished
    in the workdir, by this invocation or an earlier one, in the order they ran, then this invocation's."""
    finished = finished_stages(ctx.workdir)
    names = [*finished, *(name for name in stage_names(ctx.config) if name not in finished)]
    lines = [f"# {ctx.config.get('name', 'run')} pipeline report", "",
             "| stage | starts from | " + " | ".join(label for _, label in REPORT_COLUMNS) + " |",
             "|---|---|" + "---|" * len(REPORT_COLUMNS)]
    for name in names:
        manifest = StageManifest.read(ctx.workdir / name)
        metrics = current.get(name) or (manifest.metrics if manifest and manifest.status == "done" else None)
        if not metrics:
            continue
        init = manifest.init_checkpoint if manifest else None
        init = Path(init).parent.name if init and init.endswith("/final") else init
        cells = []
        for key, _ in REPORT_COLUMNS:
            v = metrics.get(key)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) and key != "time/stage_s"
                         else f"{v:.0f}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | {init} | " + " | ".join(cells) + " |")
    path = ctx.workdir / "report.md"
    if jax.process_index() == 0:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ stage 1: cold start


def top_up(ctx: RunContext, kept: list[dict[str, Any]], section, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Worked traces of the task in R1's format for prompts not yet covered, when fewer than
    `section.min_examples` samples survived and `section.top_up_with_traces` allows it (counted in
    `metrics["data/from_traces"]`). An escape hatch for tiny or untrained models, off by default
    where the paper has real samples (rejection sampling, distillation)."""
    missing = section.get("min_examples", 0) - len(kept)
    if missing <= 0 or not section.get("top_up_with_traces", False):
        return []
    used = {s["question"] for s in kept}
    extra = [r for r in reasoning_records(ctx, "train") if r["question"] not in used][:missing]
    metrics["data/from_traces"] = len(extra)
    return [{"question": r["question"], "answer": r.get("answer"), "correct": True, "from_traces": True,
             "completion": solution_trace(r, template="r1")} for r in extra]


def to_r1_format(completion: str, answer: str | None = None) -> str | None:
    """An R1-Zero completion (`<think> r </think> <answer> a </answer>`) rewritten as R1's cold-start
    format `|special_token| r |special_token| summary`; None if it does not parse."""
    parsed = parse_r1_zero(completion)
    if parsed is None or not parsed[0] or DEFAULT_SPECIAL_TOKEN in completion:
        return None
    reasoning, final = parsed
    return format_cold_start(reasoning, summary_text(answer if answer is not None else final))


def _user_example(ctx: RunContext, row: dict[str, Any], where: str) -> dict[str, Any]:
    """A cold-start JSONL row: question + completion (or reasoning + summary) [+ answer and task fields]."""
    completion = row.get("completion")
    if completion is None and "reasoning" in row and "summary" in row:
        completion = format_cold_start(row["reasoning"], row["summary"])
    if "question" not in row or not isinstance(completion, str):
        raise ValueError(f"{where}: need 'question' and 'completion' (or 'reasoning' and 'summary'); got {sorted(row)}")
    correct = None
    if row.get("answer") is not None:
        fields = {k: [v] for k, v in row.items() if k not in ("question", "completion")}
        score = get_reward(reasoning_reward_name(ctx))([row["question"]], [completion], **fields)[0]
        correct = score is not None and score > 0.5
    return {"question": row["question"], "answer": row.get("answer"), "completion": completion, "correct": correct}


def cold_start_examples(ctx: RunContext, model: nnx.Module, section) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    c = ctx.config
    fcfg = filter_config(section, c)
    if section.data_path:
        samples = [_user_example(ctx, row, f"{section.data_path}:{i + 1}")
                   for i, row in enumerate(read_jsonl(Path(section.data_path)))]
        fcfg = dataclasses.replace(fcfg, keep_ungraded=True)  # rows without a gold answer stay; wrong ones go
        kept, counts = filter_samples(samples, fcfg, per_prompt=section.per_prompt)
        return kept, {"data/source": section.data_path, **{f"data/{k}": v for k, v in counts.items()}}

    records = reasoning_records(ctx, "train")[: section.prompts]
    graphdef, params = nnx.split(model)
    samples = sample_graded(ctx, graphdef, params, records, template=section.source_template,
                            k=section.samples_per_prompt, sampling=sampling_config(section, ctx.tokenizer),
                            key=jax.random.key(c.seed + 11))
    # Readability = R1-Zero's format followed (so it can be rewritten) and the filters below.
    for s in samples:
        rewritten = to_r1_format(s["completion"])
        s["source_completion"] = s["completion"]
        if rewritten is not None:  # unparsable samples stay as they are and fail the format filter
            s["completion"] = rewritten
    kept, counts = filter_samples(samples, fcfg, per_prompt=section.per_prompt)
    metrics = {"data/source": "samples of the input model (R1-Zero template), filtered and rewritten",
               "data/sample_accuracy": float(np.mean([s["correct"] for s in samples])),
               "data/sample_lang_consistent": language_stats(
                   [(split_reasoning(s["source_completion"]) or (s["source_completion"], ""))[0] for s in samples],
                   c.data.get("target_language", "en"))["consistent_fraction"],
               **{f"data/{k}": v for k, v in counts.items()}}
    kept += top_up(ctx, kept, section, metrics)
    return kept, metrics


def cold_start(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, s = ctx.config, ctx.config.cold_start
    t0, cpu0 = time.time(), time.process_time()

    def build():
        graphdef, params = nnx.split(model)
        metrics = {f"init/{k}": v for k, v in evaluate_policy(
            ctx, graphdef, params, template=s.source_template, step=0).items()}
        examples, stats = cold_start_examples(ctx, model, s)
        metrics.update(stats)
        check_examples(stage_dir, examples, metrics)
        return examples, metrics

    examples, metrics = cached_examples(stage_dir, build)
    print(f"[r1jax] cold_start: {len(examples)} examples ({metrics.get('data/from_traces', 0)} from worked traces)",
          flush=True)
    trainer, history = train_sft(ctx, model, stage_dir, s, examples, c.data.r1_template)
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=c.data.r1_template,
                                 metrics=metrics, history=history, t0=t0, cpu0=cpu0)


# ------------------------------------------------------------------------------------ stage 2: reasoning RL


def rule_rewards(ctx: RunContext, weights, *, reasoning_only: bool = False):
    """{name: (fn, weight)}: the task's correctness rule, R1 format and R1 eq. 7 language consistency."""
    target = ctx.config.data.get("target_language", "en")
    fns = {"accuracy": get_reward(reasoning_reward_name(ctx)), "r1_format": get_reward("r1_format"),
           "language": _bound(r1_language_reward, target_language=target)}
    out = {}
    for name, weight in weights.items():
        if name not in fns:
            raise ValueError(f"reward {name!r} in a rule-reward table; known: {sorted(fns)}")
        if float(weight):
            out[name] = (only_for("reasoning", fns[name]) if reasoning_only else fns[name], float(weight))
    return out


def reasoning_rl(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, s = ctx.config, ctx.config.reasoning_rl
    t0, cpu0 = time.time(), time.process_time()
    reward = combine(rule_rewards(ctx, s.rewards))
    trainer, history = train_grpo(ctx, model, stage_dir, s, reasoning_records(ctx, "train"), reward,
                                  c.data.r1_template)
    if jax.process_index() == 0:  # metrics.jsonl is process 0's
        plot_curves(stage_dir / "metrics.jsonl", stage_dir)
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=c.data.r1_template,
                                 metrics={}, history=history, t0=t0, cpu0=cpu0)


# ------------------------------------------------------------------------------------ stage 3: rejection sampling


def general_count(n_reasoning: int, fraction: float) -> int:
    """How many general (non-reasoning) items make up `fraction` (in [0, 1)) of a mix with `n_reasoning`
    reasoning ones."""
    if not 0 <= fraction < 1:
        raise ValueError(f"general_fraction={fraction!r} must lie in [0, 1)")
    return int(round(n_reasoning * fraction / (1 - fraction)))


def with_general_examples(ctx: RunContext, kept: list[dict[str, Any]], fraction: float,
                          metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The kept reasoning samples plus non-reasoning SFT data without CoT, the reply alone (R1: "hello"
    gets no CoT), `fraction` of the mix (R1: 200k of 800k); their count goes to `metrics["data/general"]`."""
    n = general_count(len(kept), fraction)
    records = general.generate("train", n, seed=ctx.config.seed) if n else []
    metrics["data/general"] = len(records)
    return ([{**k, "kind": "reasoning"} for k in kept]
            + [{"question": r["question"], "completion": r["reference"], "kind": "general"} for r in records])


def rejection_sft(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, s = ctx.config, ctx.config.rejection_sft
    t0, cpu0 = time.time(), time.process_time()

    def build():
        sampler, source = finished_model(ctx, s.sample_from, stage_dir.name)
        graphdef, params = nnx.split(sampler)
        records = reasoning_records(ctx, "train")[: s.prompts]
        samples = sample_graded(ctx, graphdef, params, records, template=c.data.r1_template,
                                k=s.samples_per_prompt, sampling=sampling_config(s, ctx.tokenizer),
                                key=jax.random.key(c.seed + 33))
        del sampler, graphdef, params
        kept, counts = filter_samples(samples, filter_config(s, c), per_prompt=s.per_prompt)
        metrics = {"data/sampled_from": str(source),
                   "data/sample_accuracy": float(np.mean([x["correct"] for x in samples])),
                   **{f"data/{k}": v for k, v in counts.items()}}
        kept += top_up(ctx, kept, s, metrics)
        check_examples(stage_dir, kept, metrics)
        examples = with_general_examples(ctx, kept, s.general_fraction, metrics)
        write_jsonl_atomic(stage_dir / "samples.jsonl", samples)
        print(f"[r1jax] rejection_sft: kept {counts['kept']} of {counts['seen']} samples "
              f"({ {k: v for k, v in counts.items() if k not in ('seen', 'kept') and v} }), "
              f"+ {metrics['data/general']} non-reasoning", flush=True)
        return examples, metrics

    examples, metrics = cached_examples(stage_dir, build)
    trainer, history = train_sft(ctx, model, stage_dir, s, examples, c.data.r1_template)
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=c.data.r1_template,
                                 metrics=metrics, history=history, t0=t0, cpu0=cpu0)


# ------------------------------------------------------------------------------------ stage 4: RL for all scenarios


def rl_all(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, s = ctx.config, ctx.config.rl_all
    t0, cpu0 = time.time(), time.process_time()
    rewards = rule_rewards(ctx, s.rewards, reasoning_only=True)
    p = s.preference
    if p.helpfulness:
        rewards["helpfulness"] = (only_for("general", _bound(helpfulness_reward, model=p.helpfulness_model)),
                                  float(p.helpfulness))
    if p.harmlessness:
        rewards["harmlessness"] = (only_for("general", _bound(harmlessness_reward, model=p.harmlessness_model)),
                                   float(p.harmlessness))
    reasoning = reasoning_records(ctx, "train")
    n_general = general_count(len(reasoning), s.general_fraction)
    records = reasoning + (general.generate("train", n_general, seed=c.seed) if n_general else [])
    trainer, history = train_grpo(ctx, model, stage_dir, s, records, combine(rewards), c.data.r1_template)
    if jax.process_index() == 0:  # metrics.jsonl is process 0's
        plot_curves(stage_dir / "metrics.jsonl", stage_dir)
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=c.data.r1_template,
                                 metrics={}, history=history, t0=t0, cpu0=cpu0)


def _bound(fn, **options):
    return functools.partial(fn, **options)


R1_STAGES = {"cold_start": cold_start, "reasoning_rl": reasoning_rl, "rejection_sft": rejection_sft, "rl_all": rl_all}


# ------------------------------------------------------------------------------------ config checks


def check_sampling_section(ctx: RunContext, name: str,
                           room: Callable[[RunContext, str], None] = check_room_under_model) -> None:
    """A section that samples from a model and filters what it gets (cold start, rejection SFT, distill).
    `room(ctx, name)`: its max_new_tokens leaves room for a prompt under the model that samples (this run's,
    or distill's teacher), unless it reads its samples from a file instead."""
    section = ctx.config[name]
    sampling_config(section, STAND_IN_TOKENIZER)
    if not section.get("data_path") and not section.get("traces_path"):
        room(ctx, name)
    check_counts(section, name, "prompts", "samples_per_prompt")
    if "filters" in section:
        filter_config(section, ctx.config)
    check_fraction(section, name, "general_fraction")


def check_sft_stage(ctx: RunContext, name: str, order: StageOrder,
                    room: Callable[[RunContext, str], None] = check_room_under_model) -> None:
    check_init(ctx, name, order)
    sft_run_config(ctx.config[name], ctx.config.seed)
    check_sampling_section(ctx, name, room)
    if "sample_from" in ctx.config[name]:
        source, first = ctx.config[name].sample_from, order.names.index(name) == 0
        # "previous" is the stage before it in config.stages, as for `init`: the first stage's names none, and
        # where stages finished in the workdir it must say which (one that finished already samples no more).
        unnamed = source == "previous" and first and name not in order.finished
        if unnamed and order.finished:
            raise ValueError(previous_names_none(ctx.config, name, "sample_from", list(order.finished), ctx.workdir))
        if unnamed or source not in ("previous", *order.before(name)):
            raise ValueError(f"{name}.sample_from={source!r}; accepted: 'previous' or a stage before it or finished "
                             f"in the workdir: {order.before(name)}"
                             + (f" ('previous' names none: {name} is the first of config.stages)" if first else ""))


def check_grpo_stage(ctx: RunContext, name: str, order: StageOrder) -> None:
    check_init(ctx, name, order)
    section = ctx.config[name]
    grpo_run_config(section, sampling_config(section, STAND_IN_TOKENIZER), ctx.config.seed)
    check_room_under_model(ctx, name)
    check_fraction(section, name, "general_fraction")
    if "rewards" in section and name in R1_STAGES:
        rule_rewards(ctx, section.rewards)
    for kind in ("helpfulness", "harmlessness") if "preference" in section else ():
        if section.preference[kind]:
            get_preference_model(section.preference[f"{kind}_model"])


SECTION_CHECKS.update(cold_start=check_sft_stage, reasoning_rl=check_grpo_stage, rejection_sft=check_sft_stage,
                      rl_all=check_grpo_stage)
