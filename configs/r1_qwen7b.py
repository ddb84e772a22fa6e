"""The R1 pipeline on a real base model (Qwen2.5-7B) with DeepSeek-R1's published hyperparameters.

    python -m r1jax.train --config=r1_qwen7b --config.model.hf_path=/ckpt/Qwen2.5-7B \
        --config.data.train=/data/math_train.jsonl --config.data.eval=/data/math500.jsonl

Same stages as `configs/r1.py` without `pretrain` (the HF checkpoint is the base, so the
rejection-sampling SFT's `init="base"` is the HF model). Where a value comes from:

[R1]  DeepSeek-R1 (arXiv 2501.12948 and its Nature version), as we read it:
      - reasoning RL: learning rate 3e-6, KL coefficient β = 0.001, clip ratio ε = 10, rollout
        temperature 1.0, G = 16 samples per question, max length 32,768 tokens, 32 questions per
        training step (batch 512), reference model replaced every 400 training steps, each rollout
        8,192 outputs split into 16 minibatches and trained for one inner epoch (μ = 1);
        language-consistency reward summed with the rule rewards. An r1jax step is one rollout:
        512 questions × 16 samples, 16 optimizer steps of 32 questions each, so R1's 400 training
        steps are 25 r1jax steps.
      - RL for all scenarios: rollout temperature 0.7 ("higher temperatures give incoherent
        generation"), 1,700 training steps (106 r1jax steps of 16), general prompts and preference
        rewards used in the final 400 only (not modelled here: general prompts are mixed in from the
        start at `general_fraction`).
      - rejection-sampling SFT: ~600k reasoning + ~200k non-reasoning samples (general_fraction 0.25),
        two epochs, from the base model.
      - evaluation: k samples at temperature 0.6, top-p 0.95 (k from 4 to 64 by the test set's
        size), max length 32,768.
[ours] Not given by the paper: SFT learning rate, batch and warm-up; cold-start size; filter
       thresholds (long paragraph); rejection-sampling temperature and samples per prompt; the
       number of reasoning-RL steps (R1 trains "until convergence"; we take R1-Zero's 10,400);
       micro-batching; preference models (R1 uses trained reward models; plug one in with
       `r1jax.rewards.preference.register_preference_model`).

Memory: the sampler decodes a step's 8,192 rows of up to 32k tokens in one call, sharded over the
mesh, which takes a large slice. On a smaller one keep R1's batch of 512 per update and give up the
rollout's reuse over 16 updates: `prompts_per_step=32, num_minibatches=1, ref_update_every=400`, and
16 times the `steps`.

Cold-start data: set `cold_start.data_path` to a JSONL of curated long-CoT examples (R1 used
thousands, partly R1-Zero outputs refined by annotators); left empty, the stage samples the base
model under the R1-Zero template and keeps what passes the filters.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict


def _r1():
    spec = importlib.util.spec_from_file_location("r1jax_configs_r1", Path(__file__).with_name("r1.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAX_LENGTH = 32_768  # [R1] generation length for RL and evaluation


def hf_model() -> ConfigDict:
    """The model section of a run on Qwen2.5-7B's HF checkpoint (also `configs/r1zero_qwen7b.py`'s)."""
    return ConfigDict(dict(
        hf_path="/ckpt/Qwen2.5-7B",  # required: a local HF folder (config.json + *.safetensors + tokenizer)
        preset="", vocab_size=0, hidden_size=0, num_layers=0, num_heads=0, num_kv_heads=0, intermediate_size=0,
        max_position_embeddings=0, rope_theta=0.0, tie_word_embeddings=False,
        dtype="bfloat16", param_dtype="float32", remat="dots",
        attention_block=256,  # longer query runs attend block by block (memory O(block²) per head)
    ))


def get_config() -> ConfigDict:
    r1 = _r1()
    c = r1.get_config()
    c.name = "r1_qwen7b"
    c.stages = "cold_start,reasoning_rl,rejection_sft,rl_all"
    del c["pretrain"]
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.model = hf_model()
    c.tokenizer = ConfigDict(dict(path="", vocab_size=0))  # the HF folder's tokenizer
    c.data.update(dict(train="/data/math_train.jsonl", eval="math500", data_dir="/data", train_size=0, eval_size=0,
                       template="r1_zero", r1_template="r1", max_prompt_length=1024))

    sft = dict(batch_size=128, micro_batches=16, learning_rate=1e-5, warmup_steps=100, schedule="cosine",
               max_length=MAX_LENGTH, weight_decay=0.1)  # [ours]
    c.cold_start.update(dict(
        data_path="",  # a JSONL of curated cold-start examples (recommended)
        source_template="r1_zero", prompts=20_000, samples_per_prompt=4, per_prompt=1, min_examples=0,
        top_up_with_traces=False, max_new_tokens=MAX_LENGTH, temperature=1.0,
        steps=2 * 5_000 // 128,  # two epochs over ~5k examples [R1: "thousands"; epochs ours]
        **sft,
    ))
    c.cold_start.filters.max_paragraph_chars = 2_000  # [ours]
    rl = dict(
        # [R1] a rollout of 8,192 completions (512 questions × G = 16) in 16 minibatches: 16 optimizer steps of
        # 32 questions (R1's training step, batch 512), one inner epoch; the reference every 400 of them
        prompts_per_step=512, group_size=16, num_minibatches=16, num_iterations=1, ref_update_every=25,
        preset="grpo", beta=0.001, epsilon_low=10.0, epsilon_high=10.0, kl_estimator="k3",  # [R1]
        micro_batches=64,  # [ours] 8 completions per micro-batch: one per device on up to 8 data × fsdp devices;
        # on a larger slice use 512 / (data × fsdp), else the rows do not split and every device runs all 8
        learning_rate=3e-6, warmup_steps=0, schedule="constant", weight_decay=0.0, max_grad_norm=1.0,  # [R1] lr
        max_new_tokens=MAX_LENGTH, top_p=1.0, reward_workers=16,
    )
    c.reasoning_rl.update(dict(steps=650, temperature=1.0, **rl))  # steps [ours]: R1-Zero's 10,400 training steps
    c.rejection_sft.update(dict(
        init="base", sample_from="previous", prompts=200_000, samples_per_prompt=4, per_prompt=3,  # [ours]
        max_new_tokens=MAX_LENGTH, temperature=1.0, general_fraction=0.25,  # [R1] 600k + 200k
        steps=2 * 800_000 // 128,  # [R1] two epochs over ~800k samples
        **sft,
    ))
    c.rejection_sft.filters.max_paragraph_chars = 2_000  # [ours]
    c.rl_all.update(dict(steps=106, temperature=0.7, general_fraction=0.25, **rl))  # [R1] 1,700 training steps, T 0.7
    c.eval = ConfigDict(dict(every=25, k=16, temperature=0.6, top_p=0.95, max_new_tokens=MAX_LENGTH,  # [R1]
                             general_size=0, general_k=1, batch=64))
    c.checkpoint = ConfigDict(dict(every=10, keep=3))
    return c
