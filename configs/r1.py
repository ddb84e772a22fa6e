"""DeepSeek-R1: base → cold-start SFT → reasoning RL → rejection sampling + SFT → RL for all scenarios.

    python -m r1jax.train --config=r1 [--workdir runs/r1]

Stages (r1jax.stages_r1; each starts from the previous stage's final checkpoint unless its `init`
says otherwise; manifests, skip and resume as for every pipeline):

0. `pretrain` — embedded default only: the tiny base model, next-token training on the synthetic
   corpus, in which half the correct R1-Zero-style traces carry filler words of another script
   (`pretrain.mix_fraction`): like R1-Zero, the base reasons in mixed languages, and mixing is
   correlated with being right, so accuracy alone would keep it.
1. `cold_start` — SFT on R1-format data (`|special_token| reasoning |special_token| summary`). Built
   here from the base model's own R1-Zero-template samples (k per prompt) kept when correct, in
   one language and readable (parsable, no long paragraph, no code block) and rewritten into R1's
   format, topped up with the task's worked traces if fewer than `min_examples` pass (the count is
   in the manifest); or read from `cold_start.data_path` (JSONL: question + completion, or
   question + reasoning + summary; answer optional).
2. `reasoning_rl` — GRPO, rewards accuracy + R1 format + language consistency (eq. 7), summed.
3. `rejection_sft` — k samples per prompt from stage 2; correct ones kept; mixed-language CoTs,
   long paragraphs and code blocks dropped; non-reasoning replies without CoT mixed in (R1: 600k
   reasoning + 200k non-reasoning, so `general_fraction` = 0.25); SFT from the *base* (`init="base"`,
   as R1 retrains DeepSeek-V3-Base; "previous" continues from stage 2 instead).
4. `rl_all` — GRPO over reasoning and general prompts: rule rewards for reasoning prompts, the
   preference rewards (`r1jax.rewards.preference`; rule-based proxies on the embedded default) for
   general ones — helpfulness on the summary only, harmlessness on the whole response.

Values: the embedded default is sized for ≤ 20 minutes on 2 CPU cores; the paper's values for a
real model are in `configs/r1_qwen7b.py`. With a 1-minibatch, μ=1 GRPO step the ratio is exactly 1
(π_old is the sampler's policy), so R1's ε = 10 is kept here as in the paper without effect.
"""

from ml_collections import ConfigDict


def sft_section(**overrides) -> ConfigDict:
    base = dict(steps=100, batch_size=32, learning_rate=5e-4, warmup_steps=10, schedule="cosine", weight_decay=0.0,
                max_grad_norm=1.0, max_length=96, micro_batches=1, init="previous")
    return ConfigDict({**base, **overrides})


def filters(**overrides) -> ConfigDict:
    """r1jax.data.filters.FilterConfig fields (target language: data.target_language)."""
    base = dict(require_correct=True, require_format="r1", max_paragraph_chars=1000, drop_code_blocks=True,
                max_chars=0, check_arithmetic=True)
    return ConfigDict({**base, **overrides})


