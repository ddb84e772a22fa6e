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
  answer only, and such traces would teach wrong arithmetic. Only whole equations are judged (markdown
  bullets, bold and brackets around one are not part of it); a piece of a longer expression or number
  is skipped, since a false "wrong" drops a good sample.

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
# An integer equation `a op b = c` (op one of + - * ×) within one line, not starting inside a word or a decimal.
# What touches it on either side is judged by `_chained_left` / `_chained_right`.
_EQUATION = re.compile(r"(?<![\w.])(-?\d{1,12})[^\S\n]*([-+*×])[^\S\n]*(-?\d{1,12})[^\S\n]*=[^\S\n]*(-?\d{1,24})")
_ALWAYS_OPS = "/÷^×·⋅−∗"  # never markdown: next to a side of an equation, always a longer expression
_MARK_OPS = "+-–*"  # also markdown: bullets, bold/italic markers, prose dashes
_OPENERS, _CLOSERS = "([{", ")]}"
_LATEX_OP = r"\\(?:times|cdot|div|pm|mp|ast|star|circ|frac|sqrt)(?![A-Za-z])"
# Words that continue an expression as an operator does: `3 x 2+2=8`, `7+5=2 mod 10`.
_MATH_WORDS = frozenset({"x", "X", "times", "plus", "minus", "over", "mod", "modulo", "sqrt", "sin", "cos", "tan",
                         "log", "ln", "exp"})
# The end of an operand (digit, closing bracket, n!, n%, LaTeX symbol such as \pi, one-letter variable), then spaces.
_OPERAND_END = re.compile(r"(?:\d|[)\]}|²³]|(?<=[\d)])[!%]|\\[A-Za-z]+|(?<![^\W\d_])[^\W\d_])[ \t]*$")
# The start of an operand: digit, bracket, LaTeX, signed number, one-letter variable (not `i.e.`), math word.
_OPERAND_START = re.compile(r"[ \t]*(?:[\d(\[{|\\]|[-+−][ \t]*\d|\.\d|[^\W\d_](?![^\W\d_]|\.[^\W\d_])|(?:"
                            + "|".join(sorted(_MATH_WORDS)) + r")(?![^\W\d_]))")
_WINDOW = 256  # characters either side of an equation that are read (bounds the work on a long line)
_LAST_WORD = re.compile(r"([^\W\d_]+)[ \t]*$")
_FIRST_WORD = re.compile(r"[ \t]*([^\W\d_]+)")


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


def _operand_before(s: str) -> bool:
    word = _LAST_WORD.search(s)
    return bool(_OPERAND_END.search(s)) or (word is not None and word.group(1) in _MATH_WORDS)


def _chained_left(text: str, i: int) -> bool:
    """Whether the equation whose `a` (sign included) starts at `text[i]` continues an expression on its left.

    Reads back to the line start, where an operator is a bullet or an emphasis marker; from the previous line
    only an operator that ends it (`3 +` then `2+2=7`) counts."""
    line = text[max(text.rfind("\n", 0, i) + 1, i - _WINDOW):i]
    if text[i] == "-" and _operand_before(line):
        return True  # a binary minus: `x -3+5=2`, `2 -3+5=4`
    # a piece of a bigger number or a product: 1,000 / 10:30 / 1'000 / 1 000 / Step 3 2+2 / (3)2+2 / 3!2+2
    if re.search(r"\d[,:'\u00a0\u2009\u202f]$|\d[ \t]+$|[)\]}|!%²³]$", line):
        return True
    s = line.rstrip(" \t")
    while s and s[-1] in _OPENERS:  # brackets that open before the equation: judge what stands before them
        if len(s) > 1 and (s[-2].isalnum() or s[-2] in "_|" + _CLOSERS):
            return True  # f(2+2=4), (3)(2+2=5): an argument or a factor
        s = s[:-1].rstrip(" \t")
    if re.search(_LATEX_OP + r"[ \t]*$", s):
        return True
    body = s.rstrip(_ALWAYS_OPS + _MARK_OPS)
    run, before = s[len(body):], body.rstrip(" \t")
    if not run:
        if s:  # a word that works as an operator (`3 x 2+2=8`); not a list label (`1) 2+2=5`) or `\quad`
            word = _LAST_WORD.search(s)
            return word is not None and word.group(1) in _MATH_WORDS
        # at the line start: continued only by an operator that ends the previous line
        newline = text.rfind("\n", 0, i)
        prev = text[max(newline - _WINDOW, 0):max(newline, 0)].rstrip(" \t\r")
        return newline > 0 and (prev.endswith(tuple("+" + _ALWAYS_OPS)) or bool(re.search(_LATEX_OP + "$", prev)))
    if any(ch in _ALWAYS_OPS for ch in run):
        return True
    if not before:
        return False  # a bullet (`- 2+2=5`) or an emphasis marker (`**2+2=5**`) at the line start
    if _operand_before(before) or (before == body and (before[-1].isalnum() or before[-1] in "_" + _CLOSERS)):
        return True  # an operand before the operator: 3*2+2=8, x-2+3=1, 3 * 2+2=8 (not `**Step 1:** 2+2=5`)
    if "-" in run or "–" in run:
        # a dash between a prose word and the equation, spaced on both sides: `so - 2+2=5`; after `=` or `:`
        # it may be a sign (`x = - 2+2 = 0`)
        word = _LAST_WORD.search(before)
        return not (word and len(word.group(1)) > 1 and line[len(s):len(s) + 1] in (" ", "\t"))
    return False  # `+` (a unary plus changes nothing) or `*`/`**` emphasis after prose or punctuation


