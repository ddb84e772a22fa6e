"""Rejection-sampling filters: which sampled reasoning traces are fit to train on (R1, section 2.3.3).

R1 keeps, per prompt, only correct samples and then "filters out chain-of-thought with mixed
languages, long paragraphs, and code blocks"; its cold-start data is likewise chosen for one
language and readability. This module owns those rules as pure string functions, so that the
cold-start builder, the rejection-sampling stage and distillation agree on one definition:

* `mixed_language(cot, target)`: the CoT holds words of a script other than the target language's
  (words counted as in the language-consistency reward, R1 eq. 7: math, code, digits neutral).
  A CoT without words (pure arithmetic) is not mixed.
* `long_paragraph(text, max_chars)`: a paragraph (text between blank lines) longer than
  `max_chars`. The paper gives no threshold; `FilterConfig.max_paragraph_chars` is ours.
* `code_block(text)`: a fenced (```/~~~) block or an HTML `<pre>`/`<code>` element. Indented
  blocks are not detected: in math text indentation is too often something else.
* `wrong_equations(cot)`: integer equations `a op b = c` in the CoT that are false — a right final
  answer reached through a wrong step (luck). Ours, not the paper's: rule rewards grade the final
  answer only, and such traces would teach wrong arithmetic.

`reject_reason(sample, config)` names the first rule a sample breaks (or None); `filter_samples`
applies it to a list and counts the reasons, which the stages write to their manifests.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from r1jax.data.templates import DEFAULT_SPECIAL_TOKEN, parse_cold_start, parse_r1_zero
from r1jax.rewards.language import LANGUAGE_SCRIPTS, count_words_by_script

REASONS = ("incorrect", "format", "wrong_step", "mixed_language", "long_paragraph", "code_block", "too_long",
           "duplicate")

_FENCE = re.compile(r"(?m)^[ \t]*(```|~~~)")
_HTML_CODE = re.compile(r"<(pre|code)\b[^>]{0,64}>", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# An integer equation `a op b = c` (op one of + - * ×), not preceded or followed by more digits.
_EQUATION = re.compile(r"(?<![\d.])(-?\d{1,12})\s*([-+*×])\s*(-?\d{1,12})\s*=\s*(-?\d{1,24})(?![\d.])")
_CHAIN = tuple("+-*×/÷^(")  # an operator (or bracket) next to an equation's side: a longer expression


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """What a kept sample must satisfy.

    Attributes:
      target_language: the language the CoT must be written in (a `LANGUAGE_SCRIPTS` code); None:
        detect nothing, skip the mixed-language rule.
      max_paragraph_chars: longest paragraph allowed (0 disables the rule). Not given by the paper.
      drop_code_blocks: drop samples with code blocks (R1 does, for reasoning data).
      require_correct: drop samples graded incorrect (`correct` False) and, unless `keep_ungraded`,
        those that could not be graded (`correct` None: no gold answer).
      keep_ungraded: with `require_correct`, keep the samples that have no grade (a user's file that
        mixes math with questions of no checkable answer); those graded incorrect are still dropped.
      require_format: the completion must parse in `format` ("r1": special-token reasoning and
        summary; "r1_zero": think/answer tags; "any": either; "none": no check).
      max_chars: longest completion allowed (0 disables).
      check_arithmetic: drop CoTs with a false integer equation (`wrong_equations`).
      dedupe: keep one copy of identical (prompt, completion) pairs.
    """

    target_language: str | None = "en"
    max_paragraph_chars: int = 1000
    drop_code_blocks: bool = True
    require_correct: bool = True
    keep_ungraded: bool = False
    require_format: str = "r1"
    max_chars: int = 0
    check_arithmetic: bool = True
    dedupe: bool = True
    special_token: str = DEFAULT_SPECIAL_TOKEN

    def __post_init__(self):
        if self.target_language is not None and self.target_language.lower() not in LANGUAGE_SCRIPTS:
            raise ValueError(f"filters.target_language={self.target_language!r}; known: {sorted(LANGUAGE_SCRIPTS)}")
        if self.require_format not in ("r1", "r1_zero", "any", "none"):
            raise ValueError(f"filters.require_format={self.require_format!r}; accepted: r1, r1_zero, any, none")
        if self.max_paragraph_chars < 0 or self.max_chars < 0:
            raise ValueError(f"filters.max_paragraph_chars={self.max_paragraph_chars} and filters.max_chars="
                             f"{self.max_chars} must be >= 0 (0 disables)")


# ------------------------------------------------------------------------------------ single rules


def split_reasoning(completion: str, special_token: str = DEFAULT_SPECIAL_TOKEN) -> tuple[str, str] | None:
    """(reasoning, final part) of an R1 (special-token) or R1-Zero (think/answer) completion, else None."""
    return parse_cold_start(completion, special_token=special_token) or parse_r1_zero(completion)


def off_language_words(cot: str, target_language: str) -> int:
    """How many words of `cot` are in a script that is not `target_language`'s."""
    scripts = LANGUAGE_SCRIPTS.get(target_language.lower())
    if scripts is None:
        raise ValueError(f"target_language={target_language!r}; known: {sorted(LANGUAGE_SCRIPTS)}")
    counts = count_words_by_script(cot)
    return sum(n for script, n in counts.items() if script not in scripts)


