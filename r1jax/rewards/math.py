"""Math answers: extraction, grading and the accuracy reward.

`extract_answer` takes the final answer out of a completion (the last `<answer>…</answer>`, else the
last `\\boxed{…}` / `\\fbox{…}`, else GSM8K's `#### n`); `grade` decides whether a prediction equals a
gold answer; `accuracy_reward` is the rule reward built from the two.

Two choices behind `grade`:
- A cheap normaliser runs first (commas in numbers, `$`, `\\text{}`, trailing `.0`, `\\dfrac`, exact
  fractions, …); math-verify (sympy) runs only when the normaliser does not already agree. Most
  GSM8K-style answers never reach sympy.
- math-verify's own timeouts use `signal.alarm`, which raises `ValueError` outside the main thread
  (the bug that hit verl and TRL). We call it with its timeouts off and bound it ourselves with
  `r1jax.rewards.deadline` (an interval timer in the main thread, a killable helper process from
  any other thread). Answers longer than `MAX_ANSWER_CHARS` never reach sympy.
"""

from __future__ import annotations

import functools
import logging
import numbers
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from r1jax.rewards.deadline import call_with_deadline

DEFAULT_TIMEOUT = 5.0
MAX_ANSWER_CHARS = 1_000
# Tail of an unmarked completion handed to math-verify's own extraction (see `accuracy_reward`).
_UNMARKED_TAIL_CHARS = 300

# --------------------------------------------------------------------------------------------
# Extraction


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at `text[start] == "{"` and the index after it.

    `\\{` and `\\}` are literal braces in LaTeX and do not open or close a group. None if unclosed.
    """
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` or `\\fbox{…}` (nested braces), or `\\boxed 5`; None if unclosed."""
    pos = -1
    cmd = ""
    for name in ("\\boxed", "\\fbox"):
        p = text.rfind(name)
        if p > pos:
            pos, cmd = p, name
    if pos < 0:
        return None
    i = pos + len(cmd)
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        got = _braced(text, i)
        if got is None:
            return None
        content = got[0].strip()
        return content or None
    if i > pos + len(cmd):  # `\boxed 5`: the token after the space, up to `$` or whitespace
        m = re.match(r"[^\s$]+", text[i : i + MAX_ANSWER_CHARS])
        return m.group(0) if m else None
    return None


def extract_answer(text: str) -> str | None:
    """The final answer written in `text`, or None.

    Order: the last complete `<answer>…</answer>` (if it holds a `\\boxed{}`, that box's content), else
    the last `\\boxed{…}` / `\\fbox{…}` (an unclosed last box gives None), else the text after the
    last GSM8K `####` on its line. Linear in `len(text)`; no regular expression can backtrack.
    """
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end >= 0:
        start = text.rfind("<answer>", 0, end)
        if start >= 0:
            content = text[start + len("<answer>") : end].strip()
            if "\\boxed" in content or "\\fbox" in content:
                boxed = last_boxed(content)
                if boxed is not None:
                    return boxed
            return content or None
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text)
    pos = text.rfind("####")
    if pos >= 0:
        line_end = text.find("\n", pos)
        content = text[pos + 4 : line_end if line_end >= 0 else len(text)].strip()
        return content or None
    return None


# --------------------------------------------------------------------------------------------
# Fallback normaliser

_UNITS = (
    "dollars|dollar|cents|cent|units|unit|cm|mm|km|m|meters|meter|inches|inch|feet|foot|ft|miles|mile|"
    "hours|hour|minutes|minute|mins|seconds|second|days|day|weeks|week|years|year|degrees|degree|"
    "pounds|pound|lbs|kg|grams|gram|g|liters|liter|ml|people|students|percent|sq|square"
)
_UNIT_SUFFIX = re.compile(rf"^(-?[\d.,/]+)\s*(?:(?:{_UNITS})\b\.?\s*)+$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3})((?:,\d{3})+)(?![\d])")
_SIMPLE_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")
_SLASH_FRAC = re.compile(r"^(-?\d+)/(\d+)$")


