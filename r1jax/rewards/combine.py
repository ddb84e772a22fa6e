"""Weighted sums of rewards, with every component kept for logging.

`combine({"accuracy": (accuracy_reward, 1.0), "format": ("format", 0.5)})` gives a `CombinedReward`:
calling it returns the per-sample totals (so it is a `RewardFn` itself); `.score(...)` returns a
`RewardOutput` with the totals and one column per component. Components may be given by registry
name. With a `RewardPool`, each component is scored in the pool separately, so a component that
hangs costs that component's score for that sample, not the others'.

None handling: a component's None (cannot judge) is left out of the sample's total; a sample
whose components are all None has total None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r1jax.rewards.pool import RewardPool


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """Per-sample weighted totals and the unweighted score of each component."""

    totals: list[float | None]
    columns: dict[str, list[float | None]]

    def means(self) -> dict[str, float | None]:
        """Mean of `totals` and of each column over the samples that were judged (None left out)."""
        out = {}
        for name, values in {"total": self.totals, **self.columns}.items():
            judged = [v for v in values if v is not None]
            out[name] = sum(judged) / len(judged) if judged else None
        return out


class CombinedReward:
    """A `RewardFn` that sums weighted components; see the module docstring."""

    def __init__(self, rewards: Mapping[str, tuple[Callable[..., Sequence[float | None]] | str, float]]):
        from r1jax.rewards.registry import get_reward

        if not rewards:
            raise ValueError("combine() needs at least one reward")
        self.components: dict[str, tuple[Callable[..., Sequence[float | None]], float]] = {}
        for name, spec in rewards.items():
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise ValueError(f"reward {name!r}: expected (fn or registry name, weight), got {spec!r}")
            fn, weight = spec
            self.components[name] = (get_reward(fn) if isinstance(fn, str) else fn, float(weight))

    def score(self, prompts: Sequence[str], completions: Sequence[str], *, pool: RewardPool | None = None,
              **fields: Any) -> RewardOutput:
        n = len(completions)
        columns: dict[str, list[float | None]] = {}
        for name, (fn, _) in self.components.items():
            if pool is not None:
                values = pool.score(fn, prompts, completions, **fields)
            else:
                values = list(fn(prompts, completions, **fields))
            if len(values) != n:
                raise ValueError(f"reward {name!r} returned {len(values)} scores for {n} completions")
            columns[name] = [None if v is None else float(v) for v in values]
        totals: list[float | None] = []
        for i in range(n):
            parts = [weight * columns[name][i] for name, (_, weight) in self.components.items()
                     if columns[name][i] is not None]
            totals.append(sum(parts) if parts else None)
        return RewardOutput(totals=totals, columns=columns)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Any) -> list[float | None]:
        return self.score(prompts, completions, **fields).totals

    def __repr__(self) -> str:
        parts = ", ".join(f"{name}: {getattr(fn, '__name__', fn)!s} x {w}"
                          for name, (fn, w) in self.components.items())
        return f"CombinedReward({parts})"


def combine(
    rewards: Mapping[str, tuple[Callable[..., Sequence[float | None]] | str, float]],
) -> CombinedReward:
    """A `CombinedReward` from `{name: (reward fn or registry name, weight)}`."""
    return CombinedReward(rewards)
