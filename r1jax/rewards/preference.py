"""Preference rewards for general prompts (R1's second RL stage), behind a pluggable interface.

R1 scores general (non-reasoning) prompts with reward models of human preference: *helpfulness*
judged on the final summary only ("to minimise interference with the underlying reasoning"), and
*harmlessness* judged on the whole response, reasoning included. Here a preference model is any
object with `score(prompts, responses, **fields) -> list[float | None]` (`PreferenceModel`),
registered by name; `preference_reward(..., model=NAME, scope="summary" | "response")` cuts the
completion to the judged part and asks the model. A trained reward model (a JAX scorer, an HTTP
judge) plugs in with `register_preference_model("my_rm", obj)`.

The embedded default has no reward model, so two rule-based stand-ins are registered:

* `helpfulness_proxy`: with a `reference` reply in the example fields, the token-level F1 overlap of
  the summary with it (what a preference model trained on such replies would favour); without one,
  a shape heuristic (non-empty, not repetitive, not rambling). It is a proxy, not a model of
  human preference.
* `harmlessness_proxy`: 0.0 when the response contains a term from a small block list, else 1.0.

`general_only` / `reasoning_only` wrap any reward so that it judges one kind of prompt (the
example's `kind` field) and answers None for the rest, which `combine` leaves out of the total:
that is how stage 4 applies rule rewards to reasoning prompts and preference rewards to general ones.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from r1jax.data.templates import DEFAULT_SPECIAL_TOKEN
from r1jax.rewards.registry import register_reward

SCOPES = ("summary", "response")
_TOKEN = re.compile(r"\w+", re.UNICODE)


class PreferenceModel(Protocol):
    """Scores responses to prompts; higher is preferred. None where it cannot judge."""

    def score(self, prompts: Sequence[str], responses: Sequence[str], **fields: Any) -> list[float | None]: ...


_MODELS: dict[str, PreferenceModel] = {}


def register_preference_model(name: str, model: PreferenceModel, *, overwrite: bool = False) -> PreferenceModel:
    if name in _MODELS and _MODELS[name] is not model and not overwrite:
        raise ValueError(f"preference model {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(getattr(model, "score", None)):
        raise ValueError(f"preference model {name!r}: {type(model).__name__} has no score(prompts, responses) method")
    _MODELS[name] = model
    return model


def get_preference_model(name: str) -> PreferenceModel:
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown preference model {name!r}; registered: {sorted(_MODELS)}") from None


def summary_of(completion: str, special_token: str = DEFAULT_SPECIAL_TOKEN) -> str:
    """The part after the last special token (R1's summary); the whole text when there is none."""
    return completion.rsplit(special_token, 1)[-1].strip() if special_token in completion else completion.strip()


# ------------------------------------------------------------------------------------ stand-ins


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between two texts (lower-cased word tokens)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class HelpfulnessProxy:
    """Rule-based stand-in for a helpfulness reward model (see the module docstring)."""

    def __init__(self, max_words: int = 64):
        self.max_words = max_words

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, reference: Sequence[Any] | None = None,
              **_: Any) -> list[float | None]:
        refs = list(reference) if reference is not None else [None] * len(responses)
        if len(refs) != len(responses):
            raise ValueError(f"reference has {len(refs)} entries, responses {len(responses)}")
        out: list[float | None] = []
        for response, ref in zip(responses, refs, strict=True):
            if not isinstance(response, str):
                out.append(None)
            elif isinstance(ref, str) and ref.strip():
                out.append(token_f1(response, ref))
            else:
                out.append(self._shape(response))
        return out

    def _shape(self, response: str) -> float:
        words = _tokens(response)
        if not words:
            return 0.0
        distinct = len(set(words)) / len(words)  # 1.0: no repetition
        concise = 1.0 if len(words) <= self.max_words else self.max_words / len(words)
        return distinct * concise


class HarmlessnessProxy:
    """1.0 unless the response contains a block-listed term (0.0)."""

    DEFAULT_BLOCKLIST = ("kill", "weapon", "bomb", "poison", "steal", "hate")

    def __init__(self, blocklist: Sequence[str] = DEFAULT_BLOCKLIST):
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, blocklist)) + r")\w*", re.IGNORECASE)

    def score(self, prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float | None]:
        return [None if not isinstance(r, str) else 0.0 if self.pattern.search(r) else 1.0 for r in responses]


