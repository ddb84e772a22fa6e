"""Evaluation metrics and reports, following the DeepSeek-R1 protocol.

R1 samples k completions per problem (temperature 0.6, top-p 0.95) and reports pass@1 averaged
over the k samples, pass@k and cons@k (majority vote). This module owns everything after sampling:

* `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. (2021), `1 - C(n-c, k) / C(n, k)`,
  in its numerically stable product form.
* `pass1_mean`: pass@1 averaged over samples, then over problems, with the standard error across
  problems.
* `cons_at_k`: majority vote. With n ≥ k samples it is the exact mean over all k-subsets (an
  unbiased estimator, as pass@k is). **Ties** between the most-voted answers are broken uniformly at
  random and the expectation is reported: a tie between t answers of which r are correct scores
  r/t. Samples without an extractable answer (None) do not vote; a subset with no votes scores 0.
  An answer whose samples the grader judged differently (it saw more than the extracted string)
  counts as correct with the share of its samples marked correct.
* `evaluate_completions` grades already generated completions; `summarize` turns per-problem
  results into one summary; `write_results_jsonl` / `summary_table` / `write_summary_markdown`
  write the per-problem JSONL and the markdown table.

Grading and summaries import numpy only, so they run anywhere; `sample_completions` and
`evaluate_model` (the sampling side, used by the trainer and `python -m r1jax.evaluate`) import JAX
when called.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# grader(completions of one problem, its record) -> one score per completion (bool, float or None
# when grading failed); a score > 0.5 counts as correct.
Grader = Callable[[Sequence[str], Mapping[str, Any]], Sequence[float | bool | None]]
AnswerExtractor = Callable[[str], "str | None"]


# ---------------------------------------------------------------------------------------------
# Estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c={c} <= n={n} and 1 <= k={k} <= n")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample std, ddof=1); nan for fewer than two values."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(len(values)))


def pass1_mean(correct: Sequence[Sequence[bool | float]]) -> tuple[float, float]:
    """(pass@1, standard error): per problem the share of correct samples, then the mean over problems.

    `correct[i]` holds problem i's per-sample correctness; problems may have different sample counts.
    The standard error is across problems (nan for a single problem).
    """
    if not correct:
        raise ValueError("pass1_mean needs at least one problem")
    per_problem = []
    for i, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples")
        per_problem.append(float(np.mean(np.asarray(row, dtype=np.float64))))
    return float(np.mean(per_problem)), _stderr(per_problem)


def _vote_classes(
    answers: Sequence[str | None], correct: Sequence[bool] | Callable[[str], bool]
) -> tuple[list[tuple[int, float]], int]:
    """[(votes, credit)] per distinct non-None answer, and the number of None answers.

    With per-sample flags, an answer's credit is the share of its samples marked correct: 1 or 0
    when the grader and the extractor agree, a fraction when the grader judged the whole completion
    and saw differences the extracted answer hides.
    """
    counts = Counter(a for a in answers if a is not None)
    if callable(correct):
        return [(counts[a], float(bool(correct(a)))) for a in counts], len(answers) - sum(counts.values())
    if len(correct) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    hits = Counter(a for a, ok in zip(answers, correct, strict=True) if a is not None and ok)
    return [(counts[a], hits[a] / counts[a]) for a in counts], len(answers) - sum(counts.values())


def cons_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool] | Callable[[str], bool],
    k: int | None = None,
) -> float:
    """Majority-vote accuracy of k samples, estimated exactly from all n >= k samples.

    Args:
      answers: the n extracted (ideally normalised) answers; None for "no answer", which never votes.
      correct: per-sample correctness flags, or a function answer -> bool (called once per distinct
        answer).
      k: votes per problem; default n (one vote over all samples, R1's cons@64 with 64 samples).

    Returns:
      The mean over all k-subsets of the vote's correctness, ties scored as described in the module
      docstring.
    """
    n = len(answers)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"cons_at_k needs 1 <= k={k} <= n={n}")
    classes, n_none = _vote_classes(answers, correct)
    if not any(credit for _, credit in classes):
        return 0.0
    if k == n:
        top = max(votes for votes, _ in classes)
        tied = [credit for votes, credit in classes if votes == top]
        return sum(tied) / len(tied)

    # E = sum over correct classes c and their vote count j in the subset of
    #   C(s_c, j) * sum_{subsets of the rest with every other class <= j votes} prod C(s_d, i_d) / (1 + #ties)
    # divided by C(n, k). The inner sum is a DP over the other classes: state [picked, ties].
    total = 0.0
    for c, (s_c, credit) in enumerate(classes):
        if not credit:
            continue
        others = [s for d, (s, _) in enumerate(classes) if d != c]
        for j in range(1, min(s_c, k) + 1):
            rest = k - j
            if rest > n - s_c:
                continue
            dp = np.zeros((rest + 1, len(others) + 1), dtype=np.float64)
            for i0 in range(min(n_none, rest) + 1):
                dp[i0, 0] = math.comb(n_none, i0)
            for s_d in others:
                new = np.zeros_like(dp)
                for i in range(min(s_d, j, rest) + 1):
                    w = math.comb(s_d, i)
                    if i == j:
                        new[i:, 1:] += w * dp[: rest + 1 - i, :-1]
                    else:
                        new[i:, :] += w * dp[: rest + 1 - i, :]
                dp = new
            ties = np.arange(len(others) + 1, dtype=np.float64)
            total += credit * math.comb(s_c, j) * float(np.sum(dp[rest] / (1.0 + ties)))
    return total / math.comb(n, k)


# ---------------------------------------------------------------------------------------------
# Grading already generated completions


def grader_from_reward(reward_fn: Callable[..., Sequence[float | None]]) -> Grader:
    """Adapt a reward with the project signature `fn(prompts, completions, **fields)` to a `Grader`.

    The record's fields are passed as per-completion lists (`answer=[gold] * n`, `numbers=…`).
    """

    def grader(completions: Sequence[str], record: Mapping[str, Any]) -> Sequence[float | None]:
        n = len(completions)
        fields = {k: [v] * n for k, v in record.items() if k != "question"}
        return reward_fn([record["question"]] * n, list(completions), **fields)

    return grader


def evaluate_completions(
    records: Sequence[Mapping[str, Any]],
    completions_per_problem: Sequence[Sequence[str]],
    grader: Grader,
    *,
    extract_answer: AnswerExtractor | None = None,
    lengths_per_problem: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Grade k completions per problem; one result dict per problem.

    Args:
      records: the benchmark records ("id", "question", "answer", task fields).
      completions_per_problem: completions_per_problem[i] are the samples for records[i].
      grader: scores one problem's completions (see `Grader`); an exception or a None score marks
        the sample incorrect and is counted in "grader_errors", never fatal.
      extract_answer: completion -> answer string (or None) for majority voting; without it the
        results carry no "extracted" field and `summarize` reports no cons@k.
      lengths_per_problem: response lengths in tokens, for the mean-length metric.

    Returns:
      Per problem: id, question, answer, completions, scores, correct (list[bool]), num_samples,
      num_correct, pass@1, grader_errors, and extracted / lengths when given.
    """
    if len(records) != len(completions_per_problem):
        raise ValueError(f"{len(records)} records but {len(completions_per_problem)} completion lists")
    if lengths_per_problem is not None and len(lengths_per_problem) != len(records):
        raise ValueError(f"{len(records)} records but {len(lengths_per_problem)} length lists")
    results = []
    for i, (record, completions) in enumerate(zip(records, completions_per_problem, strict=True)):
        completions = list(completions)
        if not completions:
            raise ValueError(f"problem {i} (id={record.get('id')!r}) has no completions")
        try:
            scores = list(grader(completions, record))
            if len(scores) != len(completions):
                raise ValueError(f"grader returned {len(scores)} scores for {len(completions)} completions")
        except Exception as e:  # noqa: BLE001 - a broken grader costs the scores, not the evaluation
            scores, error = [None] * len(completions), f"{type(e).__name__}: {e}"
        else:
            error = None
        correct = [s is not None and float(s) > 0.5 for s in scores]
        result = {
            "id": record.get("id", str(i)),
            "question": record.get("question"),
            "answer": record.get("answer"),
            "completions": completions,
            "scores": [None if s is None else float(s) for s in scores],
            "correct": correct,
            "num_samples": len(completions),
            "num_correct": int(sum(correct)),
            "pass@1": sum(correct) / len(completions),
            "grader_errors": sum(s is None for s in scores),
        }
        if error is not None:
            result["grader_exception"] = error
        if extract_answer is not None:
            result["extracted"] = [_safe_extract(extract_answer, c) for c in completions]
        if lengths_per_problem is not None:
            lengths = [int(x) for x in lengths_per_problem[i]]
            if len(lengths) != len(completions):
                raise ValueError(f"problem {i}: {len(completions)} completions but {len(lengths)} lengths")
            result["lengths"] = lengths
        results.append(result)
    return results


def _safe_extract(extract_answer: AnswerExtractor, completion: str) -> str | None:
    try:
        answer = extract_answer(completion)
    except Exception:  # noqa: BLE001 - an unparsable completion simply has no vote
        return None
    return None if answer is None else str(answer)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def summarize(per_problem: Sequence[Mapping[str, Any]], ks: Sequence[int] | None = None) -> dict[str, Any]:
    """One summary from per-problem results (as `evaluate_completions` returns them).

    Each result needs "correct" (list[bool]); "extracted" enables cons@k; "lengths" adds
    mean_length. pass@k and cons@k are reported for each k in `ks` (default `default_ks` of the
    smallest sample count) not above any problem's sample count; each with "_stderr" across problems.
    """
    if not per_problem:
        raise ValueError("summarize needs at least one problem")
    counts = [len(r["correct"]) for r in per_problem]
    n_min = min(counts)
    if n_min == 0:
        raise ValueError("a problem has no samples")
    ks = default_ks(n_min) if ks is None else sorted(set(ks))
    if ks and not 1 <= ks[0] <= ks[-1] <= n_min:
        raise ValueError(f"ks={ks} must lie in [1, {n_min}] (the smallest per-problem sample count)")
    pass1, pass1_se = pass1_mean([r["correct"] for r in per_problem])
    summary: dict[str, Any] = {
        "num_problems": len(per_problem),
        "samples_per_problem": n_min if n_min == max(counts) else [n_min, max(counts)],
        "pass@1": pass1,
        "pass@1_stderr": pass1_se,
    }
    for k in ks:
        if k == 1:
            continue
        values = [pass_at_k(len(r["correct"]), int(sum(r["correct"])), k) for r in per_problem]
        summary[f"pass@{k}"], summary[f"pass@{k}_stderr"] = float(np.mean(values)), _stderr(values)
    if all("extracted" in r for r in per_problem):
        for k in ks:
            values = [cons_at_k(r["extracted"], r["correct"], k) for r in per_problem]
            summary[f"cons@{k}"], summary[f"cons@{k}_stderr"] = float(np.mean(values)), _stderr(values)
        answered = [a is not None for r in per_problem for a in r["extracted"]]
        summary["answer_rate"] = float(np.mean(answered))
    if all("lengths" in r for r in per_problem):
        lengths = [x for r in per_problem for x in r["lengths"]]
        summary["mean_length"] = float(np.mean(lengths))
    errors = sum(r.get("grader_errors", 0) for r in per_problem)
    if errors:
        summary["grader_errors"] = errors
    return summary


# ---------------------------------------------------------------------------------------------
# Reports


def write_results_jsonl(path: str | os.PathLike, per_problem: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON object per problem (UTF-8, non-ASCII kept); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in per_problem:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _metric_columns(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    def order(key: str) -> tuple[int, int]:
        name, _, k = key.partition("@")
        return ({"pass": 0, "cons": 1}[name], int(k))

    keys = {key for s in summaries.values() for key in s if "@" in key and not key.endswith("_stderr")}
    return sorted(keys, key=order)


def summary_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table: one row per benchmark, metrics in percent as "mean ± stderr"."""
    columns = _metric_columns(summaries)
    extra = [c for c in ("mean_length", "answer_rate") if any(c in s for s in summaries.values())]
    header = ["benchmark", "problems", "samples", *columns, *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, s in summaries.items():
        cells = [name, str(s.get("num_problems", "")), str(s.get("samples_per_problem", ""))]
        for c in columns:
            if c not in s:
                cells.append("")
                continue
            se = s.get(f"{c}_stderr", float("nan"))
            cells.append(f"{100 * s[c]:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}"))
        if "mean_length" in extra:
            cells.append(f"{s['mean_length']:.1f}" if "mean_length" in s else "")
        if "answer_rate" in extra:
            cells.append(f"{100 * s['answer_rate']:.1f}" if "answer_rate" in s else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary_markdown(
    path: str | os.PathLike, summaries: Mapping[str, Mapping[str, Any]], *, title: str | None = None
) -> Path:
    """`summary_table` (under an optional `# title`) written to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = summary_table(summaries)
    path.write_text((f"# {title}\n\n" if title else "") + text, encoding="utf-8")
    return path



def sample_completions(
    graphdef,
    params,
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    template: str,
    k: int,
    sampling,
    key,
    prompts_per_batch: int = 64,
    mesh=None,
) -> tuple[list[list[str]], list[list[int]]]:
    """k completions per record (texts, cut before the stop token) and their lengths in tokens.

    With a mesh over several processes (hosts), every process passes all the records: each samples
    a contiguous share of every batch and all of them get every completion back, so they grade and
    summarise alike. One process sampling the same batches on the same mesh draws the same tokens
    when the share sizes are powers of two (the sampler's buckets then place the rows alike).
    """
    import jax

    from r1jax.sampling import sample_groups
    from r1jax.sharding import gather_processes
    from r1jax.trainers.rl import decode_completions

    processes = jax.process_count() if mesh is not None else 1
    texts: list[list[str]] = []
    lengths: list[list[int]] = []
    for start in range(0, len(records), prompts_per_batch):
        chunk = records[start:start + prompts_per_batch]
        ids = [prompt_ids(r, tokenizer, template) for r in chunk]
        share = -(-len(ids) // processes)  # every process samples as many prompts: the last repeats one
        ids += ids[-1:] * (share * processes - len(ids))
        mine = ids[share * jax.process_index(): share * (jax.process_index() + 1)] if processes > 1 else ids
        out = sample_groups(graphdef, params, mine, k, jax.random.fold_in(key, start), sampling, mesh=mesh)
        rows = (np.asarray(out.tokens), np.asarray(out.lengths))
        tokens, n = gather_processes(rows) if processes > 1 else rows
        decoded = decode_completions(out._replace(tokens=tokens, lengths=n), tokenizer.decode, sampling.eos_ids)
        n = n.tolist()
        texts.extend(decoded[i * k:(i + 1) * k] for i in range(len(chunk)))
        lengths.extend(n[i * k:(i + 1) * k] for i in range(len(chunk)))
    return texts, lengths


def prompt_ids(record: dict[str, Any], tokenizer, template: str) -> list[int]:
    """The token ids `sample_completions` prompts with for `record`'s question."""
    from r1jax.data.templates import format_prompt

    return tokenizer.encode(format_prompt(template, record["question"], tokenizer=tokenizer), add_bos=True)


def evaluate_model(graphdef, params, records, tokenizer, *, template, k, sampling, key, grader=None, mesh=None,
                   prompts_per_batch: int = 64) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """R1's protocol on `records`: k samples each → (summary, per-problem results)."""
    from r1jax.rewards import accuracy_reward
    from r1jax.rewards.math import voting_answer

    texts, lengths = sample_completions(graphdef, params, records, tokenizer, template=template, k=k,
                                        sampling=sampling, key=key, prompts_per_batch=prompts_per_batch, mesh=mesh)
    per_problem = evaluate_completions(records, texts, grader or grader_from_reward(accuracy_reward),
                                       extract_answer=voting_answer,
                                       lengths_per_problem=lengths)
    return summarize(per_problem), per_problem


# ---------------------------------------------------------------------------------------------
# python -m r1jax.evaluate

RUN_CONFIG = "config.json"  # the run's full config, written into the workdir by `r1jax.pipeline`


def load_policy(checkpoint: str | os.PathLike | None, workdir: str | os.PathLike | None):
    """(model, tokenizer, run config or None, mesh) for an HF folder or a stage's `final` params in a workdir.

    An HF folder (config.json + *.safetensors) brings its own tokenizer. Otherwise the workdir's
    `config.json` rebuilds the run (tokenizer, model shape, mesh) and `checkpoint` (default: the last
    configured stage's `final`) supplies the parameters.
    """
    from ml_collections import ConfigDict

    from r1jax.data.tokenizer import load_hf_tokenizer
    from r1jax.model import load_hf
    from r1jax.pipeline import RunContext, stage_names

    if checkpoint is not None and (Path(checkpoint) / "config.json").exists() and any(
            Path(checkpoint).glob("*.safetensors")):
        return load_hf(checkpoint), load_hf_tokenizer(checkpoint), None, None
    if workdir is None:
        raise ValueError(f"--checkpoint={checkpoint} is not an HF folder: pass --workdir (the training run's) too")
    path = Path(workdir) / RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --workdir must be a run of `python -m r1jax.train`")
    config = ConfigDict(json.loads(path.read_text()))
    ctx = RunContext(config, Path(workdir))
    if checkpoint is None:
        checkpoint = Path(workdir) / stage_names(config)[-1] / "final"
    return ctx.model_from(Path(checkpoint)), ctx.tokenizer, config, ctx.mesh


def _benchmark_records(name: str, config, limit: int | None, data_dir: str | None) -> list[dict[str, Any]]:
    from r1jax.data import benchmarks, synthetic
    from r1jax.pipeline import RunContext

    if not name.startswith("synthetic"):
        return benchmarks.load_benchmark(name, limit=limit, data_dir=data_dir)
    spec, seed, size = synthetic.TaskSpec(), 0, 500
    if config is not None:  # the run's task and held-out split
        spec, seed, size = RunContext(config, Path(".")).task_spec, config.seed, config.data.eval_size
    return benchmarks.load_benchmark(name, limit=limit, synthetic_spec=spec, synthetic_size=limit or size, seed=seed)


def _stage_template(config, workdir: str | None, checkpoint: str | None) -> str:
    """The prompt template of the evaluated checkpoint's stage: what it trained and was evaluated with, as
    its manifest records it (the R1 and distillation stages: R1's format), else the run's data.template."""
    from r1jax.pipeline import StageManifest, stage_names

    manifest = StageManifest.read(Path(checkpoint).parent if checkpoint else Path(workdir) / stage_names(config)[-1])
    return (manifest.metrics.get("eval/template") if manifest is not None else None) or config.data.template


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """`python -m r1jax.evaluate --workdir runs/r1zero [--checkpoint DIR] --benchmark synthetic,math500 …`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m r1jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a stage's `final` folder (default: the run's last stage) or an HF folder")
    parser.add_argument("--workdir", help="the training run's workdir (its config.json and tokenizer)")
    parser.add_argument("--benchmark", default="synthetic",
                        help="comma-separated: synthetic[:countdown], gsm8k, math500, aime24, amc23, a .jsonl path")
    parser.add_argument("--data_dir", default=None, help="where gsm8k.jsonl & co. live (default $R1JAX_DATA_DIR)")
    parser.add_argument("--template", default=None, help="prompt template (default: the run's, else r1_zero)")
    parser.add_argument("--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's eval setting, else 1024")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--prompts_per_batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for <benchmark>.jsonl (per problem) and summary.md")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from r1jax.rewards import accuracy_reward, countdown_reward
    from r1jax.sampling import SamplingConfig

    model, tokenizer, config, mesh = load_policy(args.checkpoint, args.workdir)
    graphdef, params = nnx.split(model)
    template = args.template or (_stage_template(config, args.workdir, args.checkpoint) if config is not None
                                 else "r1_zero")
    max_new = args.max_new_tokens or (config.eval.max_new_tokens if config is not None else 1024)
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                              eos_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    benchmarks = {name: _benchmark_records(name, config, args.limit, args.data_dir)
                  for name in [b.strip() for b in args.benchmark.split(",") if b.strip()]}
    positions = model.cfg.max_position_embeddings
    for name, records in benchmarks.items():  # before any sampling: a later benchmark's error loses nothing
        longest = max((len(prompt_ids(r, tokenizer, template)) for r in records), default=0)
        if longest + max_new > positions:
            raise ValueError(f"--benchmark {name}: its longest prompt ({longest} tokens) + max_new_tokens={max_new} "
                             f"exceeds the model's max_position_embeddings={positions}; nothing was sampled (pass a "
                             "smaller --max_new_tokens or leave the benchmark out)")
    summaries = {}
    for name, records in benchmarks.items():
        countdown = records and str(records[0].get("source", "")).startswith("synthetic-countdown")
        reward = countdown_reward if countdown else accuracy_reward
        summary, per_problem = evaluate_model(
            graphdef, params, records, tokenizer, template=template, k=args.k, sampling=sampling,
            key=jax.random.key(args.seed), grader=grader_from_reward(reward), mesh=mesh,
            prompts_per_batch=args.prompts_per_batch)
        summaries[name] = summary
        if args.out:
            write_results_jsonl(Path(args.out) / f"{Path(name).stem.replace(':', '_')}.jsonl", per_problem)
    if args.out:
        write_summary_markdown(Path(args.out) / "summary.md", summaries,
                               title=f"{args.checkpoint or args.workdir}: k={args.k}, T={args.temperature}, "
                                     f"top-p={args.top_p}")
    print(summary_table(summaries), flush=True)
    return summaries


if __name__ == "__main__":
    from r1jax.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()  # with R1JAX_HUGE_PAGES=1 (r1jax/hugepages.py)
    main()
