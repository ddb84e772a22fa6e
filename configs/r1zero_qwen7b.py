"""R1-Zero on a real base model (Qwen2.5-7B) with DeepSeek-R1-Zero's published RL hyperparameters.

    python -m r1jax.train --config=r1zero_qwen7b --config.model.hf_path=/ckpt/Qwen2.5-7B \
        --config.data.train=/data/math_train.jsonl --config.data.eval=math500 --config.data.data_dir=/data

One stage, `rl` (`configs/r1zero.py`'s, without `pretrain`: the HF checkpoint is the base): GRPO on
the paper's `<think>/<answer>` template with accuracy + format rewards, summed with equal weights.
`data.train` is a JSONL with a `question` (or `problem`) and an `answer` per line, or a benchmark
name with a train split such as `gsm8k` (read from `data.data_dir`). Where a value comes from:

[R1]  DeepSeek-R1 (arXiv 2501.12948 and its Nature version), R1-Zero's training details, as we read
      them: learning rate 3e-6, KL coefficient β = 0.001, rollout temperature 1, 16 samples per
      question with at most 32,768 tokens (65,536 after step 8.2k: not modelled, raise
      `sampling.max_new_tokens` on a later run), 32 questions per training step (batch 512), the
      reference model replaced every 400 training steps, each rollout 8,192 outputs split into 16
      minibatches and trained for one inner epoch, 10,400 training steps. An r1jax step is one
      rollout: 512 questions × 16 samples, 16 optimizer steps of 32 questions each, so 400 training
      steps are 25 r1jax steps and 10,400 are 650. Evaluation: k samples at temperature 0.6, top-p
      0.95 (R1 takes k from 4 to 64 by the test set's size), 32,768 tokens.
[ours] The clip ratio ε = 10 (R1's value for its reasoning RL; R1-Zero's text gives none), the
       prompt length, micro-batching, reward workers, evaluation and checkpoint intervals.

Memory: the sampler decodes a step's 8,192 rows of up to 32k tokens in one call, sharded over the
mesh, which takes a large slice. On a smaller one keep R1's batch of 512 per update and give up the
rollout's reuse over 16 updates: `prompts_per_step=32, num_minibatches=1, ref_update_every=400`, and
16 times the `steps`.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

MAX_LENGTH = 32_768  # [R1] generation length for RL and evaluation


def _sibling(name: str):
    """configs/NAME.py as a module, whether configs is importable or only a folder beside this file."""
    spec = importlib.util.spec_from_file_location(f"r1jax_configs_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ConfigDict:
    c = _sibling("r1zero").get_config()
    c.name = "r1zero_qwen7b"
    c.stages = "rl"
    del c["pretrain"]
    c.model = _sibling("r1_qwen7b").hf_model()
    c.tokenizer = ConfigDict(dict(path="", vocab_size=0))  # the HF folder's tokenizer
    c.data.update(dict(train="/data/math_train.jsonl", eval="math500", data_dir="/data", train_size=0, eval_size=0,
                       template="r1_zero", max_prompt_length=1024))
    c.rl.update(dict(
        steps=650,  # [R1] 10,400 training steps = 650 rollouts of 16 optimizer steps
        prompts_per_step=512, group_size=16, num_minibatches=16, num_iterations=1,  # [R1] 8,192 per rollout
        beta=0.001, epsilon_low=10.0, epsilon_high=10.0, kl_estimator="k3",  # [R1] β; ε [ours]: R1's reasoning-RL value
        ref_update_every=25,  # [R1] every 400 training steps
        micro_batches=64,  # [ours] 8 completions per micro-batch: one per device on up to 8 data × fsdp devices;
        # on a larger slice use 512 / (data × fsdp), else the rows do not split and every device runs all 8
        learning_rate=3e-6, warmup_steps=0, schedule="constant",  # [R1]
        reward_workers=16,
    ))
    c.sampling.update(dict(max_new_tokens=MAX_LENGTH, temperature=1.0, top_p=1.0, top_k=0))  # [R1]
    c.eval.update(dict(every=25, k=16, temperature=0.6, top_p=0.95, max_new_tokens=MAX_LENGTH))  # [R1] T, top-p
    c.checkpoint = ConfigDict(dict(every=10, keep=3))
    return c
