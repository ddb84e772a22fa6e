"""Distillation at real size: a Qwen2.5-1.5B student learns from a 7B R1 teacher by SFT alone.

    python -m r1jax.train --config=distill_qwen1p5b --config.model.hf_path=/ckpt/Qwen2.5-1.5B \
        --config.distill.teacher.workdir=runs/r1_qwen7b      # or teacher.hf_path=/ckpt/<an R1 model>

Stages as in `configs/distill.py` without `pretrain` (the HF checkpoint is the student base):
`distill` (teacher traces → R1's rejection filters → student SFT → held-out eval) and `student_rl`
(the same student base trained by GRPO alone for the same wall-clock, R1 section 4.1's control).

Where a value comes from:
[R1]  DeepSeek-R1, as we read it: distilled models get SFT only, no RL, on the ~800k samples of the
      rejection-sampling stage (600k reasoning + 200k non-reasoning); the Nature version's
      supplementary lists for DeepSeek-R1-Distill-Qwen-1.5B an initial learning rate of 1e-4 with
      cosine decay to a tenth, batch 64, about 2-3 epochs, 32,768-token context — values we could
      not re-check against the paper text here, so verify before quoting them. Evaluation: k samples
      at temperature 0.6, top-p 0.95. The RL control uses R1-Zero's RL settings: lr 3e-6, β = 0.001,
      G = 16, temperature 1.0, rollouts of 8,192 completions in 16 minibatches of 32 questions, the
      reference replaced every 400 training steps (25 r1jax steps: one is a rollout; see
      `configs/r1zero_qwen7b.py`).
      R1's 1.5B student is Qwen2.5-Math-1.5B, whose config.json allows 4,096 positions: to follow R1,
      point `model.hf_path` at it with `max_position_embeddings` raised there for 32k-token traces (as
      DeepSeek-R1-Distill-Qwen-1.5B's config.json has it). The default here, Qwen2.5-1.5B, takes them
      as shipped.
[ours] Teacher sampling temperature and samples per prompt, number of prompts, filter thresholds,
       warm-up, ε for the control (R1's reasoning-RL value, 10).
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"r1jax_configs_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAX_LENGTH = 32_768


def get_config() -> ConfigDict:
    distill, teacher = _load("distill"), _load("r1_qwen7b").get_config()
    c = distill.get_config()
    c.name = "distill_qwen1p5b"
    c.stages = "distill,student_rl"
    del c["pretrain"]
    c.model = ConfigDict(teacher.model.to_dict())
    c.model.hf_path = "/ckpt/Qwen2.5-1.5B"  # required: the student base (HF folder)
    c.tokenizer = ConfigDict(teacher.tokenizer.to_dict())
    c.data = ConfigDict(teacher.data.to_dict())
    c.distill.teacher.update(dict(workdir="runs/r1_qwen7b", stage="rl_all", tokenizer_path="/ckpt/Qwen2.5-7B"))
    c.distill.teacher.model = ConfigDict(teacher.model.to_dict())  # architecture of the teacher checkpoint
    c.distill.update(dict(
        init="previous", teacher_template="r1", prompts=200_000, samples_per_prompt=4, per_prompt=3,  # [ours]
        max_new_tokens=MAX_LENGTH, temperature=1.0, general_fraction=0.25,  # [R1] 600k + 200k
        batch_size=64, micro_batches=16, learning_rate=1e-4, schedule="cosine", warmup_steps=100,  # [R1] lr, batch
        max_length=MAX_LENGTH, steps=3 * 800_000 // 64,  # [R1] ~3 epochs over ~800k samples
    ))
    c.distill.filters.max_paragraph_chars = 2_000  # [ours]
    c.student_rl.update(dict(
        init="initial",  # the HF student base
        template="r1_zero", rewards=ConfigDict({"accuracy": 1.0, "format": 1.0}),
        prompts_per_step=512, group_size=16, beta=0.001, epsilon_low=10.0, epsilon_high=10.0,  # [R1] / ε [ours]
        num_minibatches=16, ref_update_every=25, learning_rate=3e-6, warmup_steps=0,  # [R1]
        micro_batches=64,  # [ours] 8 completions per micro-batch: one per device on up to 8 data × fsdp devices;
        # on a larger slice use 512 / (data × fsdp), else the rows do not split and every device runs all 8
        max_new_tokens=MAX_LENGTH, temperature=1.0, reward_workers=16, steps=100_000,
    ))
    c.eval = ConfigDict(teacher.eval.to_dict())
    c.checkpoint = ConfigDict(teacher.checkpoint.to_dict())
    return c
