"""Language consistency reward (DeepSeek-R1, eq. 7): the share of the CoT's words in the target language.

Languages are told apart by Unicode script, which is what language mixing in R1-Zero looks like
(English and Chinese interleaved in one chain of thought); languages sharing a script (English and
French) are indistinguishable here, and "en" means "Latin script".

Counting rules, chosen so that math does not count as any language:
- `$…$`, `$$…$$`, `\\(…\\)`, `\\[…\\]`, LaTeX commands, `\\begin{…}`/`\\end{…}`, fenced code, digits and
  punctuation are neutral (dropped before counting);
- a run of letters of one script is one word, except Han and kana: each character is one word
  (Chinese and Japanese are written without spaces);
- a single Latin or Greek letter on its own (`x`, `α`) is a variable, not a word: neutral.

The CoT is the text inside `<think>…</think>`; with `<think>` prefilled in the prompt, the text
before `</think>`; with no tags, the whole completion. No words in the CoT gives None (excluded).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0300-\u036f\u1e00-\u1eff"
_SCRIPTS = {
    "latin": f"[{_LATIN}]+",
    "han": "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]",
    "kana": "[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9d]",
    "hangul": "[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]+",
    "cyrillic": "[\u0400-\u052f]+",
    "arabic": "[\u0620-\u065f\u066e-\u06d3\u06d5-\u06ef\u06fa-\u06ff\u0750-\u077f"
              "\ufb50-\ufdff\ufe70-\ufefc]+",
    "greek": "[\u0370-\u037d\u037f-\u0386\u0388-\u03ff\u1f00-\u1fff]+",
    "hebrew": "[\u05d0-\u05ea\u05f0-\u05f2]+",
    "devanagari": "[\u0900-\u0963\u0970-\u097f]+",
    "thai": "[\u0e01-\u0e4f\u0e5a\u0e5b]+",
}
_WORD = re.compile("|".join(f"(?P<{name}>{pattern})" for name, pattern in _SCRIPTS.items()))
_SINGLE_LETTER_NEUTRAL = ("latin", "greek")

# Target language -> scripts whose words count as that language.
LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    **{code: ("latin",) for code in ("en", "fr", "de", "es", "it", "pt", "nl", "vi", "tr", "id", "pl")},
    "zh": ("han",),
    "ja": ("han", "kana"),
    "ko": ("hangul", "han"),
    **{code: ("cyrillic",) for code in ("ru", "uk", "bg", "sr", "kk")},
    "ar": ("arabic",),
    "fa": ("arabic",),
    "el": ("greek",),
    "he": ("hebrew",),
    "hi": ("devanagari",),
    "th": ("thai",),
    **{script: (script,) for script in _SCRIPTS},
}
_SCRIPT_LANGUAGE = {"latin": "en", "han": "zh", "hangul": "ko", "cyrillic": "ru", "arabic": "ar",
                    "greek": "el", "hebrew": "he", "devanagari": "hi", "thai": "th"}
# A non-Latin script must hold this share of a prompt's words to be the target: templates are English.
DETECTION_SHARE = 0.1

_LATEX_ENV = re.compile(r"\\(?:begin|end)\s*\{[^{}]{0,64}\}")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+|\\.")


def _drop_delimited(text: str, opener: str, closer: str) -> str:
    """Remove every `opener … closer` span, scanning once; an unclosed opener is kept as text."""
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(opener, pos)
        if start < 0:
            break
        end = text.find(closer, start + len(opener))
        if end < 0:
            break
        out.append(text[pos:start])
        out.append(" ")
        pos = end + len(closer)
    out.append(text[pos:])
    return "".join(out)


def strip_math(text: str) -> str:
    """`text` without math and code: the parts that belong to no language."""
    text = _drop_delimited(text, "```", "```")
    text = text.replace("\\$", " ")
    text = _drop_delimited(text, "$$", "$$")
    text = _drop_delimited(text, "$", "$")
    text = _drop_delimited(text, "\\[", "\\]")
    text = _drop_delimited(text, "\\(", "\\)")
    text = _LATEX_ENV.sub(" ", text)
    return _LATEX_CMD.sub(" ", text)


def count_words_by_script(text: str) -> Counter[str]:
    """Words per script in `text` after `strip_math` (see the module docstring for what a word is)."""
    counts: Counter[str] = Counter()
    for m in _WORD.finditer(strip_math(text)):
        script = m.lastgroup
        assert script is not None
        if script in _SINGLE_LETTER_NEUTRAL and m.end() - m.start() == 1:
            continue
        counts[script] += 1
    return counts


@functools.lru_cache(maxsize=4096)
def detect_language(prompt: str) -> str:
    """The prompt's language, by script: a non-Latin script with >= 10% of the words, else "en".

    Japanese wins over Chinese when kana are present (Han characters then count as Japanese).
    """
    counts = count_words_by_script(prompt)
    total = sum(counts.values())
    if total == 0:
        return "en"
    if counts["kana"] and (counts["kana"] + counts["han"]) >= DETECTION_SHARE * total:
        return "ja"
    others = [(n, s) for s, n in counts.items() if s not in ("latin", "kana")]
    if others:
        n, script = max(others)
        if n >= DETECTION_SHARE * total:
            return _SCRIPT_LANGUAGE[script]
    return "en"


def chain_of_thought(completion: str, open_tag: str = "<think>", close_tag: str = "</think>") -> str:
    """The reasoning part of a completion (see the module docstring)."""
    start = completion.find(open_tag)
    if start >= 0:
        body = completion[start + len(open_tag) :]
        end = body.find(close_tag)
        return body if end < 0 else body[:end]
    end = completion.find(close_tag)
    return completion if end < 0 else completion[:end]


def language_consistency(cot: str, target_language: str) -> float | None:
    """Share of the words of `cot` written in `target_language`'s script(s); None if it has no words."""
    scripts = LANGUAGE_SCRIPTS.get(target_language.lower())
    if scripts is None:
        raise ValueError(f"target_language={target_language!r}; known: {sorted(LANGUAGE_SCRIPTS)}")
    counts = count_words_by_script(cot)
    total = sum(counts.values())
    if total == 0:
        return None
    return sum(counts[s] for s in scripts) / total


