"""Code reward: program extraction, both test shapes, and hostile programs in the sandbox."""

import ast
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from r1jax.rewards import SandboxLimits, code_reward, extract_program, run_sandboxed, sandbox_mode
from r1jax.rewards.sandbox import MODES

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def _fence(program: str) -> str:
    return f"<think>easy</think>\n```python\n{program}\n```"


def _score(program: str, tests, timeout: float = 5.0) -> float:
    return code_reward(["q"], [_fence(program)], tests=[tests], timeout=timeout)[0]


def test_sandbox_mode_known():
    assert sandbox_mode() in MODES


def test_extract_program():
    assert extract_program("text\n```python\nx = 1\n```\nmore\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_program("```py\na = 1\n```\n```\nplain\n```") == "a = 1\n"  # python block wins
    assert extract_program("```\nplain\n```") == "plain\n"
    assert extract_program("x = 3") == "x = 3"
    assert extract_program("```python\nunclosed") == "```python\nunclosed"


def test_assert_tests_fraction_passed():
    assert _score("def add(a, b):\n    return a + b", ADD_TESTS) == 1.0
    assert _score("def add(a, b):\n    return a + b if a > 0 else 7", ADD_TESTS) == pytest.approx(2 / 3)
    assert _score("def add(a, b):\n    raise ValueError", ADD_TESTS) == 0.0
    assert _score("this is not python", ADD_TESTS) == 0.0
    # a test that raises something other than AssertionError also just fails
    assert _score("def add(a, b):\n    return a + b", [*ADD_TESTS, "assert add(1) == 1"]) == 0.75


def test_stdin_stdout_tests_and_json_tests():
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"},
             {"input": "0 0\n", "output": "1\n"}]
    assert _score("a, b = map(int, input().split())\nprint(a + b)", cases) == pytest.approx(2 / 3)
    assert _score("import json\nprint(3)", '[{"input": "", "output": "3"}]') == 1.0  # tests as JSON text
    assert code_reward(["q"], ["x"], tests=[[]]) == [None]  # no tests: cannot judge


def test_forged_results_are_ignored():
    # Printing or writing what looks like results does not count: only the harness knows its nonce.
    program = "import os\nfor i in range(3):\n    print(f'deadbeef {i} 1')\nraise SystemExit(3)"
    assert _score(program, ADD_TESTS) == 0.0


def test_a_program_cannot_pass_equality_tests_it_does_not_solve():
    """`assert EXPR == LITERAL` is judged outside the sandbox, on EXPR's plain value: rebinding the
    builtins, forging result lines with the nonce read from the harness's frame, or returning an object
    that equals everything passes none of them. A bare statement (`assert False`) still runs inside, where
    the frame forgery reaches it: the documented limit."""
    tests = [*ADD_TESTS, "assert False", "assert [add(1, 1)] == [2]", "assert (3, 'x') == (add(1, 2), 'x')"]
    frame_forgery = ("import os, sys\nf = sys._getframe(0).f_back\nfor i in range(6):\n"
                     "    os.write(f.f_locals['results'], f\"{f.f_locals['nonce']} {i} 1\\n\".encode())\nos._exit(0)")
    programs = {
        "honest": "def add(a, b):\n    return a + b",
        "rebinds builtins": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.eval = lambda *a, **k: 3",
        "frame forgery": frame_forgery,
        "equals everything": "class A:\n    __eq__ = lambda s, o: True\n    __hash__ = None\n"
                             "def add(a, b):\n    return A()",
        "int subclass": "class I(int):\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return I(a + b)",
    }
    scores = {name: _score(program, tests) for name, program in programs.items()}
    assert scores == {"honest": 5 / 6, "rebinds builtins": 0.0, "frame forgery": 1 / 6, "equals everything": 0.0,
                      "int subclass": 0.0}, scores
    assert _score("def add(a, b):\n    return float(a + b)", ADD_TESTS) == 1.0  # 3.0 == 3, as the assert says


