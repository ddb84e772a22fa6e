"""Format rewards: R1-Zero's `<think> … </think> <answer> … </answer>` and R1's special-token format.

R1-Zero's template ends the prompt with "Assistant:" and the completion is expected to be
`<think> reasoning </think> <answer> answer </answer>`. Our rule, 1.0 or 0.0:
- exactly one `<think>`, `</think>`, `<answer>`, `</answer>`, in that order;
- only whitespace before `<think>`, between `</think>` and `<answer>`, and after `</answer>`
  (the completion is decoded without special tokens, so no EOS string is expected);
- a non-blank answer; the reasoning may be empty (the format reward judges form, not effort).

Many setups prefill `<think>` in the prompt. Then the completion must contain no `<think>` and
start directly with the reasoning. `think_prefilled=None` (default) decides per sample: prefilled
iff the prompt, stripped of trailing whitespace, ends with `<think>`.

Pure string scanning (`r1jax.data.templates.parse_r1_zero`), linear in the completion length: no
regular expression that can backtrack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1jax.data.templates import parse_r1_zero

R1_SPECIAL_TOKEN = "|special_token|"


def _is_prefilled(prompt: str, opener: str, prefilled: bool | None) -> bool:
    if prefilled is not None:
        return prefilled
    return isinstance(prompt, str) and prompt.rstrip().endswith(opener)


def follows_r1_zero_format(completion: str, think_prefilled: bool = False) -> bool:
    """Whether `completion` is `<think> … </think> <answer> … </answer>` (see module docstring)."""
    if not isinstance(completion, str):
        return False
    parsed = parse_r1_zero(("<think>" if think_prefilled else "") + completion)
    return parsed is not None and bool(parsed[1])


def format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    think_prefilled: bool | None = None,
    **_: Any,
) -> list[float | None]:
    """1.0 where the completion follows R1-Zero's think/answer format, else 0.0.

    `think_prefilled`: True if every prompt ends with `<think>`, False if none does, None to detect
    it per prompt.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries, completions {len(completions)}")
    return [
        1.0 if follows_r1_zero_format(c, _is_prefilled(p, "<think>", think_prefilled)) else 0.0
        for p, c in zip(prompts, completions, strict=True)
    ]


def follows_r1_format(completion: str, special_token: str = R1_SPECIAL_TOKEN,
                      reasoning_prefilled: bool = False) -> bool:
    """Whether `completion` is `|special_token| reasoning |special_token| summary`.

    Exactly two special tokens (one if the first is prefilled in the prompt), only whitespace before
    the first, non-blank reasoning and summary.
    """
    if not isinstance(completion, str) or not special_token:
        return False
    parts = completion.split(special_token)
    if reasoning_prefilled:
        if len(parts) != 2:
            return False
        reasoning, summary = parts
    else:
        if len(parts) != 3 or parts[0].strip():
            return False
        _, reasoning, summary = parts
    return bool(reasoning.strip()) and bool(summary.strip())


def r1_format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    special_token: str = R1_SPECIAL_TOKEN,
    reasoning_prefilled: bool | None = None,
    **_: Any,
) -> list[float | None]:
    """1.0 where the completion follows R1's `|special_token| reasoning |special_token| summary`.

    `special_token` is the delimiter string your tokenizer decodes to; `reasoning_prefilled=None`
    detects per prompt whether the prompt already ends with it.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries, completions {len(completions)}")
    return [
        1.0 if follows_r1_format(c, special_token, _is_prefilled(p, special_token, reasoning_prefilled))
        else 0.0
        for p, c in zip(prompts, completions, strict=True)
    ]
