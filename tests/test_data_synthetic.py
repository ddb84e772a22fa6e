"""The synthetic task: determinism, split disjointness, and worked solutions that recompute."""

import ast
import operator
import random
import re

import pytest

from r1jax.data import synthetic
from r1jax.data.templates import R1_ZERO_PROMPT, parse_cold_start, parse_r1_zero

SPECS = [synthetic.TaskSpec(), synthetic.TaskSpec(task="countdown")]
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def eval_infix(text: str) -> tuple[int, list[int]]:
    """Value and operands of an infix expression over + - * (a reference independent of the generator)."""
    operands = []

    def walk(node):
        if isinstance(node, ast.Constant):
            operands.append(node.value)
            return node.value
        return _BINOPS[type(node.op)](walk(node.left), walk(node.right))

    return walk(ast.parse(text, mode="eval").body), operands


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.task)
def test_generate_is_deterministic_and_prefix_stable(spec):
    a = synthetic.generate("train", 200, seed=3, spec=spec)
    assert a == synthetic.generate("train", 200, seed=3, spec=spec)
    assert synthetic.generate("train", 50, seed=3, spec=spec) == a[:50]
    assert a != synthetic.generate("train", 200, seed=4, spec=spec)
    assert len({synthetic.problem_key(e) for e in a}) == 200


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.task)
def test_splits_never_overlap_across_seeds(spec):
    train = {synthetic.problem_key(e) for s in (0, 1) for e in synthetic.generate("train", 1500, s, spec)}
    test = {synthetic.problem_key(e) for s in (0, 1) for e in synthetic.generate("test", 300, s, spec)}
    assert train and test and not train & test
    # Countdown keys ignore number order: a permuted training problem is not a "new" test problem.
    assert all(k.startswith(f"{spec.task}:") for k in train | test)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.task)
def test_examples_and_traces_recompute(spec):
    for ex in synthetic.generate("test", 300, seed=0, spec=spec):
        steps = ex["steps"]
        assert spec.min_steps <= len(steps) <= spec.max_steps
        for i, (a, op, b, c) in enumerate(steps):
            assert _BINOPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult}[op]](a, b) == c
            assert 0 <= c <= spec.max_value and 1 <= b <= spec.max_operand
            if i:
                assert a == steps[i - 1][3]
        if spec.task == "arithmetic":
            value, operands = eval_infix(ex["question"].removeprefix("Compute "))
            assert str(value) == ex["answer"] and value == ex["target"]
            assert operands == ex["numbers"]
        else:
            value, operands = eval_infix(ex["answer"])
            assert value == ex["target"] and sorted(operands) == sorted(ex["numbers"])
            assert re.search(rf"make {ex['target']} ", ex["question"])

        reasoning, answer = parse_r1_zero(synthetic.solution_trace(ex))
        assert answer == ex["answer"]
        written = [re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", s).groups() for s in reasoning.split(", ")]
        assert [[int(a), op, int(b), int(c)] for a, op, b, c in written] == steps

        r1 = parse_cold_start(synthetic.solution_trace(ex, template="r1"))
        assert r1 is not None and r1[1] == f"The answer is \\boxed{{{ex['answer']}}}."


def test_trace_matches_the_documented_example():
    ex = {
        "task": "arithmetic",
        "answer": "32",
        "steps": [[7, "+", 5, 12], [12, "*", 3, 36], [36, "-", 4, 32]],
    }
    assert synthetic.solution_trace(ex) == "<think> 7+5=12, 12*3=36, 36-4=32 </think> <answer> 32 </answer>"
    assert synthetic._render([7, 5, 3, 4], ["+", "*", "-"], spaced=True) == "(7 + 5) * 3 - 4"


def test_language_mixing_hook():
    ex = synthetic.generate("train", 1, seed=0)[0]
    mixed = synthetic.solution_trace(ex, mix_language="zh", rng=random.Random(0))
    assert re.search(r"[\u4e00-\u9fff]", mixed) and parse_r1_zero(mixed)[1] == ex["answer"]
    assert re.search(
        r"[\u0400-\u04ff]", synthetic.solution_trace(ex, mix_language="ru", rng=random.Random(0))
    )
    with pytest.raises(ValueError, match="mix_language"):
        synthetic.solution_trace(ex, mix_language="xx")


def test_corpus_is_imperfect_by_design():
    texts = synthetic.corpus(400, seed=0, correct_fraction=0.5, mix_fraction=0.5)
    assert texts == synthetic.corpus(400, seed=0, correct_fraction=0.5, mix_fraction=0.5)
    train = {e["question"]: e for e in synthetic.generate("train", 400, 0)}
    held_out = {e["question"] for e in synthetic.generate("test", 200, 0)}
    n_correct = n_mixed = n_mixed_wrong = 0
    prefix, suffix = R1_ZERO_PROMPT.split("{question}")
    for text in texts:
        assert text.startswith(prefix)
        question, completion = text[len(prefix) :].split(suffix, 1)
        assert question in train and question not in held_out
        parsed = parse_r1_zero(completion.strip())
        correct = parsed is not None and parsed[1] == train[question]["answer"] and parsed[0]
        mixed = bool(re.search(r"[\u4e00-\u9fff]", completion))
        n_correct += bool(correct)
        n_mixed += mixed
        n_mixed_wrong += mixed and not correct
    assert 0.4 < n_correct / len(texts) < 0.75  # 0.5 correct plus lucky noise (e.g. "no_think" answers)
    assert n_mixed > 50 and n_mixed_wrong == 0  # mixing rides on correct traces only
    assert all(parse_r1_zero(t) for t in synthetic.corpus(50, seed=1, correct_fraction=1.0, template=None))


def test_spec_validation():
    with pytest.raises(ValueError, match="task"):
        synthetic.TaskSpec(task="sudoku")
    with pytest.raises(ValueError, match="distinct"):
        synthetic.generate("test", 10_000, spec=synthetic.TaskSpec(min_steps=1, max_steps=1, max_operand=3))
