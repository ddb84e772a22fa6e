"""Does R1's language-consistency reward (eq. 7) stop language mixing where accuracy rewards it?

    python bench/language_mixing.py [--workdir /tmp/lang] [--seed 0] [--rl-steps 10 ...]

The task is built to tempt mixing. Each problem of a small space (20 one-operation problems on
operands 1-3, so a two-layer model learns them in a few hundred steps) appears `--repeats` times in
the base model's corpus with a fresh draw of its completion: half correct, half with an arithmetic
slip, and every correct one carries filler words of another script (`--mix-fraction 1.0`). The
base thus answers with mixed-and-right or clean-and-wrong traces. From that one base, two GRPO runs
with the same seed and settings differ only in the reward: accuracy alone, which pays exactly the
mixed traces, or accuracy + language consistency (R1 eq. 7 on the CoT; a wordless arithmetic CoT
counts as consistent), which pays a clean *and* right trace most. Both are sampled on the training
prompts; the script prints JSON with, per model, the share of CoTs written in the target language
only (`consistent`), eq. 7 pooled over the words (`word_share`), accuracy and format rate.

Measured (defaults, seeds 0/1/2; consistent share): base 0.56/0.56/0.48, accuracy only
0.39/0.05/0.19, accuracy + language 0.91/1.00/0.98.
`tests/test_r1_pipeline.py` runs it with tiny settings and asserts the gap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _r1_config():
    spec = importlib.util.spec_from_file_location("r1jax_configs_r1", REPO / "configs" / "r1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/r1jax_language_mixing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--max-operand", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=24)
    p.add_argument("--mix-fraction", type=float, default=1.0)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--rl-steps", type=int, default=10)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--language-weight", type=float, default=1.0)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-k", type=int, default=4)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np
    from flax import nnx

    from r1jax.data import synthetic
    from r1jax.data.filters import language_stats, split_reasoning
    from r1jax.data.templates import format_prompt
    from r1jax.pipeline import RunContext, save_params
    from r1jax.rewards import combine, get_reward
    from r1jax.rewards.preference import r1_language_reward
    from r1jax.sampling import SamplingConfig
    from r1jax.stages_r1 import reasoning_records, sample_graded, train_grpo, train_sft

    t0 = time.time()
    r1 = _r1_config()
    c = r1.get_config()
    c.seed = args.seed
    c.model.update(dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=2, num_kv_heads=1,
                        intermediate_size=2 * args.hidden, max_position_embeddings=96))
    c.tokenizer.vocab_size = 320
    c.pretrain.update(dict(corpus_size=args.problems, correct_fraction=0.5, mix_fraction=args.mix_fraction))
    c.data.update(dict(train_size=args.problems, eval_size=8, max_prompt_length=32, min_steps=1,
                       max_steps=args.max_steps, max_operand=args.max_operand))
    c.checkpoint.update(dict(every=10_000, keep=1))
    root = Path(args.workdir)
    ctx = RunContext(c, root)
    template = c.data.template
    examples = []
    for repeat in range(args.repeats):  # every problem, each time with a fresh draw of its completion
        seed = args.seed + repeat
        problems = synthetic.generate("train", args.problems, seed, ctx.task_spec)
        texts = synthetic.corpus(args.problems, seed, correct_fraction=0.5, noise_kinds=("slip",),
                                 mix_fraction=args.mix_fraction, template=template, spec=ctx.task_spec)
        for problem, text in zip(problems, texts, strict=True):
            prompt = format_prompt(template, problem["question"])
            examples.append({"question": problem["question"], "completion": text[len(prompt):].strip()})
    sft = r1.sft_section(steps=args.pretrain_steps, batch_size=32, learning_rate=3e-3, warmup_steps=10,
                         max_length=64)
    trainer, _ = train_sft(ctx, ctx.initial_model(), root / "base_sft", sft, examples, template)
    base = trainer.model
    save_params(nnx.state(base), root / "base")
    tok = ctx.tokenizer
    prompts = reasoning_records(ctx, "train")[: args.eval_prompts]  # the prompts RL trains on
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)

    def measure(model) -> dict:
        graphdef, params = nnx.split(model)
        samples = sample_graded(ctx, graphdef, params, prompts, template=template, k=args.eval_k,
                                sampling=sampling, key=jax.random.key(args.seed + 7))
        parsed = [split_reasoning(s["completion"]) for s in samples]
        stats = language_stats([(p or (s["completion"], ""))[0] for p, s in zip(parsed, samples, strict=True)])
        return {"consistent": stats["consistent_fraction"], "word_share": stats["word_share"],
                "accuracy": float(np.mean([s["correct"] for s in samples])),
                "format": float(np.mean([p is not None for p in parsed]))}

    results = {"settings": vars(args), "base": measure(base)}
    section = r1.grpo_section(steps=args.rl_steps, prompts_per_step=args.prompts_per_step,
                              group_size=args.group_size, learning_rate=args.lr, warmup_steps=0, max_new_tokens=48,
                              beta=0.0)
    for name, language in (("accuracy_only", False), ("with_language", True)):
        rewards = {"accuracy": (get_reward("accuracy"), 1.0)}
        if language:
            rewards["language"] = (r1_language_reward, args.language_weight)
        trainer, _ = train_grpo(ctx, ctx.model_from(root / "base"), root / name, section,
                                reasoning_records(ctx, "train"), combine(rewards), template)
        results[name] = measure(trainer.model)
    results["seconds"] = time.time() - t0
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
