"""The embedded-default reasoning task: seeded multi-step arithmetic and countdown-lite problems.

Built for the laptop demo (a ~1-5M-parameter model pretrained for minutes on CPU, then GRPO):

* **arithmetic**: "Compute (7 + 5) * 3 - 4" → "32". A chain of 2-3 operations on one-digit operands,
  evaluated left to right, with parentheses printed where precedence would differ, every
  intermediate value in [0, max_value].
* **countdown**: "Using the numbers 3, 7, 5, make 36 with + - * (each number once)" → "(7+5)*3".
  Any expression that uses each number once and hits the target is correct (checked by the
  countdown reward); `answer` holds the generator's own solution.

Two design choices carry the demo:

1. **Splits never overlap, whatever the seed or size.** A problem's split is a function of a hash
   of its canonical key (for countdown: the sorted numbers and the target), so train and held-out
   are disjoint by construction; each split is then sampled with the seed and de-duplicated.
2. **The pretraining corpus is deliberately imperfect.** `corpus(n, correct_fraction=…)` mixes
   worked solutions in the R1-Zero format with arithmetic slips, truncated chains, unformatted plain
   text and answer-only replies, so that the base model's pass@1 is well below 100%, its responses
   are often short, and RL has something to fix (accuracy and format rewards, longer reasoning).
   `mix_fraction` puts a few filler words of another script into correct traces only, which makes
   language mixing *pay* under an accuracy-only reward: the task issue 8's language-consistency
   reward has to fight.

Numbers are written as plain digits; the sentencepiece tokenizer splits them into single digits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from typing import Any

from r1jax.data.templates import format_prompt, format_response

TASKS = ("arithmetic", "countdown")
SPLITS = ("train", "test")
NOISE_KINDS = ("slip", "truncated", "unformatted", "no_think")

# Filler words of another script, inserted between reasoning steps by the language-mixing knob.
FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "ru": ("итак", "значит", "тогда", "далее"),
    "zh": ("所以", "然后", "因此", "接着"),
}

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Knobs of the synthetic task (the defaults are the laptop demo's).

    Attributes:
      task: "arithmetic" or "countdown".
      min_steps, max_steps: number of binary operations per problem (operands = steps + 1).
      max_operand: operands are drawn from 1..max_operand.
      max_value: every intermediate and final value lies in [0, max_value].
      ops: the operators allowed, a string over "+-*".
      held_out_fraction: share of the problem space (by key hash) reserved for the "test" split.
    """

    task: str = "arithmetic"
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-*"
    held_out_fraction: float = 0.1

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps={self.min_steps} <= max_steps={self.max_steps}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError(f"need 1 <= max_operand={self.max_operand} <= max_value={self.max_value}")
        if not self.ops or set(self.ops) - set(_OPS):
            raise ValueError(f"ops={self.ops!r} must be a non-empty string over '+-*'")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction} must lie in (0, 1)")


# ---------------------------------------------------------------------------------------------
# Problems


def _render(numbers: Sequence[int], ops: Sequence[str], *, spaced: bool) -> str:
    """Infix text of the left-to-right chain, parenthesised only where precedence would differ."""
    sep = " " if spaced else ""
    text, low_precedence = str(numbers[0]), False
    for op, b in zip(ops, numbers[1:], strict=True):
        if op == "*" and low_precedence:
            text = f"({text})"
        text = f"{text}{sep}{op}{sep}{b}"
        low_precedence = op in "+-"
    return text


def _chain(numbers: Sequence[int], ops: Sequence[str]) -> list[list[Any]]:
    steps, value = [], numbers[0]
    for op, b in zip(ops, numbers[1:], strict=True):
        result = _OPS[op](value, b)
        steps.append([value, op, b, result])
        value = result
    return steps


def problem_key(example: dict[str, Any]) -> str:
    """Canonical identity of a problem: two examples with one key are the same problem."""
    if example["task"] == "countdown":
        return f"countdown:{sorted(example['numbers'])}:{example['target']}"
    return f"arithmetic:{example['question']}"