def _fix_frac_shorthand(s: str) -> str:
    # \frac12 -> \frac{1}{2}; \frac1{2} -> \frac{1}{2}; \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def normalize_answer(answer: str) -> str:
    """A canonical string for simple answers (MATH's `strip_string` plus GSM8K clean-up).

    Used only as a fast path and a fallback to math-verify: two answers with equal normal forms
    are equal. Lower-cases, drops `$`, `\\!`, `\\left`/`\\right`, degree signs, `%`, `\\text{}` wrappers,
    thousands separators, whitelisted unit words after a number, a leading `x =`, spaces, a trailing
    period and trailing zeros after a decimal point.
    """
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\ ", " ").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    for _ in range(3):  # nested wrappers, bounded
        s2 = _TEXT_CMD.sub(r"\1", s)
        if s2 == s:
            break
        s = s2
    s = s.strip().rstrip(".").strip()
    s = _THOUSANDS.sub(lambda m: m.group(1) + m.group(2).replace(",", ""), s)
    s = s.lower()
    m = _UNIT_SUFFIX.match(s)
    if m:
        s = m.group(1)
    s = re.sub(r"^[a-z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"^\(\s*(-?[\d.]+|[a-z])\s*\)$", r"\1", s)  # "(073)" -> "073", "(c)" -> "c"
    s = _fix_frac_shorthand(s)
    s = s.replace(" ", "")
    s = s.rstrip(".")
    if _NUMBER.match(s) and "." in s:
        s = s.rstrip("0").rstrip(".")
        if s.startswith("."):
            s = "0" + s
        elif s.startswith("-."):
            s = "-0" + s[1:]
        if s in ("", "-", "-0"):
            s = "0"
    return s


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised integer, decimal, `a/b` or `\\frac{a}{b}`; None otherwise."""
    if len(s) > 64:
        return None
    try:
        if _NUMBER.match(s):
            return Fraction(s)
        m = _SLASH_FRAC.match(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _SIMPLE_FRAC.match(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def vote_key(answer: str | None) -> str | None:
    """The key majority voting (cons@k) groups answers by: the normal form, or the exact value where it
    has one, so that "18", "\\$18" and "18.00", or "1/2", "0.5" and "\\frac{1}{2}", are one vote."""
    if answer is None:
        return None
    key = normalize_answer(answer)
    value = _as_fraction(key)
    return key if value is None else str(value)


def voting_answer(completion: str) -> str | None:
    """A completion's final answer as majority voting counts it: `vote_key(extract_answer(completion))`."""
    return vote_key(extract_answer(completion))


def _normalised_verdict(prediction: str, gold: str) -> bool | None:
    """True/False when the normal forms settle it, None when sympy must decide.

    Equal normal forms, or equal exact values, are equal. Two integers or fractions (no decimal
    point: math-verify compares decimals after rounding; no percent sign, which the normal form
    drops) with different values are not.
    """
    p, g = normalize_answer(prediction), normalize_answer(gold)
    if p == g:
        return bool(p) or None
    fp, fg = _as_fraction(p), _as_fraction(g)
    if fp is None or fg is None:
        return None
    if fp == fg:
        return True
    if "%" in prediction or "%" in gold:  # the normal form dropped a percent sign: 50% may be 1/2
        return None
    return False if "." not in p and "." not in g else None


# --------------------------------------------------------------------------------------------
# math-verify, with our own timeouts


def _quiet_math_verify() -> None:
    # math-verify logs a warning whenever its own timeouts are off; ours are on.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=8192)
def _parse(answer: str) -> tuple[Any, ...]:
    """math-verify's parse of a bare answer: boxed so that LaTeX without `$` is recognised."""
    from math_verify import parse

    _quiet_math_verify()
    parsed: list[Any] = []
    if _braced("{" + answer + "}", 0) == (answer, len(answer) + 2):  # braces balanced
        parsed = parse("\\boxed{" + answer + "}", parsing_timeout=None)
    if not any(not isinstance(p, str) for p in parsed):
        # e.g. prose with the expression inside: let math-verify find it (no boxing).
        raw = parse(answer, parsing_timeout=None)
        if any(not isinstance(p, str) for p in raw):
            parsed = raw
    return tuple(parsed)


def _math_verify_equal(prediction: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed = _parse(gold)
    pred_parsed = _parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


def _math_verify_text(text: str, gold: str) -> bool:
    """math-verify's own extraction on free text (no marker): its last expression vs gold."""
    from math_verify import parse, verify

    _quiet_math_verify()
    gold_parsed = _parse(gold)
    pred_parsed = parse(text, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), pred_parsed, timeout_seconds=None))


