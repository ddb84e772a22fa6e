"""Evaluation metrics against brute-force enumeration; grading real gold solutions."""

import itertools
import json
import math
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from r1jax.evaluate import (
    cons_at_k,
    evaluate_completions,
    grader_from_reward,
    pass1_mean,
    pass_at_k,
    summarize,
    summary_table,
    write_results_jsonl,
    write_summary_markdown,
)

DATA_DIR = Path(os.environ.get("R1JAX_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


def brute_pass_at_k(correct, k):
    subsets = list(itertools.combinations(correct, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def brute_cons_at_k(answers, correct, k):
    """Mean over all k-subsets of the majority vote's correctness; r/t for a t-way tie with r correct."""
    verdict = {a: ok for a, ok in zip(answers, correct, strict=True) if a is not None}
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(answers)), k))
    for subset in subsets:
        votes = {}
        for i in subset:
            if answers[i] is not None:
                votes[answers[i]] = votes.get(answers[i], 0) + 1
        if votes:
            top = max(votes.values())
            tied = [a for a, v in votes.items() if v == top]
            total += Fraction(sum(verdict[a] for a in tied), len(tied))
    return total / len(subsets)


@pytest.mark.parametrize("correct", [[1, 0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1], [0, 1, 0, 0, 0, 0, 0, 1], [1]])
def test_pass_at_k_matches_enumeration(correct):
    n, c = len(correct), sum(correct)
    for k in range(1, n + 1):
        assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(correct, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows float64; the product form does not.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


HAND_MADE = [
    (["7", "7", "3", None, "7"], "7"),  # clear majority
    (["1", "2", "1", "2", "3"], "1"),  # 2-way tie at the top
    (["a", "b", "c", "d"], "c"),  # all singletons: the tie rule decides everything
    ([None, None, "x", "y", "y", "x"], "y"),  # no-answers never vote
    (["5", "5", "6", "6", "6", "5", "4"], "4"),  # the gold is a minority answer
]


@pytest.mark.parametrize("answers, gold", HAND_MADE)
def test_cons_at_k_matches_enumeration(answers, gold):
    correct = [a == gold for a in answers]
    for k in range(1, len(answers) + 1):
        expected = float(brute_cons_at_k(answers, correct, k))
        assert cons_at_k(answers, correct, k) == pytest.approx(expected, abs=1e-12)
        assert cons_at_k(answers, lambda a: a == gold, k) == pytest.approx(expected, abs=1e-12)


def test_cons_at_k_random_cases_and_several_correct_answers():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 8)
        answers = [rng.choice(["1/2", "0.5", "3", "4", None]) for _ in range(n)]
        correct = [a in ("1/2", "0.5") for a in answers]  # two spellings of one correct answer
        k = rng.randint(1, n)
        assert cons_at_k(answers, correct, k) == pytest.approx(float(brute_cons_at_k(answers, correct, k)))
    assert cons_at_k(["1", "2"], [True, False]) == 0.5  # documented tie rule at k = n
    # The grader judged two samples with one extracted answer differently: the answer earns its share.
    assert cons_at_k(["1", "1", "1", "2"], [True, False, True, False]) == pytest.approx(2 / 3)


def test_pass1_mean_and_stderr():
    mean, se = pass1_mean([[1, 0, 0, 1], [1, 1], [0, 0, 0]])
    per_problem = np.array([0.5, 1.0, 0.0])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(per_problem.std(ddof=1) / math.sqrt(3))
    assert math.isnan(pass1_mean([[1, 0]])[1])


def _grader(completions, record):
    return [c.strip().endswith(record["answer"]) for c in completions]


def test_majority_vote_counts_one_answer_written_several_ways_once():
    """The model evaluation's voting answers: "18", "\\$18" and "18.00" are one answer (3 + 1 votes against
    20's 3: cons@7 = 1); by the raw strings 20 led with 3 votes to 2."""
    from r1jax.rewards import accuracy_reward
    from r1jax.rewards.math import vote_key, voting_answer

    boxed = ["18", "18", "\\$18", "18.00", "20", "20", "20"]
    completions = [[f"so \\boxed{{{b}}}" for b in boxed]]
    results = evaluate_completions([{"id": "a", "question": "q", "answer": "18"}], completions,
                                   grader_from_reward(accuracy_reward), extract_answer=voting_answer)
    assert results[0]["num_correct"] == 4 and summarize(results)["cons@7"] == 1.0
    assert vote_key("\\frac{1}{2}") == vote_key("0.5") == vote_key("1/2") and vote_key(None) is None


def test_evaluate_completions_summary_and_writers(tmp_path):
    records = [{"id": "a", "question": "1+1", "answer": "2"}, {"id": "b", "question": "2+2", "answer": "4"}]
    completions = [["so 2", "so 3", "so 2", "so 2"], ["so 5", "so 4", "so 5", "so 9"]]
    results = evaluate_completions(
        records,
        completions,
        _grader,
        extract_answer=lambda c: c.split()[-1],
        lengths_per_problem=[[2] * 4, [4] * 4],
    )
    assert [r["num_correct"] for r in results] == [3, 1] and results[1]["extracted"] == ["5", "4", "5", "9"]
    summary = summarize(results)
    assert summary["num_problems"] == 2 and summary["samples_per_problem"] == 4
    assert summary["pass@1"] == pytest.approx((0.75 + 0.25) / 2)
    assert summary["pass@2"] == pytest.approx((pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2)) / 2)
    assert summary["pass@4"] == 1.0 and summary["cons@4"] == pytest.approx(0.5)
    assert summary["mean_length"] == 3.0 and summary["answer_rate"] == 1.0

    path = write_results_jsonl(tmp_path / "out" / "results.jsonl", results)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b"]
    table = summary_table({"toy": summary})
    header = table.splitlines()[0]
    assert header.startswith("| benchmark | problems | samples | pass@1 | pass@2 | pass@4 | cons@1 |")
    assert "| toy | 2 | 4 | 50.0 ± 25.0 |" in table
    md = write_summary_markdown(tmp_path / "summary.md", {"toy": summary}, title="Eval")
    assert md.read_text().startswith("# Eval\n\n| benchmark")