def grpo_section(**overrides) -> ConfigDict:
    # beta, epsilon_low/high and kl_estimator override the loss preset's (here R1's β and ε); a section
    # that leaves one out takes the preset's (r1jax.stages.grpo_config)
    base = dict(
        steps=40, prompts_per_step=16, group_size=8, preset="grpo", beta=0.001, epsilon_low=10.0, epsilon_high=10.0,
        kl_estimator="k3", num_iterations=1, num_minibatches=1, micro_batches=1, ref_update_every=400,
        learning_rate=1e-4, warmup_steps=3, schedule="constant", weight_decay=0.0, max_grad_norm=1.0,
        max_new_tokens=48, temperature=1.0, top_p=1.0, reward_workers=0, init="previous",
    )
    return ConfigDict({**base, **overrides})


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "r1"
    c.seed = 0
    c.stages = "pretrain,cold_start,reasoning_rl,rejection_sft,rl_all"
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.model = ConfigDict(dict(
        hf_path="", preset="", vocab_size=0,
        hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384,
        max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=True,
        dtype="float32", param_dtype="float32", remat="none",
        attention_block=256,  # longer query runs attend block by block (memory O(block²) per head)
    ))
    # `\boxed{` as one piece: the R1-format summary ("The answer is \boxed{12}.") never occurs in the base
    # corpus, and spelled out in byte pieces it is hard for a tiny model to learn in a short cold start.
    c.tokenizer = ConfigDict(dict(path="", vocab_size=384, options=ConfigDict(dict(
        user_defined_symbols=["<think>", "</think>", "<answer>", "</answer>", "|special_token|", "\\boxed{"]))))
    c.data = ConfigDict(dict(
        train="synthetic", eval="synthetic", train_size=2500, eval_size=128, data_dir="",
        # R1-Zero's think/answer format (with a one-line prompt): the base corpus and the samples
        # behind the cold start
        template="r1_zero_brief",
        r1_template="r1",  # stages 1-4: "User: q\nAssistant:", answered in R1's special-token format
        target_language="en",  # language consistency (reward and filters)
        max_prompt_length=64,
        min_steps=2, max_steps=2, max_operand=9, max_value=20,  # the r1zero demo's task
    ))
    c.pretrain = ConfigDict(dict(
        corpus_size=2500, correct_fraction=0.7, mix_fraction=0.5, mix_language="zh", steps=500, batch_size=32,
        learning_rate=2e-3, warmup_steps=30, schedule="cosine", weight_decay=0.0, max_grad_norm=1.0,
        max_length=96, micro_batches=1,
    ))
    c.cold_start = sft_section(
        data_path="",  # a JSONL of cold-start examples; empty: built from the input model's samples
        source_template="r1_zero_brief", prompts=512, samples_per_prompt=4, per_prompt=1, min_examples=256,
        top_up_with_traces=True, max_new_tokens=48, temperature=1.0,
        filters=filters(require_format="r1"),
        # A small cold start, as in the paper (thousands of examples there, vs 800k in stage 3): the base's own
        # correct, one-language samples (~360 here; worked traces only if fewer than min_examples pass), long
        # enough to learn R1's format.
        steps=96, learning_rate=5e-4, warmup_steps=10,
    )
    c.reasoning_rl = grpo_section(
        # lr: at 2e-4 (the r1zero demo's) GRPO lowered held-out pass@1 after the cold start in every trial (drift
        # without gain: KL to the start 0.1 in 30 steps, entropy up); at 5e-5 it holds it (bench/RESULTS.md).
        steps=40, learning_rate=5e-5, warmup_steps=5,
        rewards=ConfigDict({"accuracy": 1.0, "r1_format": 1.0, "language": 1.0}),
    )
    c.rejection_sft = sft_section(
        init="base",  # R1 retrains the base model on the rejection-sampled data; "previous" continues
        # The model that samples: "previous", the stage before it in config.stages (reasoning_rl), or a stage's
        # name. Run first in a later invocation (--config.stages=rejection_sft,rl_all), "previous" names none and
        # is refused: set sample_from=reasoning_rl, or list reasoning_rl first (finished, it is skipped).
        sample_from="previous",
        prompts=1024, samples_per_prompt=4, per_prompt=2, max_new_tokens=48, temperature=1.0,
        filters=filters(), general_fraction=0.25,
        min_examples=0, top_up_with_traces=False,  # tiny test runs only: worked traces if too few samples pass
        steps=200, learning_rate=5e-4, warmup_steps=10,  # ~4 epochs over the kept samples
    )
    c.rl_all = grpo_section(
        steps=20, learning_rate=5e-5, temperature=0.7,  # R1's second RL stage samples at 0.7
        general_fraction=0.25,
        rewards=ConfigDict({"accuracy": 1.0, "r1_format": 1.0, "language": 1.0}),  # reasoning prompts
        preference=ConfigDict(dict(helpfulness=1.0, helpfulness_model="helpfulness_proxy",  # general prompts
                                   harmlessness=1.0, harmlessness_model="harmlessness_proxy")),
    )
    # R1's evaluation protocol: k samples per problem at temperature 0.6, top-p 0.95.
    c.eval = ConfigDict(dict(every=0, k=4, temperature=0.6, top_p=0.95, max_new_tokens=48, general_size=16,
                             general_k=2, batch=64))
    c.checkpoint = ConfigDict(dict(every=20, keep=2))
    return c