def split_of(key: str, held_out_fraction: float = TaskSpec.held_out_fraction) -> str:
    """ "test" for a fixed, seed-independent share of keys (by SHA-256), else "train"."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return "test" if bucket < held_out_fraction else "train"


def _sample(rng: random.Random, spec: TaskSpec) -> dict[str, Any] | None:
    n_steps = rng.randint(spec.min_steps, spec.max_steps)
    numbers = [rng.randint(1, spec.max_operand) for _ in range(n_steps + 1)]
    ops = [rng.choice(spec.ops) for _ in range(n_steps)]
    steps = _chain(numbers, ops)
    if any(not 0 <= step[3] <= spec.max_value for step in steps):
        return None
    value = steps[-1][3]
    if spec.task == "arithmetic":
        example = {
            "task": "arithmetic",
            "question": f"Compute {_render(numbers, ops, spaced=True)}",
            "answer": str(value),
            "numbers": numbers,
            "target": value,
        }
    else:
        shown = list(numbers)
        rng.shuffle(shown)
        example = {
            "task": "countdown",
            "question": f"Using the numbers {', '.join(map(str, shown))}, make {value} with "
            f"{' '.join(spec.ops)} (each number once)",
            "answer": _render(numbers, ops, spaced=False),
            "numbers": shown,
            "target": value,
        }
    example["steps"] = steps
    return example


def generate(split: str, n: int, seed: int = 0, spec: TaskSpec = TaskSpec()) -> list[dict[str, Any]]:
    """`n` distinct problems of one split, a pure function of (split, n, seed, spec).

    Each example: {"id", "task", "question", "answer", "numbers", "target", "steps"}, where steps is
    the worked chain [[a, op, b, a op b], …] that `solution_trace` writes out. Lists of length n
    and n' with one seed share their common prefix.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(f"r1jax.synthetic:{spec.task}:{split}:{seed}")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    # Give up after a long run of draws with nothing new: the split's problem space is exhausted.
    stale, max_stale = 0, 20_000
    while len(out) < n:
        stale += 1
        if stale > max_stale:
            raise ValueError(
                f"only {len(out)} distinct {split} problems found for n={n} ({max_stale} draws in a row "
                f"gave nothing new); enlarge the problem space ({spec}) or ask for fewer"
            )
        example = _sample(rng, spec)
        if example is None:
            continue
        key = problem_key(example)
        if key in seen or split_of(key, spec.held_out_fraction) != split:
            continue
        stale = 0
        seen.add(key)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        out.append({"id": f"{spec.task}-{split}-{digest}", **example})
    return out


# ---------------------------------------------------------------------------------------------
# Worked solutions


def reasoning_steps(example: dict[str, Any]) -> list[str]:
    """The chain as compact equations: ["7+5=12", "12*3=36", "36-4=32"]."""
    return [f"{a}{op}{b}={c}" for a, op, b, c in example["steps"]]


def _join_steps(steps: Sequence[str], mix_language: str | None, rng: random.Random | None) -> str:
    if mix_language is None:
        return ", ".join(steps)
    if mix_language not in FILLER_WORDS:
        raise ValueError(f"mix_language={mix_language!r} must be one of {sorted(FILLER_WORDS)} or None")
    rng = rng or random.Random(0)
    words = FILLER_WORDS[mix_language]
    # At least one filler word, so a "mixed" trace is always detectably mixed.
    forced = rng.randrange(1, len(steps)) if len(steps) > 1 else 0
    parts = []
    for i, step in enumerate(steps):
        if i == forced or (i > 0 and rng.random() < 0.5):
            step = f"{rng.choice(words)} {step}"
        parts.append(step)
    return ", ".join(parts)


def solution_trace(
    example: dict[str, Any],
    *,
    template: str = "r1_zero",
    mix_language: str | None = None,
    rng: random.Random | None = None,
) -> str:
    """The correct worked solution as a completion in the template's format.

    r1_zero: "<think> 7+5=12, 12*3=36, 36-4=32 </think> <answer> 32 </answer>"
    r1:      "|special_token| 7+5=12, 12*3=36, 36-4=32 |special_token| The answer is \\boxed{32}."

    `mix_language` ("ru" or "zh") inserts filler words of that script between steps (drawn from
    `rng`), the language-mixing hook for issue 8.
    """
    reasoning = _join_steps(reasoning_steps(example), mix_language, rng)
    if template == "r1":
        return format_response("r1", reasoning, summary_text(example["answer"]))
    return format_response(template, reasoning, example["answer"])


def summary_text(answer: str) -> str:
    """The R1-format summary of a synthetic solution."""
    return f"The answer is \\boxed{{{answer}}}."