def grade(prediction: str | None, gold: str | None, timeout: float | None = DEFAULT_TIMEOUT) -> bool:
    """Whether `prediction` is mathematically equal to `gold` (both bare answers, e.g. `"\\frac{1}{2}"`).

    The normaliser's verdict first (equal forms, or two exact numbers), then math-verify (sympy:
    numeric and symbolic equality, sets, intervals, matrices, equations) under a `timeout`-second
    bound that works in any thread; a timeout, a parse failure or an error counts as not equal.
    `timeout=None` lifts the bound. In the main thread the bound is a signal, which C code holding
    the GIL would delay; `RewardPool`'s per-sample kill is the backstop for that.
    """
    if not isinstance(prediction, str) or not isinstance(gold, str):
        return False
    prediction, gold = prediction.strip(), gold.strip()
    if not prediction or not gold:
        return False
    verdict = _normalised_verdict(prediction, gold)
    if verdict is not None:
        return verdict
    if len(prediction) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    try:
        return call_with_deadline(_math_verify_equal, (prediction, gold), timeout)
    except Exception:  # TimeoutError, sympy errors, RecursionError: not equal
        return False


def grade_completion(
    completion: str, gold: str, timeout: float | None = DEFAULT_TIMEOUT, require_marker: bool = False
) -> bool:
    """Grade a whole completion: `extract_answer`, then `grade`.

    With no marker (`<answer>`, `\\boxed`, `####`) and `require_marker=False`, math-verify's own
    extraction reads the completion's last `_UNMARKED_TAIL_CHARS` characters (its last expression).
    """
    if not isinstance(completion, str) or not isinstance(gold, str):
        return False
    prediction = extract_answer(completion)
    if prediction is not None:
        return grade(prediction, gold, timeout)
    if require_marker or "\\boxed" in completion or "\\fbox" in completion:
        return False  # an unclosed box is a malformed answer, not an unmarked one
    tail = completion[-_UNMARKED_TAIL_CHARS:]
    try:
        return call_with_deadline(_math_verify_text, (tail, gold.strip()), timeout)
    except Exception:
        return False


def accuracy_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    answer: Sequence[Any],
    timeout: float | None = DEFAULT_TIMEOUT,
    require_marker: bool = False,
    **_: Any,
) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0; None where the gold is
    missing or empty (cannot judge). Gold answers may be numbers (AMC's `27.0`) or strings.
    """
    if len(answer) != len(completions):
        raise ValueError(f"answer has {len(answer)} entries, completions {len(completions)}")
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = _gold_text(gold)
        if gold_text is None:
            scores.append(None)
            continue
        ok = grade_completion(completion, gold_text, timeout=timeout, require_marker=require_marker)
        scores.append(1.0 if ok else 0.0)
    return scores


def _gold_text(gold: Any) -> str | None:
    if isinstance(gold, bool) or gold is None:
        return None
    if isinstance(gold, numbers.Integral):  # int, NumPy integers (a column of a NumPy batch)
        return str(int(gold))
    if isinstance(gold, numbers.Real):
        gold = float(gold)
        return str(int(gold)) if gold.is_integer() else repr(gold)
    if isinstance(gold, str):
        text = gold.strip()
        if "####" in text:  # a whole GSM8K answer passed as gold
            text = extract_answer(text) or ""
        return text or None
    return None
