"""Reward registry: configs name rewards (`get_reward("accuracy")`), options bound by keyword.

`get_reward(name, **options)` returns the function, or a `functools.partial` with the options
bound (e.g. `get_reward("format", think_prefilled=True)`); both pickle, so both run in a
`RewardPool`. `register_reward` adds a project's own rule (a module-level function, for pickling).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from r1jax.rewards.code import code_reward
from r1jax.rewards.countdown import countdown_reward
from r1jax.rewards.format import format_reward, r1_format_reward
from r1jax.rewards.language import language_consistency_reward
from r1jax.rewards.length import overlong_reward
from r1jax.rewards.math import accuracy_reward


class RewardFn(Protocol):
    """`fn(prompts, completions, **example_fields) -> one score per completion`.

    Example fields are lists aligned with `completions` (e.g. `answer=[...]`); options are keyword
    arguments bound beforehand. A score is a float, or None where the rule cannot judge (excluded
    from means and from combined totals).
    """

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **example_fields: Any) -> list[float | None]: ...


_F = TypeVar("_F", bound=Callable[..., Any])

_REGISTRY: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "r1_format": r1_format_reward,
    "language": language_consistency_reward,
    "language_consistency": language_consistency_reward,
    "countdown": countdown_reward,
    "code": code_reward,
    "overlong": overlong_reward,
}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False) -> Any:
    """Register `fn` under `name`; usable as `@register_reward("name")`."""

    def add(f: _F) -> _F:
        if name in _REGISTRY and _REGISTRY[name] is not f and not overwrite:
            raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = f
        return f

    return add(fn) if fn is not None else add


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as `name`, with `options` bound as keyword arguments."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None
    return functools.partial(fn, **options) if options else fn


def reward_names() -> list[str]:
    return sorted(_REGISTRY)