def mixed_language(cot: str, target_language: str = "en") -> bool:
    """Whether the CoT holds any word outside the target language's script(s)."""
    return off_language_words(cot, target_language) > 0


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def long_paragraph(text: str, max_chars: int) -> bool:
    """Whether a paragraph (blank-line separated) of `text` is longer than `max_chars` characters."""
    return max_chars > 0 and any(len(p) > max_chars for p in paragraphs(text))


def code_block(text: str) -> bool:
    """Whether `text` contains a fenced code block (``` or ~~~ at a line start) or `<pre>`/`<code>`."""
    return bool(_FENCE.search(text) or _HTML_CODE.search(text))


def wrong_equations(text: str) -> int:
    """How many integer equations `a op b = c` (+, -, *, ×) in `text` are false. One that is part of a
    longer expression (`2*3+4=10`, `2+3=4+1`, `12/4+1=4`) is not checked: its `a op b` is not the
    whole side of the equation."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b}
    wrong = 0
    for m in _EQUATION.finditer(text):
        if text[:m.start()].rstrip().endswith(_CHAIN) or text[m.end():].lstrip().startswith((*_CHAIN, "=")):
            continue
        a, op, b, c = m.groups()
        wrong += ops[op](int(a), int(b)) != int(c)
    return wrong


def follows_format(completion: str, fmt: str, special_token: str = DEFAULT_SPECIAL_TOKEN) -> bool:
    if fmt == "none":
        return True
    r1 = parse_cold_start(completion, special_token=special_token)
    if fmt == "r1":
        return r1 is not None and bool(r1[0]) and bool(r1[1])
    zero = parse_r1_zero(completion)
    if fmt == "r1_zero":
        return zero is not None
    return (r1 is not None and bool(r1[0]) and bool(r1[1])) or zero is not None


# ------------------------------------------------------------------------------------ samples


def reject_reason(sample: Mapping[str, Any], config: FilterConfig = FilterConfig()) -> str | None:
    """The first rule (in `REASONS` order) that `sample` breaks, or None to keep it.

    `sample` needs "completion"; "correct" (bool or None) is read when `require_correct`.
    """
    completion = sample["completion"]
    if not isinstance(completion, str):
        return "format"
    correct = sample.get("correct")
    if config.require_correct and not correct and not (correct is None and config.keep_ungraded):
        return "incorrect"
    if not follows_format(completion, config.require_format, config.special_token):
        return "format"
    parts = split_reasoning(completion, config.special_token)
    cot = parts[0] if parts is not None else completion
    if config.check_arithmetic and wrong_equations(cot):
        return "wrong_step"
    if config.target_language is not None and mixed_language(cot, config.target_language):
        return "mixed_language"
    if long_paragraph(completion, config.max_paragraph_chars):
        return "long_paragraph"
    if config.drop_code_blocks and code_block(completion):
        return "code_block"
    if config.max_chars and len(completion) > config.max_chars:
        return "too_long"
    return None


def filter_samples(
    samples: Iterable[Mapping[str, Any]], config: FilterConfig = FilterConfig(), *, per_prompt: int = 0
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(kept samples, counts) where counts has "seen", "kept" and one entry per reject reason.

    `per_prompt` > 0 keeps at most that many samples per prompt ("prompt" or "question" key), the
    first ones in order. Deterministic: the order of `samples` is kept.
    """
    kept: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    per: Counter[str] = Counter()
    for sample in samples:
        counts["seen"] += 1
        reason = reject_reason(sample, config)
        prompt = str(sample.get("prompt", sample.get("question", "")))
        if reason is None and config.dedupe:
            key = (prompt, sample["completion"].strip())
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason is None and per_prompt and per[prompt] >= per_prompt:
            reason = "per_prompt_cap"
        if reason is not None:
            counts[reason] += 1
            continue
        per[prompt] += 1
        kept.append(dict(sample))
    counts["kept"] = len(kept)
    return kept, {k: int(counts.get(k, 0)) for k in ("seen", "kept", *REASONS, "per_prompt_cap")}


def language_stats(cots: Sequence[str], target_language: str = "en") -> dict[str, float]:
    """How well a batch of CoTs keeps to the target language.

    consistent_fraction: share of CoTs without a single off-language word (wordless CoTs count as
      consistent): the quantity R1's language reward drives up on the synthetic task, whose CoTs are
      arithmetic plus, when mixed, filler words of another script.
    word_share: R1 eq. 7 pooled over the batch: target-language words / all words (nan without words).
    """
    if not cots:
        return {"consistent_fraction": float("nan"), "word_share": float("nan")}
    scripts = LANGUAGE_SCRIPTS[target_language.lower()]
    consistent, target_words, all_words = 0, 0, 0
    for cot in cots:
        counts = count_words_by_script(cot)
        total = sum(counts.values())
        inside = sum(counts[s] for s in scripts)
        consistent += inside == total
        target_words += inside
        all_words += total
    return {"consistent_fraction": consistent / len(cots),
            "word_share": target_words / all_words if all_words else float("nan")}