register_preference_model("helpfulness_proxy", HelpfulnessProxy())
register_preference_model("harmlessness_proxy", HarmlessnessProxy())


# ------------------------------------------------------------------------------------ rewards


def preference_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    model: str = "helpfulness_proxy",
    scope: str = "summary",
    special_token: str = DEFAULT_SPECIAL_TOKEN,
    **fields: Any,
) -> list[float | None]:
    """The registered preference `model`'s score of each completion's summary or whole response."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; accepted: {SCOPES}")
    if len(prompts) != len(completions):
        raise ValueError(f"prompts has {len(prompts)} entries, completions {len(completions)}")
    judged = [summary_of(c, special_token) if scope == "summary" and isinstance(c, str) else c for c in completions]
    scores = list(get_preference_model(model).score(list(prompts), judged, **fields))
    if len(scores) != len(completions):
        raise ValueError(f"preference model {model!r} returned {len(scores)} scores for {len(completions)}")
    return scores


def helpfulness_reward(prompts, completions, **fields) -> list[float | None]:
    """R1: helpfulness judged on the summary only."""
    return preference_reward(prompts, completions, **{"model": "helpfulness_proxy", "scope": "summary", **fields})


def harmlessness_reward(prompts, completions, **fields) -> list[float | None]:
    """R1: harmlessness judged on the whole response (reasoning and summary)."""
    return preference_reward(prompts, completions, **{"model": "harmlessness_proxy", "scope": "response", **fields})


def _only(kind_wanted: str, fn, prompts, completions, *, kind: Sequence[Any] | None = None, **fields):
    kinds = list(kind) if kind is not None else ["reasoning"] * len(completions)
    if len(kinds) != len(completions):
        raise ValueError(f"kind has {len(kinds)} entries, completions {len(completions)}")
    idx = [i for i, k in enumerate(kinds) if (k or "reasoning") == kind_wanted]
    out: list[float | None] = [None] * len(completions)
    if not idx:
        return out
    sub = {k: [v[i] for i in idx] if isinstance(v, list | tuple) and len(v) == len(completions) else v
           for k, v in fields.items()}
    scores = fn([prompts[i] for i in idx], [completions[i] for i in idx], **sub)
    for i, s in zip(idx, scores, strict=True):
        out[i] = s
    return out


def only_for(kind: str, fn) -> Any:
    """`fn` judging only examples whose `kind` field is `kind` (missing kind = "reasoning"); None elsewhere.

    A `functools.partial` of a module-level function, so it pickles into a `RewardPool`.
    """
    return functools.partial(_only, kind, fn)


def r1_language_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    target_language: str | Sequence[str] | None = None,
    question: Sequence[str | None] | None = None,
    no_words: float | None = 1.0,
    special_token: str = DEFAULT_SPECIAL_TOKEN,
    **_: Any,
) -> list[float | None]:
    """R1 eq. 7 on the CoT of R1-format completions: target-language words / words in the reasoning
    (the target language as `language_consistency_reward` resolves it).

    The CoT is the text between the two special tokens (R1's format), else the `<think>` block, else
    the whole completion. A CoT with no words at all scores `no_words` (None: not judged). On the
    synthetic task a clean CoT is pure arithmetic (no words) and a mixed one holds filler words of
    another script (share 0); scored None, the clean CoT would merely drop the component and a
    mixed one would lose nothing against it, so eq. 7 would not separate them.
    """
    from r1jax.data.templates import parse_cold_start
    from r1jax.rewards.language import chain_of_thought, language_consistency, target_languages

    out: list[float | None] = []
    for completion, language in zip(completions, target_languages(prompts, len(completions), target_language,
                                                                    question), strict=True):
        if not isinstance(completion, str):
            out.append(None)
            continue
        parts = parse_cold_start(completion, special_token=special_token)
        cot = parts[0] if parts is not None else chain_of_thought(completion)
        share = language_consistency(cot, language)
        out.append(no_words if share is None else share)
    return out


register_reward("preference", preference_reward)
register_reward("helpfulness", helpfulness_reward)
register_reward("harmlessness", harmlessness_reward)
register_reward("language_r1", r1_language_reward)