def language_consistency_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target_language: str | Sequence[str] | None = None,
    question: Sequence[str | None] | None = None,
    **_: Any,
) -> list[float | None]:
    """R1 eq. 7, in [0, 1]: target-language words / words in the CoT. None where the CoT has no words.

    `target_language`: a code from `LANGUAGE_SCRIPTS` ("en", "zh", "ja", "ko", "ru", "ar", …) for all
    samples, a list with one per sample, or None to detect it from each sample's `question` (the
    record's field, which the trainer passes), else from its prompt. The question, not the prompt: the
    R1-Zero template alone holds 59 English words, which outvote a short question in another script.
    """
    languages = target_languages(prompts, len(completions), target_language, question)
    return [language_consistency(chain_of_thought(c), language) if isinstance(c, str) else None
            for c, language in zip(completions, languages, strict=True)]


def target_languages(prompts: Sequence[str], n: int, target_language: str | Sequence[str] | None,
                     question: Sequence[str | None] | None = None) -> list[str]:
    """Each of n samples' target language: `target_language` (one for all, or one each), else detected
    from the sample's question, else from its prompt (see `language_consistency_reward`)."""
    if len(prompts) != n:
        raise ValueError(f"prompts has {len(prompts)} entries, completions {n}")
    for name, values in (("target_language", target_language), ("question", question)):
        if values is not None and not isinstance(values, str) and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, completions {n}")
    targets = [target_language] * n if target_language is None or isinstance(target_language, str) else target_language
    if question is not None:
        prompts = [q if isinstance(q, str) else p for q, p in zip(question, prompts, strict=True)]
    return [target or detect_language(source if isinstance(source, str) else "")
            for target, source in zip(targets, prompts, strict=True)]
