"""Code reward: run the completion's program against the example's tests in the sandbox.

Reward = fraction of tests passed. Tests come in two shapes (or as a JSON string of either):
- assert statements, e.g. `["assert add(1, 2) == 3", ...]`: one sandboxed run executes the program,
  then each test in the program's namespace; a timeout keeps the tests that already reported; a
  program that crashes at top level fails them all. `assert EXPR == LITERAL` (either side; the
  common form) is judged here, not in the sandbox: the sandbox evaluates EXPR alone and reports an
  equal value of builtin literal types if it has one (a Counter as a dict, a namedtuple as a tuple,
  a NumPy scalar or Fraction as the int or float it equals exactly, a frozenset as a set; see the
  launcher's `_plain`), which must equal LITERAL. The program never sees the expected value, so it
  cannot forge a pass (a program runs in the process that reports its results: it could rebind the
  builtins or read the result channel's nonce from its caller's frame), and an object whose `__eq__`
  is its own (one that always says True) has no plain equivalent. Other statements run in the
  sandbox and pass if they raise nothing (forgeable by a program that sets out to);
- stdin/stdout cases, e.g. `[{"input": "1 2\\n", "output": "3\\n"}, ...]`: one sandboxed run per case;
  outputs compare equal after stripping trailing whitespace on each line and trailing blank lines.

Isolation is `r1jax.rewards.sandbox`'s; see its docstring for what each machine enforces. In
short: as root with `unshare` (this project's containers), no network (empty network namespace),
a pid namespace, RLIMIT_NPROC/AS/CPU/FSIZE, uid nobody, and every mount but the temp dir read-only;
elsewhere weaker, and `sandbox_mode()` says which.

The program is the last ```python fenced block, else the last fenced block, else the whole
completion.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from r1jax.rewards.sandbox import SandboxLimits, run_sandboxed

MAX_PROGRAM_CHARS = 100_000
MAX_TESTS = 256


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of each complete ``` fenced block, in order; a linear scan."""
    blocks = []
    pos = 0
    while True:
        start = text.find("```", pos)
        if start < 0:
            return blocks
        line_end = text.find("\n", start)
        if line_end < 0:
            return blocks
        end = text.find("```", line_end)
        if end < 0:
            return blocks
        blocks.append((text[start + 3 : line_end].strip().lower(), text[line_end + 1 : end]))
        pos = end + 3


def extract_program(completion: str) -> str:
    """The last ```python (or ```py / ```python3) block, else the last fenced block, else the text."""
    blocks = _fenced_blocks(completion)
    python = [body for info, body in blocks if info in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def _parse_tests(tests: Any) -> list[str] | list[Mapping[str, str]]:
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, Mapping) and "inputs" in tests and "outputs" in tests:  # APPS layout
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"tests must be a non-empty list of assert strings or input/output dicts, "
                         f"got {tests!r:.200}")
    if all(isinstance(t, str) for t in tests):
        return tests
    if all(isinstance(t, Mapping) and "input" in t and "output" in t for t in tests):
        return tests
    raise ValueError(f"mixed or malformed tests: {tests!r:.200}")


_NO_VALUE = object()


def _split_assert(test: str) -> tuple[str, Any]:
    """(expression, expected value) of `assert EXPR == LITERAL` (or `LITERAL == EXPR`), else (test, _NO_VALUE)."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return test, _NO_VALUE
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return test, _NO_VALUE
    check = tree.body[0].test
    if not (isinstance(check, ast.Compare) and len(check.ops) == 1 and isinstance(check.ops[0], ast.Eq)):
        return test, _NO_VALUE
    for expression, literal in ((check.left, check.comparators[0]), (check.comparators[0], check.left)):
        try:
            return ast.unparse(expression), ast.literal_eval(literal)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
    return test, _NO_VALUE


class _Infinities(ast.NodeTransformer):
    """repr writes an infinity as the name `inf` (`infj` in a complex): the only names read back, as values."""

    VALUES = {"inf": math.inf, "infj": complex(0, math.inf)}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(self.VALUES[node.id]) if node.id in self.VALUES else node


def _read_value(reported: str) -> Any:
    """The value of a repr the sandbox reported, read as a literal (never evaluated), infinities included."""
    return ast.literal_eval(_Infinities().visit(ast.parse(reported.lstrip(" \t"), mode="eval")))


def _equals(reported: str | None, expected: Any) -> bool:
    """Whether the repr the sandbox reported reads back to a value that `== expected` (both plain literals,
    so this is the `==` the test's assert would have run; the sandbox never reports NaN)."""
    if reported is None:
        return False
    try:
        return bool(_read_value(reported) == expected)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def score_program(program: str, tests: Any, limits: SandboxLimits | None = None,
                  mode: str | None = None) -> float | None:
    """Fraction of `tests` that `program` passes; None if `tests` is missing or malformed."""
    try:
        cases = _parse_tests(tests)
    except (ValueError, TypeError):
        return None
    cases = cases[:MAX_TESTS]
    limits = limits or SandboxLimits()
    if not program.strip() or len(program) > MAX_PROGRAM_CHARS:
        return 0.0
    if isinstance(cases[0], str):
        split = [_split_assert(t) for t in cases]
        probes = [t if expected is _NO_VALUE else {"eval": t} for t, expected in split]
        result = run_sandboxed(program, tests=probes, limits=limits, mode=mode)
        passed = [ok if expected is _NO_VALUE else ok and _equals(value, expected)
                  for (_, expected), ok, value in zip(split, result.test_passed, result.test_values, strict=True)]
        return sum(passed) / len(cases)
    passed = 0
    for case in cases:
        result = run_sandboxed(program, stdin=str(case["input"]), limits=limits, mode=mode)
        expected = _normalise_output(str(case["output"]))
        if result.exit_code == 0 and _normalise_output(result.stdout) == expected:
            passed += 1
    return passed / len(cases)


def code_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    tests: Sequence[Any],
    timeout: float = 10.0,
    memory_mb: int = 1024,
    **_: Any,
) -> list[float | None]:
    """Fraction of each example's `tests` passed by the completion's program, in [0, 1].

    `timeout` is the wall-clock (and CPU) budget of one sandboxed run, `memory_mb` its address space.
    None where the tests are missing or malformed. Runs sequentially; parallelise with `RewardPool`
    (give the pool a per-sample timeout above `timeout` times the number of stdin/stdout cases).
    """
    n = len(completions)
    if len(tests) != n:
        raise ValueError(f"tests has {len(tests)} entries, completions {n}")
    limits = SandboxLimits(timeout=timeout, cpu_seconds=max(1, int(timeout)), memory_mb=memory_mb)
    scores: list[float | None] = []
    for completion, example_tests in zip(completions, tests, strict=True):
        if not isinstance(completion, str):
            scores.append(0.0)
            continue
        scores.append(score_program(extract_program(completion), example_tests, limits))
    return scores
