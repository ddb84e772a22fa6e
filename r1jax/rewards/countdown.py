"""Countdown reward (TinyZero): reach `target` with +, -, *, / over `numbers`, each used exactly once.

Scores follow TinyZero: 0.0 when the completion has no `<answer>…</answer>`, 0.1 when it has one
that is malformed, uses the numbers wrongly or misses the target, 1.0 when it is right.

The equation is untrusted text, so it is never `eval`ed: `ast.parse` (after a length bound, since
the parser itself recurses) and a walk that admits only integer literals, + - * / and unary minus
(parentheses are structure), evaluated in exact `Fraction` arithmetic with a node-count bound.
An answer may be written `expr` or `expr = target`.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

_NUMBER = re.compile(r"[-+]?\d{1,24}(?:\.\d{1,24})?(?:/(\d{1,24}))?")  # 24, 1.5, 3/4: no exponent

MAX_EXPRESSION_CHARS = 256
MAX_NODES = 64
MAX_LITERAL = 10**6
NO_ANSWER, WRONG, CORRECT = 0.0, 0.1, 1.0

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class UnsafeExpression(ValueError):
    """The expression has something other than integers, + - * / and parentheses, or is too big."""


def _walk(node: ast.AST, literals: list[int], budget: list[int]) -> Fraction:
    budget[0] -= 1
    if budget[0] < 0:
        raise UnsafeExpression(f"more than {MAX_NODES} nodes")
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_LITERAL:
            raise UnsafeExpression(f"literal {value!r:.40} is not a small integer")
        literals.append(value)
        return Fraction(value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _walk(node.left, literals, budget)
        right = _walk(node.right, literals, budget)
        if isinstance(node.op, ast.Div) and right == 0:
            raise UnsafeExpression("division by zero")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_walk(node.operand, literals, budget)
    raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    Raises UnsafeExpression (a ValueError) for anything outside the grammar or the size bounds.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UnsafeExpression(f"not an expression: {type(e).__name__}") from None
    literals: list[int] = []
    return _walk(tree.body, literals, [MAX_NODES]), literals


def _last_answer(completion: str) -> str | None:
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>") : end]


def score_countdown(completion: str, target: int, numbers: Sequence[int]) -> float:
    """TinyZero's score of one completion (see the module docstring)."""
    if not isinstance(completion, str):
        return NO_ANSWER
    equation = _last_answer(completion)
    if equation is None:
        return NO_ANSWER
    equation = equation.strip()
    if equation.count("=") == 1:
        equation, _, rhs = equation.partition("=")
        # a plain number only: Fraction also reads exponents, and "1e999999999" builds that power of ten
        claimed = _NUMBER.fullmatch(rhs.strip())
        try:  # ("1.5/2" matches the pattern and is no Fraction)
            if claimed is None or int(claimed.group(1) or 1) == 0 or Fraction(claimed.group(0)) != Fraction(target):
                return WRONG
        except ValueError:
            return WRONG
    try:
        value, literals = evaluate_expression(equation)
    except UnsafeExpression:
        return WRONG
    if sorted(literals) != sorted(int(x) for x in numbers):
        return WRONG
    return CORRECT if value == Fraction(target) else WRONG


def countdown_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target: Sequence[int],
    numbers: Sequence[Sequence[int]],
    **_: Any,
) -> list[float | None]:
    """0.0 no answer / 0.1 malformed or wrong / 1.0 correct, per completion (TinyZero's scoring)."""
    n = len(completions)
    if len(target) != n or len(numbers) != n:
        raise ValueError(f"target has {len(target)} entries, numbers {len(numbers)}, completions {n}")
    return [score_countdown(c, t, nums) for c, t, nums in zip(completions, target, numbers, strict=True)]
