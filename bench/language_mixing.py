"""Does R1's language-consistency reward (eq. 7) stop language mixing where accuracy rewards it?

    python bench/language_mixing.py [--workdir /tmp/lang] [--pretrain-steps 300 ...]

The task is built to tempt mixing: a base model is pretrained on a synthetic corpus where *every*
correct worked solution carries filler words of another script (`mix_fraction=1.0`) and every flawed
one is clean, so mixing and being right go together. From that one base, two GRPO runs with the
same seed and settings differ only in the reward: accuracy alone, or accuracy + language
consistency (R1 eq. 7 on the CoT, a wordless arithmetic CoT counting as consistent). Both are then
sampled on the same prompts; the script prints JSON with, per model, the share of CoTs written in
the target language only (`consistent`), eq. 7 pooled over the words (`word_share`), accuracy and
format rate. A small problem space (operands 1-3) lets a tiny model learn the task in seconds.
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
    p.add_argument("--corpus-size", type=int, default=180)
    p.add_argument("--mix-fraction", type=float, default=1.0)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--rl-steps", type=int, default=15)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--language-weight", type=float, default=1.0)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-k", type=int, default=4)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np
    from flax import nnx

    from r1jax.data.filters import language_stats, split_reasoning
    from r1jax.pipeline import RunContext, save_params
    from r1jax.rewards import combine, get_reward
    from r1jax.rewards.preference import r1_language_reward
    from r1jax.sampling import SamplingConfig
    from r1jax.stages import pretrain
    from r1jax.stages_r1 import reasoning_records, sample_graded, train_grpo

    t0 = time.time()
    r1 = _r1_config()
    c = r1.get_config()
    c.seed = args.seed
    c.model.update(dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=2, num_kv_heads=1,
                        intermediate_size=2 * args.hidden, max_position_embeddings=96))
    c.tokenizer.vocab_size = 320
    c.pretrain.update(dict(corpus_size=args.corpus_size, steps=args.pretrain_steps, batch_size=32, warmup_steps=10,
                           learning_rate=3e-3, max_length=64, correct_fraction=0.5, mix_fraction=args.mix_fraction))
    c.data.update(dict(train_size=args.corpus_size, eval_size=8, max_prompt_length=32, min_steps=1, max_steps=2,
                       max_operand=3))
    c.checkpoint.update(dict(every=10_000, keep=1))
    root = Path(args.workdir)
    ctx = RunContext(c, root)
    base, _ = pretrain(ctx, ctx.initial_model(), root / "pretrain")
    save_params(nnx.state(base), root / "base")
    tok = ctx.tokenizer
    prompts = reasoning_records(ctx, "train")[: args.eval_prompts]  # the prompts RL trains on
    sampling = SamplingConfig(max_new_tokens=48, temperature=1.0, eos_ids=(tok.eos_id,), pad_id=tok.pad_id)

    def measure(model) -> dict:
        graphdef, params = nnx.split(model)
        samples = sample_graded(ctx, graphdef, params, prompts, template="r1_zero_brief", k=args.eval_k,
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
                                reasoning_records(ctx, "train"), combine(rewards), "r1_zero_brief")
        results[name] = measure(trainer.model)
    results["seconds"] = time.time() - t0
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
