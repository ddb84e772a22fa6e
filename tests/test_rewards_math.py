"""Math answers: extraction, grading, timeouts off the main thread, adversarial input, real golds."""

import json
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from r1jax.rewards import accuracy_reward, extract_answer, grade, normalize_answer

DATA_DIR = Path(os.environ.get("R1JAX_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))

# --------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer>42</answer>", "42"),
        ("<answer>1</answer> then <answer> 2 </answer>", "2"),  # the last one
        ("<answer>so \\boxed{7}</answer>", "7"),  # a box inside the answer wins
        ("<answer>3</answer> but \\boxed{4}", "3"),  # answer tags come first
        ("<answer>unclosed", None),
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{ {a}^{b_{c}} }", "{a}^{b_{c}}"),  # last box, nested braces
        ("\\fbox{12}", "12"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not groups
        ("$\\boxed 5$", "5"),
        ("\\boxed{}", None),
        ("\\boxed{1} then \\boxed{2", None),  # the last box is unclosed
        ("She makes 9 * 2 = 18.\n#### 18", "18"),
        ("#### 1,000\nextra line", "1,000"),
        ("no marker at all 42", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_adversarial_is_linear():
    start = time.monotonic()
    # rfind finds the innermost of nested boxes, as MATH's `last_boxed_only_string` does.
    assert extract_answer("\\boxed{" * 10_000 + "1" + "}" * 10_000) == "1"
    assert extract_answer("\\fbox{" + "{" * 10_000 + "1" + "}" * 10_001) == "{" * 10_000 + "1" + "}" * 10_000
    assert extract_answer("\\boxed{" * 10_000) is None
    assert extract_answer("{" * 10_000 + "\\boxed{" + "x" * 1_000_000) is None
    assert extract_answer("a" * 1_000_000 + "<answer>5</answer>") == "5"
    assert extract_answer("<answer>" * 200_000 + "</answer>") is None
    assert extract_answer("####" * 200_000) is None
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------------------------
# Grading


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("18", "18"),
        ("1,000", "1000"),
        ("\\$18.00", "18"),
        ("18 dollars", "18"),
        ("50\\%", "50"),
        ("\\frac{1}{2}", "50\\%"),  # the normal form drops %: math-verify decides
        ("3/20", "15%"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("\\text{(C)}", "C"),
        ("\\textbf{(073)}", "073"),
        ("76^\\circ", "76"),
        ("2\\sqrt{2}", "\\sqrt{8}"),  # needs sympy
        ("6 - 5i", "-5i + 6"),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("[-2, 7]", "x \\in [-2,7]"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_grade_equal(prediction, gold):
    assert grade(prediction, gold)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("17", "18"),
        ("1,001", "1000"),
        ("0.51", "\\frac{1}{2}"),
        ("\\frac{1}{3}", "50\\%"),
        ("2\\sqrt{3}", "\\sqrt{8}"),
        ("6 + 5i", "6 - 5i"),
        ("(3, 1)", "(1, 3)"),
        ("\\text{(B)}", "C"),
        ("", "1"),
        ("1", ""),
        (None, "1"),
    ],
)
def test_grade_not_equal(prediction, gold):
    assert not grade(prediction, gold)


def test_normalize_answer():
    assert normalize_answer("\\$1,234.50") == "1234.5"
    assert normalize_answer(" \\text{ 12 cm}. ") == "12"
    assert normalize_answer("\\left(1, 2\\right)") == "(1,2)"
    assert normalize_answer("-.5") == "-0.5"


def _in_thread(fn, *args, **kwargs):
    out = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: B036 - the test reports whatever escaped
            out["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    return out["value"]


def test_grade_off_the_main_thread():
    # math-verify's signal.alarm raises ValueError outside the main thread; ours must not.
    assert _in_thread(grade, "2\\sqrt{2}", "\\sqrt{8}") is True
    assert _in_thread(grade, "2\\sqrt{3}", "\\sqrt{8}") is False
    assert _in_thread(accuracy_reward, ["q"], ["\\boxed{\\sqrt{8}}"], answer=["2\\sqrt{2}"]) == [1.0]


@pytest.mark.parametrize("where", ["main", "thread"])
def test_grade_timeout_bounds_a_hard_comparison(where):
    # 10^(10^10) is a sympy power that takes minutes to compare against 5.
    timeout = 1.0
    call = (lambda: grade("10^{10^{10}}", "5", timeout=timeout)) if where == "main" else (
        lambda: _in_thread(grade, "10^{10^{10}}", "5", timeout=timeout))
    call()  # the first call off the main thread starts the helper process; not what we time
    start = time.monotonic()
    assert call() is False
    assert time.monotonic() - start < timeout + 10  # the bound held (generous slack for a busy CI box)


def test_grade_adversarial_inputs_bounded():
    start = time.monotonic()
    huge = "1" * 1_000_000
    assert grade(huge, "1") is False
    assert grade("{" * 10_000 + "1" + "}" * 10_000, "1", timeout=2) is False
    assert grade("\\frac{" * 5_000, "1", timeout=2) is False
    completions = [
        "x" * 1_000_000,
        "\\boxed{" * 10_000 + "1" + "}" * 10_000,
        "the answer is \\boxed{42",
        "<answer>" + "9" * 1_000_000 + "</answer>",
        "\\boxed{" + "(" * 5_000 + "1" + ")" * 5_000 + "}",
        "\\boxed{(10^{8})!}",  # sympy would compute this for minutes
        "\\boxed{2^{2^{30}}}",
    ]
    scores = accuracy_reward(["q"] * 7, completions, answer=["42"] * 7, timeout=2)
    assert scores == [0.0] * 7
    assert time.monotonic() - start < 60


def test_accuracy_reward_fields():
    completions = ["<answer>27</answer>", "\\boxed{27}", "#### 27", "27", "\\boxed{26}", "\\boxed{27}"]
    golds = [27.0, "27", 27, "27", "27", None]
    assert accuracy_reward(["q"] * 6, completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, None]
    assert accuracy_reward(["q"], ["27"], answer=["27"], require_marker=True) == [0.0]
    numpy_golds = [np.int64(27), np.float32(27.0), np.int32(26), np.bool_(True)]  # a column of a NumPy batch
    assert accuracy_reward(["q"] * 4, ["\\boxed{27}"] * 4, answer=numpy_golds) == [1.0, 1.0, 0.0, None]
    assert accuracy_reward(["q"], ["Janet gets 18.\n#### 18"], answer=["She gets $18.\n#### 18"]) == [1.0]
    with pytest.raises(ValueError, match="answer has 1 entries"):
        accuracy_reward(["q", "q"], ["1", "2"], answer=["1"])


# --------------------------------------------------------------------------------------------
# Real benchmark files: each file's own gold solution against its answer, and shuffled answers.


def _rows(name):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    with open(path) as f:
        return [json.loads(line) for line in f]


def _pairs(name):
    """(gold-written text, gold answer) per problem, as each file provides them."""
    if name == "math500.jsonl":
        return [(r["solution"], r["answer"]) for r in _rows(name)]
    if name.startswith("gsm8k"):
        return [(r["answer"], r["answer"].rsplit("####", 1)[1].strip()) for r in _rows(name)]
    if name == "aime24.jsonl":
        return [(r["solution"], str(r["answer"])) for r in _rows(name)]
    if name == "amc23.jsonl":  # no solutions: the answer, written as a model would box it
        return [(f"\\boxed{{{r['answer']:g}}}", r["answer"]) for r in _rows(name)]
    raise ValueError(name)


def _derangement(n, seed=0):
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(i != p for i, p in enumerate(perm)):
            return perm


@pytest.mark.parametrize(
    "name",
    ["math500.jsonl", "gsm8k_test.jsonl", "gsm8k_train.jsonl", "aime24.jsonl", "amc23.jsonl"],
)
def test_real_gold_grades_correct_and_shuffled_wrong(name):
    pairs = _pairs(name)
    texts = [t for t, _ in pairs]
    golds = [g for _, g in pairs]
    own = accuracy_reward([""] * len(pairs), texts, answer=golds)
    misses = [(extract_answer(t), g) for t, g, s in zip(texts, golds, own, strict=True) if not s]
    assert sum(own) / len(own) >= 0.99, misses
    perm = _derangement(len(pairs))
    shuffled_golds = [golds[p] for p in perm]
    shuffled = accuracy_reward([""] * len(pairs), texts, answer=shuffled_golds)
    # Problems that happen to share an answer string ("7" and "7") are rightly graded equal; the
    # false-positive rate is measured on the pairs whose answers differ as written.
    differ = [i for i in range(len(pairs)) if str(golds[i]).strip() != str(shuffled_golds[i]).strip()]
    assert all(shuffled[i] == 1.0 for i in range(len(pairs)) if i not in set(differ))
    false_positive = sum(shuffled[i] for i in differ) / len(differ)
    wrongly_equal = [(extract_answer(texts[i]), shuffled_golds[i]) for i in differ if shuffled[i]]
    assert false_positive <= 0.02, wrongly_equal
