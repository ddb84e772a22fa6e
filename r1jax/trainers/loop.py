"""The loop around a trainer's `step`: resume, evaluate, guard, log, checkpoint, stop on preemption.

Per step, in this order: train step → `check_finite` of its metrics → (every N steps) evaluation →
metrics → checkpoint. The finiteness check comes before the save, so a NaN step raises before it
can rotate the last good checkpoint out; evaluation statistics are not checked (a standard error
over one problem is NaN, and says nothing about the weights). SIGTERM (TPU preemption) saves the
current step and raises `Preempted`, which the CLI turns into exit code 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax

from r1jax.checkpoint import Checkpointer, PreemptionHandler, check_finite
from r1jax.metrics import MetricsWriter, ProgressBar


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with code 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


class Trainer(Protocol):
    step_count: int

    def train_state(self) -> Any: ...

    def load_train_state(self, state: Any) -> None: ...

    def step(self, next_batch: Callable[[], Any]) -> dict[str, float]: ...


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: Orbax restores into those placements."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_loop(
    trainer: Trainer,
    iterator,
    *,
    steps: int,
    workdir: str | Path,
    save_every: int,
    keep: int,
    evaluate: Callable[[Trainer], dict[str, float]] | None = None,
    eval_every: int = 0,
    extra: dict[str, Any] | None = None,
    show: dict[str, str] | None = None,
) -> list[dict[str, float]]:
    """Run `trainer` to `steps`, resuming from `workdir/checkpoints`; returns this call's metrics."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=save_every, keep=keep)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, abstract_state=abstract_like(trainer.train_state()))
        trainer.load_train_state(state)
        trainer.step_count = latest
        iterator.set_state(data_state["iterator"])
    writer = MetricsWriter(workdir, resume_step=latest)
    progress = ProgressBar(steps, initial=trainer.step_count, show=show)
    history = []
    try:
        with PreemptionHandler() as preemption:
            if latest is None and evaluate is not None and eval_every:
                writer.write(0, evaluate(trainer))  # the starting point of the curves
            while trainer.step_count < steps:
                metrics = trainer.step(lambda: next(iterator))
                step = trainer.step_count
                check_finite(step, metrics)
                if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
                    metrics.update(evaluate(trainer))
                writer.write(step, metrics)
                progress.update(step, metrics)
                history.append(metrics)
                final = step == steps
                stop = preemption.should_stop(step)
                ckpt.save(step, trainer.train_state(), data_state={"iterator": iterator.get_state()},
                          extra=dict(extra or {}), force=final or stop)
                if stop:
                    raise Preempted(step)
    finally:
        progress.close()
        writer.close()
        ckpt.close()
    return history
