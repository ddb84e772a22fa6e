"""Run an untrusted Python program (and optionally test statements) in a constrained subprocess.

What is enforced depends on what the machine allows; `sandbox_mode()` reports which level is in use
(override with the environment variable `R1JAX_SANDBOX=namespaces|userns|plain`).

Levels (what each guard is in each mode):
- wall clock, all modes: killpg of the run's session, plus `timeout -s KILL` outside it (which
  still fires if this process dies first).
- CPU, memory (RLIMIT_AS), file size, open files, core dumps, all modes: rlimits.
- fork bombs: 'namespaces': RLIMIT_NPROC as uid nobody, and a pid namespace whose processes all
  die with its init; 'userns': RLIMIT_NPROC (a non-root uid) and a pid namespace; 'plain':
  RLIMIT_NPROC, which the kernel ignores for root.
- network: 'namespaces' and 'userns': an empty network namespace; 'plain': a Python-level socket
  block (bypassable through ctypes).
- writes outside the temp dir: 'namespaces': every other mount is remounted read-only in a private
  mount namespace and the program runs as nobody; 'userns' and 'plain': not prevented (the user's
  own file permissions apply).

Always: `python -I` (no env vars, no user site), a fresh temp dir as cwd and HOME, a minimal
environment, stdout/stderr to files bounded by RLIMIT_FSIZE.

Resource limits are set by the launcher inside the child (after exec), not through `preexec_fn`:
the trainer process runs JAX threads, and `preexec_fn` is unsafe in a threaded parent.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

MODES = ("namespaces", "userns", "plain")
_LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
_MAX_READ = 1 << 20  # bytes read of stdout, stderr and the results file, each
_MIN_RESULT_LINE = 128  # room for "NONCE INDEX 1" and a short value, however many tests


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits: wall clock and CPU seconds, address space, processes, file size (MiB)."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 64
    max_file_mb: int = 16
    max_open_files: int = 256

    def rlimits(self) -> dict[str, tuple[int, int]]:
        mib = 1 << 20
        return {
            "RLIMIT_CPU": (self.cpu_seconds, self.cpu_seconds + 1),
            "RLIMIT_AS": (self.memory_mb * mib, self.memory_mb * mib),
            "RLIMIT_NPROC": (self.max_processes, self.max_processes),
            "RLIMIT_FSIZE": (self.max_file_mb * mib, self.max_file_mb * mib),
            "RLIMIT_NOFILE": (self.max_open_files, self.max_open_files),
            "RLIMIT_CORE": (0, 0),
        }


def _result_line_bytes(n_tests: int, limits: SandboxLimits) -> int:
    """The longest results line the launcher may write: each test's share of what the parent reads of the
    results file (and of RLIMIT_FSIZE), so a huge value fails its own test without hiding later ones."""
    return max(_MIN_RESULT_LINE, min(_MAX_READ, limits.max_file_mb << 20) // max(1, n_tests))


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one sandboxed run did. `test_passed[i]` is False for tests that never reported;
    `test_values[i]` is the repr of an expression test's plain value (None: it has none, raised, its line
    would pass its share of the results file, or never reported; always None for a statement)."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    test_passed: tuple[bool, ...]
    test_values: tuple[str | None, ...] = ()


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _command(mode: str, root_dir: str, wall_seconds: float) -> list[str]:
    cmd = [sys.executable, "-I", _LAUNCHER, root_dir]
    if mode == "namespaces":
        cmd = ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child", *cmd]
    elif mode == "userns":
        cmd = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", *cmd]
    if shutil.which("timeout"):  # outlives us: kills the group even if this process dies first
        cmd = ["timeout", "-s", "KILL", str(int(wall_seconds) + 2), *cmd]
    return cmd


def _read(path: Path, limit: int = _MAX_READ) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _run(program: str, stdin: str, tests: Sequence[str | dict[str, str]] | None, limits: SandboxLimits,
         mode: str) -> RunResult:
    if mode not in MODES:
        raise ValueError(f"sandbox mode {mode!r}; known: {MODES}")
    root_dir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    try:
        root = Path(root_dir)
        box, io_dir = root / "box", root / "io"
        box.mkdir(mode=0o700)
        io_dir.mkdir(mode=0o700)
        uid, gid = _nobody()
        if mode == "namespaces":
            os.chmod(root, 0o711)  # nobody may pass through to box/, not read io/
            os.chown(box, uid, gid)
        nonce = secrets.token_hex(16)
        n_tests = len(tests) if tests is not None else 0
        line_bytes = _result_line_bytes(n_tests, limits)
        payload = {"mode": mode, "program": program, "tests": list(tests) if tests is not None else None,
                   "nonce": nonce, "rlimits": limits.rlimits(), "uid": uid, "gid": gid,
                   "max_line_bytes": line_bytes}
        fd = os.open(io_dir / "payload.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            json.dump(payload, f)
        (io_dir / "stdin").write_text(stdin)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(box), "TMPDIR": str(box),
               "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        timed_out = False
        with open(io_dir / "stdin", "rb") as stdin_file:
            proc = subprocess.Popen(
                _command(mode, root_dir, limits.timeout), stdin=stdin_file, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, cwd=box, env=env, start_new_session=True, close_fds=True)
            try:
                _, launcher_err = proc.communicate(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, launcher_err = proc.communicate()
        passed = [False] * n_tests
        values: list[str | None] = [None] * n_tests
        for line in _read(io_dir / "results", n_tests * line_bytes).splitlines():
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] == nonce and parts[1].isdigit() and parts[2] in ("0", "1"):
                index = int(parts[1])
                if index < len(passed):
                    passed[index] = parts[2] == "1"
                    values[index] = parts[3] if len(parts) == 4 and isinstance(tests[index], dict) else None
        stderr = _read(io_dir / "stderr")
        if launcher_err:
            stderr = launcher_err[:_MAX_READ].decode("utf-8", errors="replace") + stderr
        return RunResult(exit_code=None if timed_out else proc.returncode, stdout=_read(io_dir / "stdout"),
                         stderr=stderr, timed_out=timed_out, test_passed=tuple(passed), test_values=tuple(values))
    finally:
        shutil.rmtree(root_dir, ignore_errors=True)


def _probe(mode: str) -> bool:
    try:
        result = _run("print('ok')", "", None, SandboxLimits(timeout=30.0), mode)
    except OSError:
        return False
    return result.exit_code == 0 and result.stdout == "ok\n"


@functools.cache
def sandbox_mode() -> str:
    """The strongest isolation this machine supports (see the module docstring), probed once."""
    forced = os.environ.get("R1JAX_SANDBOX")
    if forced:
        if forced not in MODES:
            raise ValueError(f"R1JAX_SANDBOX={forced!r}; known: {MODES}")
        return forced
    if sys.platform == "linux" and shutil.which("unshare"):
        if os.geteuid() == 0 and _probe("namespaces"):
            return "namespaces"
        if os.geteuid() != 0 and _probe("userns"):
            return "userns"
    return "plain"


def run_sandboxed(program: str, *, stdin: str = "", tests: Sequence[str | dict[str, str]] | None = None,
                  limits: SandboxLimits = SandboxLimits(), mode: str | None = None) -> RunResult:
    """Run `program` (then each of `tests` in the program's namespace) in the sandbox.

    A test is a statement (passes if it raises nothing) or `{"eval": expression}` (its value comes back
    as the repr of an equal value of builtin literal types, when there is one and that repr fits the test's
    share of the 1 MiB read of results). Returns exit code, stdout, stderr (each read up to 1 MiB), whether
    the wall clock ran out, one pass flag and one value per test. `mode=None` uses `sandbox_mode()`.
    """
    return _run(program, stdin, tests, limits, mode or sandbox_mode())
