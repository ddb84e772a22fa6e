"""Distillation (R1, section 2.4) and its control, as pipeline stages (`DISTILL_STAGES`).

* `distill` — a teacher (an R1 run's final checkpoint, an Orbax checkpoint with its model config, or
  an HF folder) samples k traces per train prompt, or a traces JSONL is read; the traces are
  filtered exactly like R1's rejection sampling (correct, one language, no long paragraphs or code
  blocks, `r1jax.data.filters`), optionally mixed with non-reasoning data, and the student (this
  run's model, e.g. the `pretrain` stage's small base) is trained on them by SFT only, as R1 does
  for its distilled models; then the student is evaluated on held-out prompts.
* `student_rl` — the control of R1's "distillation vs RL" comparison: the *same* student base
  trained by GRPO alone (R1-Zero template, accuracy + format rewards) for the same wall-clock time
  the `distill` stage took (teacher sampling + SFT; evaluation excluded on both sides).

The budget is met by measuring: a few calibration steps, then as many more as the measured cost per
step fits in what is left (`run_loop` resumes from its own final checkpoint each time, so the RL run
is one run on disk). `student_rl.budget_clock="wall"` (the issue's wall-clock) or `"cpu"` (process
CPU seconds, the fair measure on a machine shared with other jobs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from r1jax.data.filters import filter_samples
from r1jax.data.templates import get_template
from r1jax.model.hf import read_config
from r1jax.pipeline import RunContext, finished_stage
from r1jax.rewards import combine, get_reward
from r1jax.stages import SECTION_CHECKS, StageOrder, check_counts, check_room, reward_table, stated_model_config
from r1jax.stages_r1 import (
    GRPORun,
    cached_examples,
    check_examples,
    check_grpo_stage,
    check_sft_stage,
    filter_config,
    finish,
    read_jsonl,
    reasoning_records,
    reasoning_reward_name,
    sample_graded,
    sampling_config,
    top_up,
    train_sft,
    with_general_examples,
    write_json_atomic,
)


def teacher(ctx: RunContext) -> tuple[nnx.Module, Any, str]:
    """(teacher model, its tokenizer, where it came from) from `config.distill.teacher`."""
    from r1jax.data.tokenizer import SentencePieceTokenizer, load_hf_tokenizer
    from r1jax.model import load_hf

    t = ctx.config.distill.teacher
    if t.hf_path:  # an HF teacher brings its own tokenizer (tokenizer_path serves Orbax checkpoints)
        model = load_hf(t.hf_path, mesh=ctx.mesh, **ctx.runtime_model_fields())
        return model, load_hf_tokenizer(t.hf_path), t.hf_path
    manifest = None if t.checkpoint else finished_stage(Path(t.workdir), t.stage)
    if not t.checkpoint and manifest is None:
        raise ValueError(
            f"distill.teacher: no finished stage {t.stage!r} under {t.workdir!r}; run "
            f"`python -m r1jax.train --config=r1 --workdir {t.workdir}` first, or set "
            "--config.distill.teacher.checkpoint (Orbax params) or --config.distill.teacher.hf_path")
    if t.tokenizer_path:
        tok = load_hf_tokenizer(t.tokenizer_path)
    elif (Path(t.workdir) / "tokenizer" / "spm.model").exists():
        tok = SentencePieceTokenizer(Path(t.workdir) / "tokenizer" / "spm.model")
    else:  # the embedded default trains one tokenizer per corpus: the teacher's is this run's
        tok = ctx.tokenizer
    teacher_ctx = teacher_run(ctx)
    if not teacher_ctx.config.model.vocab_size and not teacher_ctx.config.model.preset:
        teacher_ctx.config.model.vocab_size = tok.vocab_size
    if manifest is None:
        return teacher_ctx.model_from(Path(t.checkpoint)), tok, t.checkpoint
    # The teacher run's stage as it is in its workdir now, checked against the hash the stage recorded.
    model, _ = teacher_ctx.stage_model(manifest)
    return model, tok, str(teacher_ctx.final_dir(t.stage))


def teacher_run(ctx: RunContext) -> RunContext:
    """The run of a `checkpoint` or `workdir` teacher: this run's config with the teacher's model section
    (`distill.teacher.model`), in the teacher's workdir."""
    config = ConfigDict(ctx.config.to_dict())
    config.model = ConfigDict(ctx.config.distill.teacher.model.to_dict())
    return RunContext(config, Path(ctx.config.distill.teacher.workdir))


