"""Supervised fine-tuning on (prompt, completion) pairs, loss on completion tokens only.

Used for the laptop demo's short pretraining (prompt = BOS, completion = a corpus line), R1's cold
start, rejection-sampling SFT and distillation. Rows use the RL trainer's layout (right-padded
prompt slots, then completion slots), so positions and masks are exactly those of sampling and the
same jitted objective machinery serves both. Shapes are bucketed to powers of two so that a run
compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1jax.sampling import bucket
from r1jax.sharding import gather_processes, global_rows
from r1jax.trainers.optim import OptimConfig, learning_rate_schedule, make_optimizer
from r1jax.trainers.steps import init_train_state, mesh_context, sft_objective


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT run; batch_size counts the pairs of a step over all processes (each host loads its share)."""

    steps: int
    batch_size: int
    optim: OptimConfig
    micro_batches: int = 1
    max_length: int = 512
    chunk_size: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"sft.steps={self.steps} must be >= 0 and sft.batch_size={self.batch_size} >= 1")
        if self.micro_batches < 1 or self.max_length < 2 or self.chunk_size < 1:
            raise ValueError(f"sft.micro_batches={self.micro_batches}, sft.max_length={self.max_length} and "
                             f"sft.chunk_size={self.chunk_size} must be >= 1, >= 2 and >= 1")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"sft.micro_batches={self.micro_batches} must divide sft.batch_size={self.batch_size}")


def sft_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, max_length: int,
    longest: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded prompt slots and completion slots, each bucketed; each pair's completion cut so that
    its prompt + completion holds at most max_length tokens.

    The cut is per pair, whatever else is in the batch: a pair that fits keeps every token. A row can
    then hold more than max_length slots (up to twice: a long prompt and a long completion of other
    pairs in one batch), never more than max_length real tokens.

    longest: the (prompt, kept completion) lengths to bucket for, instead of these pairs' own
    (`longest_lengths`; on several hosts the maximum over all of them, so every process pads alike).
    """
    check_pairs(pairs, max_length)
    prompt_max, completion_max = longest or longest_lengths(pairs, max_length)
    p_len, c_len = (min(bucket(n, 8), max_length) for n in (prompt_max, completion_max))
    b = len(pairs)
    out = {
        "prompt_tokens": np.full((b, p_len), pad_id, np.int32), "prompt_mask": np.zeros((b, p_len), bool),
        "tokens": np.full((b, c_len), pad_id, np.int32), "mask": np.zeros((b, c_len), bool),
    }
    for i, (p, c) in enumerate(pairs):
        c = list(c)[:max_length - len(p)]
        out["prompt_tokens"][i, :len(p)], out["prompt_mask"][i, :len(p)] = p, True
        out["tokens"][i, :len(c)], out["mask"][i, :len(c)] = c, True
    return out


def check_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> None:
    """ValueError naming the first pair that `sft_batch` cannot lay out (or an empty batch)."""
    if not pairs:
        raise ValueError("an SFT batch needs at least one (prompt, completion) pair")
    for i, (p, _) in enumerate(pairs):
        if not len(p):
            raise ValueError(f"pair {i}: the prompt is empty (use [bos] for unconditional text)")
        if len(p) >= max_length:
            raise ValueError(f"pair {i}: a prompt of {len(p)} tokens leaves no room under sft.max_length={max_length}")


def longest_lengths(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> tuple[int, int]:
    """(longest prompt, longest completion as `sft_batch` cuts it) of `pairs`; (0, 0) for none."""
    return (max((len(p) for p, _ in pairs), default=0),
            max((min(len(c), max_length - len(p)) for p, c in pairs), default=0))


class SFTTrainer:
    def __init__(self, config: SFTConfig, model: nnx.Module, *, pad_id: int, mesh: Mesh | None = None):
        self.config = config
        self.pad_id = pad_id
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.optimizer = make_optimizer(config.optim)
        self.schedule = learning_rate_schedule(config.optim)
        self.params, self.opt_state, self._update = init_train_state(
            self.graphdef, self.params, self.optimizer, sft_objective(chunk_size=config.chunk_size),
            config.micro_batches, mesh)
        self.step_count = 0

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def train_state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def load_train_state(self, state: dict) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]

    def step(self, next_batch: Callable[[], Sequence[tuple[Sequence[int], Sequence[int]]]]) -> dict[str, float]:
        """One optimizer step on the next batch of (prompt ids, completion ids) pairs."""
        pairs, max_length = next_batch(), self.config.max_length
        try:
            check_pairs(pairs, max_length)
            error = None
        except ValueError as e:
            error = e
        # every process learns of a bad pair on any of them, and all stop (rather than the others waiting
        # in the update's collectives for one that raised); this process's own lengths, on one host
        stats = gather_processes(np.asarray([[*longest_lengths(pairs, max_length), error is not None]]))
        if error is not None:
            raise error
        if stats[:, 2].any():
            raise ValueError(f"process {int(np.argmax(stats[:, 2]))}'s SFT batch has a pair it cannot lay out "
                             "(its log names it): every process stops")
        rows = sft_batch(pairs, self.pad_id, max_length, tuple(int(n) for n in stats[:, :2].max(0)))
        batch = {k: global_rows(v, self.mesh) for k, v in rows.items()}
        with mesh_context(self.mesh):
            self.params, self.opt_state, metrics = self._update(self.params, self.opt_state, batch)
        self.step_count += 1
        out = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
        out["train/lr"] = float(self.schedule(self.step_count - 1))
        return out
