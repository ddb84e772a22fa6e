"""R1-Zero: GRPO with rule rewards (accuracy + format) on the paper's template, from a base model.

With `model.hf_path` empty (the default) this is the embedded laptop demo: a sentencepiece tokenizer
trained on the synthetic task's corpus, a tiny base model obtained by a short pretraining stage on a
deliberately imperfect corpus, then R1-Zero GRPO; nothing is downloaded. The values below are sized
for that tiny model (learning rate 2e-4, 32 new tokens, 16 prompts × G = 8 per step). An HF base
model runs with the `rl` stage alone:

    python -m r1jax.train --config=r1zero --config.model.hf_path=/ckpt/Qwen2.5-1.5B --config.stages=rl \
        --config.data.train=/data/gsm8k_train.jsonl --config.data.eval=/data/gsm8k_test.jsonl

but at a real size start from `configs/r1zero_qwen7b.py`, which carries R1-Zero's published RL settings.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "r1zero"
    c.seed = 0
    c.stages = "pretrain,rl"  # comma-separated, run in order; each starts from the previous stage's params
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.model = ConfigDict(dict(
        hf_path="",  # a local HF folder (config.json + *.safetensors); empty: the preset below
        preset="",  # a r1jax.model preset name; empty: the fields below
        vocab_size=0,  # 0: the tokenizer's
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
        dtype="float32", param_dtype="float32", remat="none",
        attention_block=256,  # longer query runs attend block by block (memory O(block²) per head)
    ))
    c.tokenizer = ConfigDict(dict(
        path="",  # an HF tokenizer folder; empty: HF model folder, else a sentencepiece model trained on the corpus
        vocab_size=512,
        # Pieces may span words, so the paper's fixed template (repeated in every corpus text) costs ~22
        # tokens instead of ~80: prompts fit 64 slots.
        options=ConfigDict(dict(split_by_whitespace=False, split_by_unicode_script=False,
                                max_sentencepiece_length=128)),
    ))
    c.data = ConfigDict(dict(
        train="synthetic",  # "synthetic", "synthetic:countdown", a benchmark name or a .jsonl path
        eval="synthetic",
        train_size=2500, eval_size=128, data_dir="",
        template="r1_zero",
        max_prompt_length=256,
        # the synthetic task (r1jax.data.synthetic.TaskSpec)
        min_steps=2, max_steps=2, max_operand=9, max_value=20,
    ))

    # The base model of the embedded default: next-token training on an imperfect corpus.
    c.pretrain = ConfigDict(dict(
        corpus_size=2500, correct_fraction=0.3, noise_kinds="no_think,no_think,truncated",
        steps=1000, batch_size=32,
        learning_rate=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.0, max_grad_norm=1.0,
        max_length=256, micro_batches=1,
    ))

    c.rl = ConfigDict(dict(
        steps=40, prompts_per_step=16, group_size=8,
        # The loss preset (grpo, dapo, dr_grpo, gspo) and the fields that override it; unset (None), a field
        # is the preset's (grpo: β 0.001, ε 0.2 / 0.2, k3), so --config.rl.preset=dapo gives DAPO's ε and β.
        # Advantages: the std of each "group" (R1), of the "batch", or "none" (Dr. GRPO); its ddof and ε
        # (0 and 1e-6; TRL's: 1 and 1e-4).
        preset="grpo", beta=config_dict.placeholder(float), epsilon_low=config_dict.placeholder(float),
        epsilon_high=config_dict.placeholder(float), kl_estimator=config_dict.placeholder(str),
        advantage_scale=config_dict.placeholder(str), advantage_std_ddof=config_dict.placeholder(int),
        advantage_eps=config_dict.placeholder(float),
        num_iterations=1, num_minibatches=1, micro_batches=1,
        ref_update_every=400, dynamic_sampling=False, max_sampling_rounds=3,
        old_logprobs="trainer",  # π_old: the trainer's log-probs ("sampler": the sampler's; RLConfig says more)
        # name: weight, or name: {weight: w, option: value, …}, e.g. DAPO's overlong shaping
        # overlong: {weight: 1.0, max_length: 32, cache_length: 8} (token counts come from the sampler)
        rewards=ConfigDict({"accuracy": 1.0, "format": 1.0}),
        reward_workers=0, reward_timeout=10.0,
        learning_rate=2e-4, warmup_steps=5, schedule="constant", weight_decay=0.0, max_grad_norm=1.0,
        chunk_size=512,
    ))
    c.sampling = ConfigDict(dict(max_new_tokens=32, temperature=1.0, top_p=1.0, top_k=0))
    # R1's evaluation protocol: k samples per problem at temperature 0.6, top-p 0.95.
    c.eval = ConfigDict(dict(every=5, k=4, temperature=0.6, top_p=0.95, max_new_tokens=32))
    c.checkpoint = ConfigDict(dict(every=20, keep=2))
    return c