def _noisy_trace(example: dict[str, Any], kind: str, rng: random.Random, template: str) -> str:
    steps, task = example["steps"], example["task"]
    if kind == "truncated" and len(steps) < 2:
        kind = "slip"
    if kind == "unformatted":
        text = ", ".join(reasoning_steps(example))
        return f"{text}. The answer is {example['answer']}"
    if kind == "no_think":
        if template == "r1":
            return summary_text(example["answer"])
        return f"<answer> {example['answer']} </answer>"
    if kind == "truncated":
        kept = steps[:-1]
        partial = {**example, "steps": kept}
        if task == "countdown":
            answer = _render([kept[0][0]] + [s[2] for s in kept], [s[1] for s in kept], spaced=False)
        else:
            answer = str(kept[-1][3])
        return solution_trace({**partial, "answer": answer}, template=template)
    if kind == "slip":
        i = rng.randrange(len(steps))
        if task == "arithmetic":
            # A wrong result at step i, carried forward correctly: a self-consistent wrong chain.
            wrong = [list(s) for s in steps]
            delta = rng.choice((-2, -1, 1, 2, 10))
            wrong[i][3] += delta if wrong[i][3] + delta >= 0 else abs(delta)
            for j in range(i + 1, len(wrong)):
                wrong[j][0] = wrong[j - 1][3]
                wrong[j][3] = _OPS[wrong[j][1]](wrong[j][0], wrong[j][2])
            return solution_trace({**example, "steps": wrong, "answer": str(wrong[-1][3])}, template=template)
        # Countdown: a wrong operator at step i; the expression then misses the target.
        numbers = [steps[0][0]] + [s[2] for s in steps]
        ops = [s[1] for s in steps]
        for op in rng.sample([op for op in "+-*" if op != ops[i]], 2):
            wrong_ops = [*ops[:i], op, *ops[i + 1 :]]
            wrong = _chain(numbers, wrong_ops)
            if wrong[-1][3] != example["target"]:
                break
        ops = wrong_ops
        return solution_trace(
            {**example, "steps": wrong, "answer": _render(numbers, ops, spaced=False)}, template=template
        )
    raise ValueError(f"noise kind={kind!r} must be one of {NOISE_KINDS}")


def corpus_pairs(
    n: int,
    seed: int = 0,
    *,
    correct_fraction: float = 0.5,
    noise_kinds: Sequence[str] = NOISE_KINDS,
    mix_fraction: float = 0.0,
    mix_language: str = "zh",
    template: str = "r1_zero",
    spec: TaskSpec = TaskSpec(),
) -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs over *train-split* problems; `corpus` joins them with a space.

    Args:
      n: number of pairs (problems are drawn from `generate("train", n, seed)`).
      correct_fraction: share of pairs whose completion is the correct worked solution; the rest
        use one of `noise_kinds`, uniformly (repeat a kind to weight it): "slip" (a wrong step
        carried forward, or a wrong countdown operator), "truncated" (one step short, answering an
        intermediate value), "unformatted" (the right chain as plain text, no tags), "no_think"
        (the answer alone).
      mix_fraction: share of the *correct* completions whose reasoning carries filler words in
        `mix_language` (so mixing correlates with correctness; see the module docstring).
      template: the prompt/response format ("r1_zero" or "r1").
    """
    if not 0.0 <= correct_fraction <= 1.0 or not 0.0 <= mix_fraction <= 1.0:
        raise ValueError(
            f"correct_fraction={correct_fraction} and mix_fraction={mix_fraction} must lie in [0, 1]"
        )
    if correct_fraction < 1.0 and (not noise_kinds or set(noise_kinds) - set(NOISE_KINDS)):
        raise ValueError(f"noise_kinds={tuple(noise_kinds)} must be a non-empty subset of {NOISE_KINDS}")
    rng = random.Random(f"r1jax.synthetic.corpus:{seed}")
    pairs = []
    for example in generate("train", n, seed, spec):
        if rng.random() < correct_fraction:
            mix = mix_language if rng.random() < mix_fraction else None
            completion = solution_trace(example, template=template, mix_language=mix, rng=rng)
        else:
            completion = _noisy_trace(example, rng.choice(tuple(noise_kinds)), rng, template)
        pairs.append((format_prompt(template, example["question"]), completion))
    return pairs


def corpus(n: int, seed: int = 0, *, template: str | None = "r1_zero", **options: Any) -> list[str]:
    """`n` pretraining texts over *train-split* problems: prompt + (possibly flawed) completion.

    `options` are `corpus_pairs`' keyword arguments; `template=None` gives the (r1_zero) completions alone.
    """
    pairs = corpus_pairs(n, seed, template=template or "r1_zero", **options)
    return [completion if template is None else f"{prompt} {completion}" for prompt, completion in pairs]


def evaluate_chain(steps: Sequence[Sequence[Any]]) -> int:
    """Recompute a chain's final value from its operands and operators (ignoring written results)."""
    value = steps[0][0]
    for _, op, b, _ in steps:
        value = _OPS[op](value, b)
    return value
