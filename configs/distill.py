"""Distillation (R1, section 2.4): a small student learns from an R1 teacher's traces by SFT alone.

    python -m r1jax.train --config=r1          # the teacher: runs/r1 (once)
    python -m r1jax.train --config=distill     # runs/distill

Stages (r1jax.stages_distill):

0. `pretrain` — embedded default: the student's base model, a smaller transformer pretrained on the
   same synthetic corpus as the R1 run (so the sentencepiece tokenizer is the same one).
1. `distill` — the teacher (`distill.teacher`: by default the r1 run's final `rl_all` checkpoint;
   or an Orbax `checkpoint` with the teacher's `model` section; or an HF folder `hf_path`) samples
   `samples_per_prompt` traces per train prompt in R1's format — or `traces_path` (JSONL: question,
   completion) is read — and the traces are filtered as in R1's rejection sampling (correct, one
   language, no long paragraphs or code blocks), mixed with non-reasoning replies, and the student
   is trained on them by SFT, then evaluated on held-out problems (pass@1 over k, R1's protocol).
2. `student_rl` — the comparison R1 draws in section 4.1: the same student base (`init="pretrain"`)
   trained by GRPO alone (R1-Zero format, accuracy + format rewards) for the wall-clock time the
   `distill` stage took (teacher sampling + SFT), then evaluated the same way. `--config.stages=
   pretrain,distill` skips it.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def _r1_config() -> ConfigDict:
    spec = importlib.util.spec_from_file_location("r1jax_configs_r1", Path(__file__).with_name("r1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    r1 = _r1_config()
    c = r1.get_config()  # same data, corpus and tokenizer as the teacher's run
    teacher_model = ConfigDict(c.model.to_dict())
    c.name = "distill"
    c.stages = "pretrain,distill,student_rl"
    for name in ("cold_start", "reasoning_rl", "rejection_sft", "rl_all"):
        del c[name]
    c.model.update(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192))
    c.distill = r1.sft_section(
        teacher=ConfigDict(dict(
            workdir="runs/r1", stage="rl_all",  # an r1 run and the stage whose final params teach
            checkpoint="",  # or: Orbax params saved by a pipeline stage (with `model` below)
            hf_path="",  # or: an HF folder (config + safetensors + its own tokenizer)
            tokenizer_path="",  # the HF tokenizer folder of a `checkpoint` / `workdir` teacher (default: the run's)
            model=teacher_model,  # the teacher's architecture for `checkpoint` / `workdir`
        )),
        traces_path="",  # or: a JSONL of traces (question, completion); the teacher is then unused
        teacher_template="r1", prompts=1024, samples_per_prompt=4, per_prompt=2, max_new_tokens=48,
        temperature=1.0, filters=r1.filters(), general_fraction=0.25,
        min_examples=0, top_up_with_traces=False,  # tiny test runs only
        steps=600,  # ~12 epochs over the ~1,600 kept traces: at 200 the student was still underfit (loss 0.29)
    )
    c.student_rl = r1.grpo_section(
        init="pretrain",  # the same student base the distill stage started from
        template="r1_zero_brief", rewards=ConfigDict({"accuracy": 1.0, "format": 1.0}),
        budget_from="distill", budget_s=0.0,  # the time that stage took (else budget_s seconds)
        budget_clock="wall",  # "wall", or "cpu" (process CPU seconds: fair on a shared machine)
        calibration_steps=3, steps=500,  # steps: an upper bound; the budget decides
    )
    return c