# (expression, literal, whether Python's own `assert EXPR == LITERAL` passes): equal values of types that
# are not exact builtins, and near misses that must stay unequal.
EQUALITY_CASES = [
    ("collections.Counter('abca')", "{'a': 2, 'b': 1, 'c': 1}", True),
    ("collections.Counter('abca')", "{'a': 2, 'b': 1}", False),
    ("collections.OrderedDict([('b', 1), ('a', 2)])", "{'a': 2, 'b': 1}", True),
    ("collections.OrderedDict([('b', 1), ('a', 2)])", "{'a': 2}", False),
    ("collections.defaultdict(list, {1: [2]})", "{1: [2]}", True),
    ("collections.defaultdict(list, {1: [2]})", "{1: [3]}", False),
    ("P(1, 2)", "(1, 2)", True),
    ("P(1, 2)", "(2, 1)", False),
    ("{'pts': [P(1, 2)], P(3, 4): frozenset({5})}", "{'pts': [(1, 2)], (3, 4): {5}}", True),
    ("numpy.int64(7)", "7", True),
    ("numpy.int64(7)", "8", False),
    ("numpy.float64(0.25)", "0.25", True),
    ("numpy.float64(0.25)", "0.5", False),
    ("numpy.bool_(True)", "True", True),
    ("[numpy.int64(1), numpy.float32(0.5)]", "[1, 0.5]", True),
    ("[numpy.int64(1), numpy.float32(0.5)]", "[1, 0.25]", False),
    ("numpy.longdouble(1) / 3", "0.3333333333333333", False),  # item() would round it to this float
    ("fractions.Fraction(1, 2)", "0.5", True),
    ("fractions.Fraction(1, 2)", "0.25", False),
    ("fractions.Fraction(6, 3)", "2", True),
    ("fractions.Fraction(1, 3)", "0.3333333333333333", False),  # no float equals 1/3
    ("decimal.Decimal('0.5')", "0.5", True),
    ("decimal.Decimal('0.1')", "0.1", False),  # Decimal compares with the float's exact value
    ("float('inf')", "1e999", True),
    ("-float('inf')", "-1e999", True),
    ("float('inf')", "-1e999", False),
    ("[complex(1, float('inf'))]", "[1+1e999j]", True),
    ("float('nan')", "1e999", False),
    ("frozenset({1, 2})", "{1, 2}", True),
    ("frozenset({1, 2})", "{1, 3}", False),
    ("frozenset()", "set()", True),
    ("E.B", "2", True),
    ("E.B", "1", False),
    # subclasses whose == or hash differ from their base's are not converted
    ("D({1: 2})", "{1: 2}", False),
    ("{K(1): 'a'}", "{1: 'a'}", False),
]
EQUALITY_PRELUDE = ("import collections, decimal, enum, fractions\nimport numpy\n"
                    "P = collections.namedtuple('P', 'x y')\nE = enum.IntEnum('E', 'A B')\n"
                    "class D(dict):\n    __eq__ = lambda s, o: False\n    __hash__ = None\n"
                    "class K(int):\n    __hash__ = lambda s: 42\n")


@pytest.mark.parametrize(("expression", "literal", "python_says"), EQUALITY_CASES)
def test_equal_values_of_other_types_score_as_python_judges(expression, literal, python_says):
    """A correct answer of a type that is no exact builtin (Counter, namedtuple, NumPy scalar, Fraction,
    frozenset, infinity...) passes `assert f() == LITERAL` exactly when Python's own assert would."""
    namespace = {}
    exec(EQUALITY_PRELUDE, namespace)
    assert bool(eval(expression, namespace) == ast.literal_eval(literal)) is python_says  # the reference
    program = f"{EQUALITY_PRELUDE}def f():\n    return {expression}"
    assert _score(program, [f"assert f() == {literal}"]) == float(python_says)
    assert _score(program, [f"assert {literal} == f()"]) == float(python_says)


def test_a_huge_value_fails_its_own_test_only():
    """Each expression's reported value is capped so that every test's line fits in what the parent reads:
    a 2 MB wrong value fails its own test without hiding the next test's pass."""
    program = "def f():\n    return 'x' * 2_000_000\ndef g():\n    return 1\ndef h():\n    return list(range(20_000))"
    assert _score(program, ["assert f() == 'y'", "assert g() == 1"]) == 0.5
    assert _score(program, ["assert [f()] == [f()]", "assert g() == 1"]) == 1.0  # a statement reports no value
    big = repr(list(range(20_000)))  # 129 kB, within each of two tests' share
    assert _score(program, [f"assert h() == {big}", "assert g() == 1"]) == 1.0


def test_program_reading_stdin_gets_eof_not_a_hang():
    start = time.monotonic()
    assert _score("x = input()\ndef add(a, b): return a + b", ADD_TESTS) == 0.0
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------------------------
# Hostile programs: each must score 0, end within its timeout plus slack, and leave no trace.


