"""Reward process pool: score a batch in parallel, each sample under a hard wall-clock timeout.

A reward judges text that a policy is being optimised to break, so a sample may make its reward
raise, loop forever or hold the GIL inside sympy. The pool turns each of those into that sample's
`failure_score` (0.0 by default, or None) and a counter in `stats`; the run never stops for it.

Design:
- One task is one sample, so a hang costs one score, not a batch. A worker that overruns its
  deadline is SIGKILLed and replaced; one that dies is replaced too. Each worker has `prefetch`
  tasks queued, so it does not wait for the dispatcher between samples.
- Workers come from the 'forkserver' start method (else 'spawn'), never plain fork: the trainer's
  process runs JAX, which is multithreaded, and forking a multithreaded process can deadlock the
  child. The fork server preloads `r1jax.rewards.math` and math-verify, so a replacement worker
  starts warm in milliseconds.
- The dispatcher waits on pipes (`multiprocessing.connection.wait`), not on signals, so `score`
  works from any thread. Calls are serialised by a lock.
- Reward functions cross the process boundary by pickle: pass module-level functions,
  `functools.partial`s of them, registry names, or `CombinedReward`s made of those.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_PRELOAD = ("r1jax.rewards", "r1jax.rewards.math", "math_verify")


class RewardError(RuntimeError):
    """A reward raised in a worker; the message carries the worker-side exception."""


def _worker_main(conn: mp.connection.Connection) -> None:
    # Ctrl-C belongs to the parent; a worker leaves when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # a task that cannot be unpickled here
            conn.send(("err", f"cannot unpickle task: {type(e).__name__}: {e}"[:2000]))
            continue
        try:
            out = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: B036 - SystemExit from a reward is an error, not an exit
            out = ("err", f"{type(e).__name__}: {e}"[:2000])
        try:
            conn.send(out)
        except Exception as e:
            conn.send(("err", f"cannot pickle result: {type(e).__name__}: {e}"[:2000]))


def _context(start_method: str | None, preload: Sequence[str]) -> Any:
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method == "fork":
        raise ValueError("start_method='fork' is unsafe in a multithreaded (JAX) process; "
                         "use 'forkserver' or 'spawn'")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver" and preload:
        # Ignored if this process's fork server is already running; '__main__' kept as the default.
        ctx.set_forkserver_preload(["__main__", *preload])
    return ctx


class HardTimeoutWorker:
    """One worker process that runs calls and is killed and replaced when a call overruns."""

    def __init__(self, start_method: str | None = None, preload: Sequence[str] = DEFAULT_PRELOAD):
        self._ctx = _context(start_method, preload)
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def alive(self) -> bool:
        return self.proc.is_alive()

    def send(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> None:
        self.conn.send((fn, args, kwargs or {}))

    def receive(self) -> Any:
        """The result of the last `send`; raises RewardError (the call raised) or EOFError (worker died)."""
        status, value = self.conn.recv()
        if status == "err":
            raise RewardError(value)
        return value

    def call(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
             timeout: float | None = None) -> Any:
        """`fn(*args, **kwargs)` in the worker; TimeoutError (worker replaced) after `timeout` s."""
        try:
            self.send(fn, args, kwargs)
        except (BrokenPipeError, OSError):
            self.restart()
            self.send(fn, args, kwargs)
        if not self.conn.poll(timeout):
            self.restart()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} ran past {timeout} s; worker replaced")
        try:
            return self.receive()
        except (EOFError, OSError) as e:
            self.restart()
            raise RewardError(f"worker died: {e!r}") from None

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self._start()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(timeout=10)
        finally:
            self.conn.close()


def _per_sample(fields: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    """Fields that are lists aligned with the batch are sliced to sample `i`; others pass as they are."""
    return {k: [v[i]] if isinstance(v, list | tuple) and len(v) == n else v for k, v in fields.items()}


def _check_score(value: Any) -> float | None:
    if isinstance(value, list | tuple) and len(value) == 1:
        value = value[0]
    else:
        raise RewardError(f"a reward must return one score per sample, got {value!r:.200}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy floats are Real
        raise RewardError(f"score must be a float or None, got {value!r:.200}")
    value = float(value)
    if value != value:
        raise RewardError("score is NaN")
    return value


def _resolve(fn: Any) -> Callable[..., Any]:
    if isinstance(fn, str):
        from r1jax.rewards.registry import get_reward

        return get_reward(fn)
    return fn


class RewardPool:
    """Scores batches with a reward function in `num_workers` processes, `timeout` s per sample.

    Args:
      num_workers: worker processes; default `os.cpu_count()`. 0 scores inline in the calling
        thread (exceptions still caught and counted, but no protection from hangs).
      timeout: wall-clock seconds one sample may take (from dispatch) before its worker is killed.
        Must exceed any timeout inside the reward (e.g. `code_reward`'s sandbox timeout).
      failure_score: the score of a sample whose reward raised, hung or returned garbage: 0.0, or
        None to exclude it from means.
      start_method: 'forkserver' (default where available) or 'spawn'.
      prefetch: samples queued per worker, so that a worker never waits for the dispatcher to be
        scheduled; a sample's timeout starts when the worker reaches it, and the samples queued
        behind one that hangs are re-run on a fresh worker, not failed.

    `stats` counts `scored` (samples returned by the reward), `errors`, `timeouts`, `restarts`.
    """

    def __init__(self, num_workers: int | None = None, timeout: float = 30.0,
                 failure_score: float | None = 0.0, start_method: str | None = None,
                 preload: Sequence[str] = DEFAULT_PRELOAD, prefetch: int = 2):
        if num_workers is None:
            num_workers = os.cpu_count() or 1
        if num_workers < 0 or timeout <= 0 or prefetch < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 0, timeout={timeout} > 0, "
                             f"prefetch={prefetch} >= 1")
        self.prefetch = prefetch
        self.timeout = timeout
        self.failure_score = failure_score
        self._lock = threading.Lock()
        # All keys exist from the start, so `stats` can copy the dict while a batch runs.
        self._counts = dict.fromkeys(("scored", "errors", "timeouts", "restarts"), 0)
        self._workers = [HardTimeoutWorker(start_method, preload) for _ in range(num_workers)]
        self._closed = False

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def stats(self) -> dict[str, int]:
        """Counters since the pool started; readable from any thread, also while a batch runs."""
        return dict(self._counts)

    def score(self, fn: Callable[..., Sequence[float | None]] | str, prompts: Sequence[str],
              completions: Sequence[str], **fields: Any) -> list[float | None]:
        """`fn(prompts, completions, **fields)`, computed one sample per task across the workers."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"prompts has {len(prompts)} entries, completions {n}")
        fn = _resolve(fn)
        if self._workers:
            try:
                pickle.dumps(fn)
            except Exception as e:  # a programming error, not a sample's failure: say so
                raise TypeError(f"reward {fn!r:.200} cannot be sent to worker processes ({e}); use "
                                "a module-level function, a functools.partial of one, or a registry "
                                "name") from e
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            if not self._workers:
                return self._score_inline(fn, prompts, completions, fields)
            return self._score_parallel(fn, prompts, completions, fields)

    def _fail(self, kind: str) -> float | None:
        self._counts[kind] += 1
        return self.failure_score

    def _score_inline(self, fn: Callable, prompts: Sequence[str], completions: Sequence[str],
                      fields: dict[str, Any]) -> list[float | None]:
        n = len(completions)
        out: list[float | None] = []
        for i in range(n):
            try:
                out.append(_check_score(fn([prompts[i]], [completions[i]], **_per_sample(fields, n, i))))
                self._counts["scored"] += 1
            except Exception:
                out.append(self._fail("errors"))
        return out

    def _score_parallel(self, fn: Callable, prompts: Sequence[str], completions: Sequence[str],
                        fields: dict[str, Any]) -> list[float | None]:
        n = len(completions)
        results: list[float | None] = [None] * n
        pending = collections.deque(range(n))
        # Samples sent to each worker, in order; the head one is running, since `started[worker]`.
        queued: dict[HardTimeoutWorker, collections.deque[int]] = {
            w: collections.deque() for w in self._workers}
        started: dict[HardTimeoutWorker, float] = {}

        def replace(worker: HardTimeoutWorker) -> None:
            worker.restart()
            self._counts["restarts"] += 1
            pending.extendleft(reversed(queued[worker]))  # not their fault: run them again
            queued[worker].clear()

        while pending or any(queued.values()):
            for worker, queue in queued.items():
                while pending and len(queue) < self.prefetch:
                    i = pending.popleft()
                    try:
                        worker.send(fn, ([prompts[i]], [completions[i]]), _per_sample(fields, n, i))
                    except (BrokenPipeError, ConnectionError, EOFError):  # died while idle
                        pending.appendleft(i)
                        replace(worker)
                        break
                    except Exception:  # the task itself cannot be pickled
                        results[i] = self._fail("errors")
                        continue
                    if not queue:
                        started[worker] = time.monotonic()
                    queue.append(i)
            busy = {w.conn: w for w, q in queued.items() if q}
            if not busy:
                continue
            wait_s = max(0.0, min(started[w] for w in busy.values()) + self.timeout - time.monotonic())
            for conn in mp.connection.wait(list(busy), timeout=wait_s):
                worker = busy[conn]
                queue = queued[worker]
                while queue and worker.conn.poll():
                    i = queue.popleft()
                    try:
                        results[i] = _check_score(worker.receive())
                        self._counts["scored"] += 1
                    except RewardError:
                        results[i] = self._fail("errors")
                    except (EOFError, OSError):  # the worker died on sample i (segfault, os._exit, OOM)
                        results[i] = self._fail("errors")
                        replace(worker)
                        break
                    started[worker] = time.monotonic()
            now = time.monotonic()
            for worker, queue in queued.items():
                if queue and now >= started[worker] + self.timeout:
                    results[queue.popleft()] = self._fail("timeouts")
                    replace(worker)
        return results

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for worker in self._workers:
                worker.kill()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
