"""Checkpoints for the trainers: an Orbax `CheckpointManager` wrapper, a finiteness guard, preemption.

A step is one Orbax checkpoint directory `<directory>/<step>/` with three items:

    state/   the train state pytree (params, optimizer state, step, PRNG key …), `StandardSave`
    data/    the data iterator state (e.g. grain's `iterator.get_state()`), JSON; on several hosts
             every process's, in order (each host reads its own data shard)
    extra/   anything else JSON: config snapshot, metrics, seed …

Design choices:

* **Atomicity is Orbax's.** Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete
  (or writes `commit_success.txt` on object stores), and never lists a tmp directory as a step, so
  a save killed half-way is never the latest step; its tmp directory is replaced when that step is
  saved again. (Orbax's `cleanup_tmp_directories` is left off: its background clean-up races
  interpreter exit when a process opens a directory and closes it without saving.) Nothing is ever
  deleted except by the keep-K rotation.
* **Restore places arrays where `abstract_state` says.** Every leaf carries its target sharding
  (`jax.ShapeDtypeStruct(..., sharding=...)`, or a concrete `jax.Array` whose sharding is used), so
  a checkpoint written on one mesh restores onto another.
* **PRNG keys:** both forms work. New-style typed keys (`jax.random.key`) are saved by Orbax's
  native PRNG-key support (key data plus the implementation name) and come back typed, with the
  sharding of the abstract leaf; raw `uint32` key data (`jax.random.PRNGKey`) is an ordinary array.
  Keep the key in the train state, not in `extra`.
* **Errors name the directory and step.** A step that cannot be restored (missing or garbled files,
  a folder that is not an Orbax step, an `abstract_state` that no longer matches) raises
  `CheckpointError` saying which, and how to resume from the step before; nothing is deleted.
* **Non-finite guard is the trainer's protocol:** `check_finite(step, metrics)` first, then
  `save(...)`, so a NaN step raises before it can rotate the last good checkpoint out.
* **Preemption:** `PreemptionHandler` only sets a flag in its signal handler; the trainer polls
  `should_stop(step)` once per step, saves with `force=True` and exits 0. With several JAX
  processes it defers to JAX's preemption service (`reached_preemption_sync_point`), so every host
  stops at the same step.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from r1jax.sharding import gather_processes

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "extra")
# Written by Orbax into every step directory before any item; a step folder without it was not
# made by Orbax (or was damaged).
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint directory or step that cannot be used; the message says which and what to do."""


class NonFiniteError(FloatingPointError):
    """Metrics of a step are NaN or infinite; the run must stop before saving that step."""

    def __init__(self, step: int, bad: Mapping[str, Any]):
        self.step = step
        self.bad = dict(bad)
        shown = ", ".join(f"{k}={v}" for k, v in self.bad.items())
        super().__init__(
            f"step {step}: non-finite metrics {sorted(self.bad)} ({shown}); stopping without saving "
            f"this step, so the last good checkpoint is kept. Lower the learning rate, check the "
            f"data, or resume from that checkpoint."
        )


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
    """Raise `NonFiniteError` if any float metric of `step` is NaN or ±inf (arrays: any element).

    One device-to-host transfer for the whole dict. Integer, bool and string metrics are ignored.
    """
    host = jax.device_get(dict(metrics))
    bad = {}
    for name, value in host.items():
        if isinstance(value, str | bytes) or value is None:
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        if not np.all(np.isfinite(arr)):
            bad[name] = arr.item() if arr.size == 1 else f"{int(np.sum(~np.isfinite(arr)))}/{arr.size} non-finite"
    if bad:
        raise NonFiniteError(step, bad)


_PER_PROCESS = "per_process"  # the data item of a multi-host checkpoint: every process's state, in order