def check_room_under_teacher(ctx: RunContext, name: str) -> None:
    """`<name>.max_new_tokens`, the teacher's sampling budget, leaves room for a prompt under the teacher's
    positions: its HF folder's config.json, or its model section (no weights are read)."""
    t = ctx.config[name].teacher
    folder = t.hf_path or t.model.hf_path
    if folder and not (Path(folder) / "config.json").exists():
        return  # not there to read before the run starts (the distill stage loads the teacher and says so)
    model = read_config(t.hf_path) if t.hf_path else stated_model_config(teacher_run(ctx))
    check_room(f"{name}.max_new_tokens", ctx.config[name].max_new_tokens, model.max_position_embeddings,
               "the teacher's")


def distill_examples(ctx: RunContext, section, stage_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    c = ctx.config
    fcfg = filter_config(section, c)
    if section.traces_path:
        rows = read_jsonl(Path(section.traces_path))
        gold = {r["question"]: r for r in reasoning_records(ctx, "train")}
        grade = get_reward(reasoning_reward_name(ctx))
        samples = []
        for i, row in enumerate(rows):
            if "question" not in row or "completion" not in row:
                raise ValueError(f"{section.traces_path}:{i + 1}: need 'question' and 'completion'; got {sorted(row)}")
            record = {**gold.get(row["question"], {}), **row}
            fields = {k: [v] for k, v in record.items() if k not in ("question", "completion")}
            graded = record.get("answer") not in (None, "")  # (an answer of 0 is one)
            score = grade([row["question"]], [row["completion"]], **fields)[0] if graded else None
            samples.append({"question": row["question"], "completion": row["completion"],
                            "correct": None if score is None else score > 0.5})
        fcfg = dataclasses.replace(fcfg, keep_ungraded=True)  # traces without a gold answer stay; wrong ones go
        source = section.traces_path
    else:
        model, tok, source = teacher(ctx)
        graphdef, params = nnx.split(model)
        records = reasoning_records(ctx, "train")[: section.prompts]
        samples = sample_graded(ctx, graphdef, params, records, template=section.teacher_template,
                                k=section.samples_per_prompt, sampling=sampling_config(section, tok),
                                key=jax.random.key(c.seed + 44), tokenizer=tok)
        del model, graphdef, params
    kept, counts = filter_samples(samples, fcfg, per_prompt=section.per_prompt)
    metrics = {"data/teacher": source, **{f"data/{k}": v for k, v in counts.items()}}
    if samples and samples[0]["correct"] is not None:
        metrics["data/teacher_sample_accuracy"] = float(np.mean([bool(s["correct"]) for s in samples]))
    kept += top_up(ctx, kept, section, metrics)
    check_examples(stage_dir, kept, metrics)
    return with_general_examples(ctx, kept, section.general_fraction, metrics), metrics


def distill(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    c, s = ctx.config, ctx.config.distill
    t0, cpu0 = time.time(), time.process_time()

    def build():
        examples, metrics = distill_examples(ctx, s, stage_dir)
        metrics["time/data_s"] = time.time() - t0
        metrics["time/data_cpu_s"] = time.process_time() - cpu0
        return examples, metrics

    examples, metrics = cached_examples(stage_dir, build)
    print(f"[r1jax] distill: {len(examples)} SFT examples from {metrics['data/teacher']}", flush=True)
    t_sft, cpu_sft = time.time(), time.process_time()
    trainer, history = train_sft(ctx, model, stage_dir, s, examples, c.data.r1_template)
    # The budget the RL control gets: building the data (teacher sampling) plus SFT. A resumed stage
    # counts the data time of the attempt that built it and its own SFT time only (an underestimate).
    metrics["time/budget_s"] = metrics.get("time/data_s", 0.0) + time.time() - t_sft
    metrics["time/budget_cpu_s"] = metrics.get("time/data_cpu_s", 0.0) + time.process_time() - cpu_sft
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=c.data.r1_template,
                                 metrics=metrics, history=history, t0=t0, cpu0=cpu0)


def student_rl(ctx: RunContext, model: nnx.Module, stage_dir: Path) -> tuple[nnx.Module, dict[str, Any]]:
    s = ctx.config.student_rl
    t0, cpu0 = time.time(), time.process_time()
    budget = float(s.budget_s)
    if s.budget_from:
        manifest = finished_stage(ctx.workdir, s.budget_from)
        key = _budget_key(s)
        if manifest is None or key not in manifest.metrics:
            raise ValueError(f"student_rl.budget_from={s.budget_from!r}: that stage has not finished in {ctx.workdir}")
        budget = float(manifest.metrics[key])
    clock = time.time if s.budget_clock == "wall" else time.process_time
    # Budget accounting survives a restart: time already spent and the measured cost of a step.
    ledger_file = stage_dir / "budget.json"
    ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else {"used": 0.0, "step_cost": None}
    start = clock()
    reward = combine({name: spec for name, spec in reward_table(s.rewards).items() if spec[1]})
    run = GRPORun(ctx, model, stage_dir, s, reasoning_records(ctx, "train"), reward, s.template)
    ledger["used"] += clock() - start
    history: list[dict[str, float]] = []

    def segment(target: int) -> None:
        mark, done = clock(), run.trainer.step_count
        history.extend(run.run(min(target, s.steps)))
        spent, ran = clock() - mark, run.trainer.step_count - done
        ledger["used"] += spent
        if ran and done:  # the segment starting at step 0 compiles: not a step's cost
            ledger["step_cost"] = spent / ran
        write_json_atomic(ledger_file, ledger)

    try:
        # Calibrate on a few steps (the first compiles, and is in the budget as it is in distill's),
        # then fill what is left of the budget at the measured cost per step, re-measuring as we go.
        segment(1)
        segment(max(s.calibration_steps, 2))
        while run.trainer.step_count < s.steps and ledger["step_cost"]:
            more = int((budget - ledger["used"]) / ledger["step_cost"])
            if more < 1:
                break
            segment(run.trainer.step_count + more)
    finally:
        run.close()
    trainer = run.trainer
    metrics = {"rl/budget_clock": s.budget_clock, "rl/budget": budget, "rl/used": ledger["used"],
               "rl/steps": trainer.step_count, "rl/step_cost": ledger["step_cost"], "rl/wall_s": time.time() - t0,
               "rl/cpu_s": time.process_time() - cpu0}
    print(f"[r1jax] student_rl: {trainer.step_count} GRPO steps in {metrics['rl/used']:.0f} {s.budget_clock} s "
          f"(budget {budget:.0f} s)", flush=True)
    return trainer.model, finish(ctx, stage_dir, trainer.graphdef, trainer.params, template=s.template,
                                 metrics=metrics, history=history, t0=t0, cpu0=cpu0)


def _budget_key(section) -> str:
    """The metric of the `budget_from` stage that `student_rl` spends: the budget on its `budget_clock`."""
    return "time/budget_s" if section.budget_clock == "wall" else "time/budget_cpu_s"


DISTILL_STAGES = {"distill": distill, "student_rl": student_rl}


def check_student_rl(ctx: RunContext, name: str, order: StageOrder) -> None:
    check_grpo_stage(ctx, name, order)
    s = ctx.config[name]
    get_template(s.template)
    reward_table(s.rewards)
    if s.budget_clock not in ("wall", "cpu"):
        raise ValueError(f"{name}.budget_clock={s.budget_clock!r}; accepted: 'wall', 'cpu'")
    if s.budget_from and s.budget_from not in order.before(name):
        raise ValueError(f"{name}.budget_from={s.budget_from!r} must name a stage before it or finished in the "
                         f"workdir ({order.before(name)}) or be empty (budget_s seconds)")
    finished = order.finished.get(s.budget_from)
    if finished is not None and _budget_key(s) not in finished.metrics:
        raise ValueError(f"{name}.budget_from={s.budget_from!r}: that stage finished without measuring a budget "
                         f"({_budget_key(s)!r} is not in its manifest's metrics)")
    check_counts(s, name, "calibration_steps")


SECTION_CHECKS.update(distill=functools.partial(check_sft_stage, room=check_room_under_teacher),
                      student_rl=check_student_rl)