def test_infinite_loop_is_killed():
    start = time.monotonic()
    assert _score("while True:\n    pass", ["assert True"], timeout=2.0) == 0.0
    assert time.monotonic() - start < 2.0 + 15


def test_sleeping_forever_is_killed_by_wall_clock():
    start = time.monotonic()
    result = run_sandboxed("import time\ntime.sleep(1000)", limits=SandboxLimits(timeout=2.0))
    assert result.timed_out
    assert time.monotonic() - start < 2.0 + 15


def test_partial_credit_survives_a_timeout():
    tests = ["assert f() == 1", "assert f() == 1", "while True: pass", "assert f() == 1"]
    assert _score("def f():\n    return 1", tests, timeout=2.0) == 0.5


@pytest.mark.skipif(sandbox_mode() == "plain" and os.geteuid() == 0,
                    reason="RLIMIT_NPROC does not bind root and there is no pid namespace")
def test_fork_bomb_is_contained():
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    assert _score(program, ["assert True"], timeout=3.0) == 0.0
    assert time.monotonic() - start < 3.0 + 20


def test_orphans_die_with_the_sandbox():
    # A child that leaves the process group and sleeps must not outlive the run.
    program = ("import os, sys, time\nprint(os.getcwd(), flush=True)\n"
               "if os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
               "time.sleep(1000)")
    result = run_sandboxed(program, limits=SandboxLimits(timeout=2.0))
    assert result.timed_out
    box = result.stdout.strip()
    assert box.endswith("/box")
    time.sleep(1.0)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if box.removesuffix("/box").encode() in cmdline:
            leftovers.append(pid)
    if sandbox_mode() == "plain":
        pytest.skip("without a pid namespace a setsid() child can outlive the run (documented)")
    assert leftovers == []


def test_huge_allocation_fails_cleanly():
    start = time.monotonic()
    assert _score("x = bytearray(10 * 1024**3)\ndef f(): return 1", ["assert f() == 1"]) == 0.0
    result = run_sandboxed("x = bytearray(10 * 1024**3)")
    assert "MemoryError" in result.stderr
    assert time.monotonic() - start < 30


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = ("import socket\n"
                   f"s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "s.sendall(b'leak')\nconnected = True")
        assert _score(program, ["assert connected"]) == 0.0
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever reached the host's loopback
    finally:
        server.close()


@pytest.mark.skipif(sandbox_mode() != "namespaces", reason="writes are only prevented in 'namespaces' mode")
def test_writes_outside_the_temp_dir_are_prevented(tmp_path: Path):
    tmp_path.chmod(0o777)  # even a world-writable target
    targets = [tmp_path / "escaped", Path("/tmp") / f"r1jax-escape-{uuid.uuid4().hex}",
               Path(__file__).with_name(f"escape-{uuid.uuid4().hex}")]
    program = "\n".join(f"open({str(t)!r}, 'w').write('x')" for t in targets[:1]) + "\ndone = True"
    assert _score(program, ["assert done"]) == 0.0
    for target in targets[1:]:
        result = run_sandboxed(f"open({str(target)!r}, 'w').write('x')")
        assert result.exit_code != 0
    for target in targets:
        assert not target.exists()
    # ... while the temp dir itself is writable
    assert _score("open('scratch.txt', 'w').write('x')\nok = open('scratch.txt').read() == 'x'",
                  ["assert ok"]) == 1.0


def test_plain_mode_blocks_python_sockets():
    result = run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
                           mode="plain")
    assert result.exit_code != 0 and "network disabled" in result.stderr
    assert run_sandboxed("print(2 + 2)", mode="plain").stdout == "4\n"


def test_code_reward_in_a_pool():
    from r1jax.rewards import RewardPool

    completions = [_fence("def add(a, b):\n    return a + b"), _fence("while True:\n    pass"),
                   _fence("def add(a, b):\n    return 0")]
    with RewardPool(num_workers=2, timeout=30.0) as pool:
        scores = pool.score("code", ["q"] * 3, completions, tests=[ADD_TESTS] * 3, timeout=2.0)
        assert scores == [1.0, 0.0, pytest.approx(1 / 3)]
        assert pool.stats["timeouts"] == 0  # the sandbox's own timeout fired first