def test_a_failing_grader_costs_scores_not_the_run():
    def broken(completions, record):
        raise RuntimeError("sympy exploded")

    [result] = evaluate_completions([{"id": "x", "question": "q", "answer": "1"}], [["1", "2"]], broken)
    assert result["correct"] == [False, False] and result["grader_errors"] == 2
    assert "sympy exploded" in result["grader_exception"]
    with pytest.raises(ValueError, match="completion lists"):
        evaluate_completions([{"question": "q"}], [], broken)


def test_synthetic_gold_traces_score_full_marks():
    from r1jax.data import synthetic

    records = synthetic.generate("test", 30, seed=0)
    traces = [[synthetic.solution_trace(r)] * 2 for r in records]
    results = evaluate_completions(records, traces, _grader_from_answer_tag)
    assert summarize(results)["pass@1"] == 1.0


def _grader_from_answer_tag(completions, record):
    from r1jax.data.templates import parse_r1_zero

    return [(parse_r1_zero(c) or ("", None))[1] == record["answer"] for c in completions]


@pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").exists(), reason=f"no data in {DATA_DIR}")
def test_math500_gold_solutions_as_model_outputs():
    try:
        from r1jax.rewards import accuracy_reward, extract_answer
    except ImportError:
        pytest.skip("r1jax.rewards (accuracy_reward, extract_answer) not available yet")
    from r1jax.data.benchmarks import load_benchmark

    records = load_benchmark(DATA_DIR / "math500.jsonl")
    results = evaluate_completions(
        records,
        [[r["solution"]] for r in records],
        grader_from_reward(accuracy_reward),
        extract_answer=extract_answer,
    )
    summary = summarize(results)
    assert summary["num_problems"] == 500 and summary.get("grader_errors", 0) == 0
    assert summary["pass@1"] >= 0.99, [r["id"] for r in results if not r["correct"][0]]


def test_the_cli_prompts_a_stage_as_it_was_trained_and_draws_the_runs_own_task(tmp_path):
    """`python -m r1jax.evaluate --workdir`: an R1 or distillation stage's model gets R1's template (its
    manifest records it), a stage without one the run's data.template; `--benchmark synthetic` is the
    run's task (countdown here), not arithmetic."""
    from configs import r1
    from r1jax.evaluate import _benchmark_records, _stage_template
    from r1jax.pipeline import StageManifest

    config = r1.get_config()
    StageManifest("rl_all", status="done", metrics={"eval/template": "r1"}).write(tmp_path / "rl_all")
    StageManifest("pretrain", status="done").write(tmp_path / "pretrain")
    assert _stage_template(config, str(tmp_path), None) == "r1" != config.data.template  # the last stage
    assert _stage_template(config, str(tmp_path), str(tmp_path / "pretrain" / "final")) == config.data.template

    config.data.train = "synthetic:countdown"
    records = _benchmark_records("synthetic", config, 3, None)
    assert [r["source"] for r in records] == ["synthetic-countdown-test"] * 3