def _chained_right(text: str, j: int) -> bool:
    """Whether the equation whose `c` ends at `text[j]` continues an expression on its right.

    Crosses a line break only for `=` or an operator that is never markdown: a `-`, `+` or `*` that starts
    the next line is a bullet or an emphasis marker."""
    rest = text[j:j + _WINDOW]
    # a piece of a bigger number or a product: 1,000 / 3.5 / 10:30 / 4/5 / 1 000 / 4 1/2 / 5x / 3! / 100% / 2²
    if re.match(r"[\w²³!%|(]|[.,:'/\u00a0\u2009\u202f]\d|[ \t]+\d", rest):
        return True
    r = rest.lstrip(" \t")
    while r[:1] and r[0] in _CLOSERS:  # brackets that close after the equation: judge what follows them
        if re.match(r"[)\]}][\w(\[{]", r):
            return True  # (2+2=5)x, (2+2=5)(3): a factor
        r = r[1:].lstrip(" \t")
    gap = len(r) != len(rest)  # spaces or brackets between c and what follows
    if r[:1] == "\n":
        r = r.lstrip()
        return r.startswith(("=", *_ALWAYS_OPS)) or bool(re.match(_LATEX_OP, r))
    if r.startswith("=") or re.match(_LATEX_OP, r):
        return True
    if r[:1] and r[0] in _OPENERS:  # `2+2=5 (wrong)` is a remark; `2+2=4 (mod 6)`, `2+2=4 (3)` are not
        return bool(_OPERAND_START.match(r[1:]))
    body = r.lstrip(_ALWAYS_OPS + _MARK_OPS)
    run = r[:len(r) - len(body)]
    if not run:
        word = _FIRST_WORD.match(r)
        return word is not None and word.group(1) in _MATH_WORDS  # `2+2=4 x 3`, `7+5=2 mod 10`
    if any(ch in _ALWAYS_OPS for ch in run):
        return True
    if not gap and run.strip("*"):
        return True  # `5-fold`, `5+x`: attached to c
    # `**`/`*` closing emphasis, a dash to a prose remark (`2+2=5 - so`): an operand after it would continue
    return bool(_OPERAND_START.match(body))


def wrong_equations(text: str) -> int:
    """How many integer equations `a op b = c` (+, -, *, ×) in `text` are false.

    Only an equation whose `a op b` and `c` are whole sides is checked: one that is part of a longer
    expression (`2*3+4=10`, `2+3=4+1`, `12/4+1=4`, `3 x 2+2=8`, `7+5=2 mod 10`), of a bigger number
    (`1,000+1=1,001`, `2.5+1=3.5`, `10:30+15=10:45`), of a name (`x2+3=5`, `a_1+2=3`) or that follows a
    binary minus (`x -3+5=3`) is skipped. Markdown around a whole equation does not make it part of one:
    bullets (`- 2+2=5`, `* 2+2=5`), bold/italic (`**2+2=5**`), brackets that enclose it (`(2+2=5)`),
    a remark after a spaced dash or in brackets (`2+2=5 - so`, `2+2=5 (wrong)`), sentence punctuation.
    A leading minus after prose or `=` is a sign (`so -3+5=2` is checked). Errs towards skipping: a false
    "wrong" drops a good sample.
    """
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "×": lambda a, b: a * b}
    wrong, pos = 0, 0
    while m := _EQUATION.search(text, pos):
        pos = m.start(4)  # c may be the a of the next equation (`x = 2+3 = 2+3 = 6`)
        if _chained_left(text, m.start()) or _chained_right(text, m.end()):
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
