"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), measured in tokens.

With L_max = `max_length` and L_cache = `cache_length`, a completion of |y| tokens gets
    0                                  if |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
    -1                                 if |y| > L_max
a ramp from 0 to -1 over the last L_cache tokens. Token counts come from the sampler (characters
would punish scripts with long tokens differently from scripts with short ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def overlong_penalty(completion_lengths: Sequence[int], max_length: int, cache_length: int) -> list[float]:
    """DAPO soft overlong penalty per completion length in tokens, in [-1, 0]."""
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length={cache_length} must be in (0, max_length={max_length}]")
    threshold = max_length - cache_length
    out = []
    for length in completion_lengths:
        if length < 0:
            raise ValueError(f"completion length {length} is negative")
        if length <= threshold:
            out.append(0.0)
        elif length <= max_length:
            out.append((threshold - length) / cache_length)
        else:
            out.append(-1.0)
    return out


def overlong_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    completion_length: Sequence[int],
    max_length: int,
    cache_length: int,
    **_: Any,
) -> list[float | None]:
    """`overlong_penalty` as a RewardFn: the trainer passes token counts as `completion_length`."""
    if len(completion_length) != len(completions):
        raise ValueError(f"completion_length has {len(completion_length)} entries, "
                         f"completions {len(completions)}")
    return list(overlong_penalty(completion_length, max_length, cache_length))