def _gather_strings(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: every process calls it)."""
    data = np.frombuffer(text.encode(), np.uint8)
    lengths = gather_processes(np.asarray([data.size]))
    padded = np.zeros((1, int(lengths.max())), np.uint8)
    padded[0, :data.size] = data
    return [bytes(row[:n]).decode() for row, n in zip(gather_processes(padded), lengths, strict=True)]


def _to_json(value: Any, path: str) -> Any:
    """Plain JSON types for `value`; numpy/JAX scalars and arrays become numbers and lists."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: JSON keys must be str, got {k!r} ({type(k).__name__})")
            out[k] = _to_json(v, f"{path}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        arr = np.asarray(jax.device_get(value))
        if arr.dtype.kind in "biuf":
            return arr.tolist()
    raise TypeError(
        f"{path}={value!r} ({type(value).__name__}) is not JSON-serialisable; use str, int, float, bool, "
        f"None, lists, str-keyed dicts, or numpy/JAX numeric arrays"
    )


def _abstract(tree: Any) -> Any:
    """`abstract_state` with every leaf a ShapeDtypeStruct that carries a sharding."""

    def leaf(path, x):
        if isinstance(x, jax.Array):
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is None:
            raise ValueError(
                f"abstract_state{jax.tree_util.keystr(path)} = {x!r}: every leaf must be a "
                f"jax.ShapeDtypeStruct with .sharding (or a jax.Array) so the restored array can be placed"
            )
        return x

    return jax.tree_util.tree_map_with_path(leaf, tree)


class Checkpointer:
    """Saves and restores (train state, data iterator state, extra JSON) with Orbax.

    Args:
      directory: root folder (local or `gs://`); created if missing.
      save_every: `save(step)` writes when `step % save_every == 0` (or `force=True`, or at a
        multi-host preemption sync point).
      keep: how many of the most recent steps to keep; older ones are deleted after a save.
      async_save: write in a background thread; `save` returns once arrays are copied off the
        device. Call `wait()` before reading the files and `close()` before exiting.

    Typical trainer use::

        ckpt = Checkpointer(workdir / "checkpoints", save_every=100, keep=3)
        if ckpt.latest_step() is not None:
            state, data_state, extra = ckpt.restore(abstract_state=abstract)
            iterator.set_state(data_state)
        for step in ...:
            ...
            check_finite(step, metrics)          # before saving, never after
            ckpt.save(step, state, data_state=iterator.get_state(), extra={"metrics": metrics})
        ckpt.close()
    """

    def __init__(self, directory: str | epath.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        directory = epath.Path(directory)
        # Orbax's tensorstore writer rejects relative paths (`--workdir runs/x`); gs:// paths are absolute.
        self.directory = directory if directory.is_absolute() else directory.absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} exists and is not a directory")
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(save_every), ocm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=ocm.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - re-raised with the directory named
            raise CheckpointError(
                f"cannot open checkpoint directory {self.directory}: {type(e).__name__}: {_first_line(e)}. "
                f"If it holds something other than Orbax step folders, point the run at an empty "
                f"directory instead; nothing was deleted."
            ) from e
        self.save_every = save_every
        self.keep = keep

    # -- queries ---------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (in this process, also a save still being written)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None. Orbax never lists a half-written (tmp) step."""
        return self._manager.latest_step()

    # -- save ------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        train_state: Any,
        *,
        data_state: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save `step` if it is due (or `force`); returns whether a save was started.

        Call it every step: it returns False at once when the step is not due, without touching
        `data_state`/`extra` (so JAX values there cost no transfer). A step that already exists
        (e.g. a preemption right after resuming) is not rewritten. Call `check_finite` first.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        if not force and not self._manager.should_save(step):
            return False
        if step in self._manager.all_steps():
            log.info("checkpoint step %d already exists in %s; not rewriting it", step, self.directory)
            return False
        data_json = _to_json(dict(data_state or {}), "data_state")
        if jax.process_count() > 1:  # Orbax writes JSON items from process 0 only: it keeps every host's
            data_json = {_PER_PROCESS: [json.loads(t) for t in _gather_strings(json.dumps(data_json))]}
        extra_json = _to_json(dict(extra or {}), "extra")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            data=ocp.args.JsonSave(data_json),
            extra=ocp.args.JsonSave(extra_json),
        )
        return bool(self._manager.save(step, args=args, force=True))

    # -- restore ---------------------------------------------------------------------------------
    def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(train_state, data_state, extra) of `step` (default: the latest).

        `abstract_state` is the train state's structure with target shardings: a pytree of
        `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (e.g. `jax.eval_shape(init)` with the
        shardings filled in) or of concrete arrays. Raises FileNotFoundError when there is no
        checkpoint and `CheckpointError` when the step cannot be restored.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint steps in {self.directory}")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}; available steps: {steps}")
        abstract = _abstract(abstract_state)
        step_dir = self.directory / str(step)
        missing = [name for name in (_STEP_METADATA_FILE, *ITEMS) if not (step_dir / name).exists()]
        if missing:
            raise self._corrupt(step, steps, f"it is not a complete Orbax checkpoint (missing {missing})")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore(),
            extra=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - re-raised with the directory and step named
            raise self._corrupt(
                step,
                steps,
                f"{type(e).__name__}: {_first_line(e)}. Its files may be damaged, or abstract_state may "
                f"not match what was saved (a changed model or optimizer config)",
            ) from e
        return restored.state, self._own_data_state(step, dict(restored.data or {})), dict(restored.extra or {})

    def _own_data_state(self, step: int, data: dict) -> dict:
        """This process's data iterator state: each host reads its own shard of the data. Saved with
        another process count, only empty states (nothing to resume) can be restored."""
        states = data[_PER_PROCESS] if _PER_PROCESS in data else [data]
        saved_by = len(states)
        if saved_by != jax.process_count() and any(states):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds the data iterator state of {saved_by} "
                f"process(es), and this run has {jax.process_count()}: each host reads its own shard of the "
                f"data, so resume with {saved_by} process(es). Nothing was deleted.")
        return states[jax.process_index()] if saved_by == jax.process_count() else {}

    def _corrupt(self, step: int, steps: list[int], reason: str) -> CheckpointError:
        earlier = [s for s in steps if s < step]
        step_dir = self.directory / str(step)
        if earlier:
            advice = (
                f"To resume from step {earlier[-1]}, move {step_dir} out of {self.directory} (keep it for inspection)"
            )
        else:
            advice = f"There is no earlier step; move {step_dir} aside to start from scratch"
        return CheckpointError(
            f"checkpoint step {step} in {self.directory} cannot be restored: {reason}. {advice}. "
            f"Nothing was deleted. Steps present: {steps}."
        )

    # -- lifecycle -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until an async save has been written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's threads. Call before the process exits."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    return text if len(text) <= limit else text[:limit] + "…"


class PreemptionHandler:
    """Turns SIGTERM (TPU/Kubernetes preemption notice) and optionally SIGINT into a polled flag.

    The signal handler only records the signal; all work happens in the trainer's loop::

        with PreemptionHandler() as preempt:
            for step in ...:
                ...train step...
                if preempt.should_stop(step):
                    ckpt.save(step, state, data_state=..., force=True)
                    ckpt.close()
                    sys.exit(0)

    A second SIGINT while the flag is set raises KeyboardInterrupt, as Python's default does, so a
    stuck run can still be interrupted from the keyboard.

    Multi-host (`jax.process_count() > 1`, or `multihost=True`): no Python handler is installed for
    SIGTERM, because JAX's preemption service (`jax.distributed.initialize`, enabled by
    `jax_enable_preemption_service`, the default) owns that signal and propagates the notice to all
    hosts; `should_stop(step)` returns `multihost_utils.reached_preemption_sync_point(step)`, which
    is True on every host at the same step. Every host must call it at every step. SIGINT is not
    trapped there either: one host stopping alone would leave the others waiting in a collective.
    """

    def __init__(self, *, sigint: bool = True, multihost: bool | None = None):
        self.sigint = sigint
        self._multihost = multihost
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def multihost(self) -> bool:
        return jax.process_count() > 1 if self._multihost is None else self._multihost

    @property
    def signal_received(self) -> int | None:
        """The first signal number received (single-host mode), or None."""
        return self._signum

    def install(self) -> PreemptionHandler:
        if self.multihost:
            if not jax.config.jax_enable_preemption_service:
                raise ValueError(
                    "PreemptionHandler(multihost) needs jax_enable_preemption_service=True (the default) "
                    "before jax.distributed.initialize(); it is False"
                )
            return self
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionHandler: not in the main thread, so no signal handler was installed")
            return self
        signals = [signal.SIGTERM] + ([signal.SIGINT] if self.sigint else [])
        for signum in signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self._signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._signum is None:
            self._signum = signum

    def should_stop(self, step: int | None = None) -> bool:
        """True once the run should save and exit. Multi-host: pass `step`; all hosts agree."""
        if self.multihost:
            if step is None:
                raise ValueError("should_stop(step) needs the step in multi-host runs (all hosts must agree)")
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self._signum is not None

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NonFiniteError",
    "PreemptionHandler",
    "check_finite",
]
