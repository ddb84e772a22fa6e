"""A small synthetic stand-in for R1's non-reasoning data: short requests answered without a CoT.

R1's rejection-sampling SFT mixes ~200k non-reasoning samples (writing, factual QA, translation…)
into the reasoning data, "for simpler queries, such as 'hello', we do not provide a CoT in
response"; its last RL stage adds general prompts judged by preference reward models. On the
embedded default there is no such data, so this module makes seeded requests with one reference
reply each, e.g.

    "Say hello."                       → "Hello! How can I help you?"
    "Which is larger, 7 or 12?"        → "12"
    "Count from 3 to 6."               → "3, 4, 5, 6"

Records look like the reasoning task's (`question`, `id`) plus `kind="general"` and `reference`;
`answer` is None so rule rewards answer None (not judged) for them. Train and held-out splits are
disjoint by a hash of the question, as for the synthetic reasoning task.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from r1jax.data.synthetic import split_of

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_GREETINGS = (("Say hello.", "Hello! How can I help you?"), ("Greet the user.", "Hello! Nice to meet you."),
              ("Say thank you.", "Thank you!"), ("Say goodbye.", "Goodbye! Have a nice day."))


def _request(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(_GREETINGS)
    if kind == 1:
        numbers = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        text = " ".join(map(str, numbers))
        return f"Repeat the numbers {text}.", text
    if kind == 2:
        a, b = rng.sample(range(1, 99), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    if kind == 3:
        n = rng.randint(0, 10)
        return f"Write {n} in words.", _WORDS[n]
    a = rng.randint(1, 9)
    b = a + rng.randint(2, 4)
    return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1))


def generate(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` distinct general requests of one split (fewer if the split's space runs out)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    rng = random.Random(f"r1jax.general:{split}:{seed}")
    out, seen = [], set()
    for _ in range(50 * n + 100):
        if len(out) >= n:
            break
        question, reference = _request(rng)
        # Greetings are few: they go to both splits (they are the "hello" of the paper, not a test).
        greeting = any(question == g for g, _ in _GREETINGS)
        if question in seen or (not greeting and split_of(f"general:{question}", 0.2) != split):
            continue
        seen.add(question)
        digest = hashlib.sha256(question.encode()).hexdigest()[:10]
        out.append({"id": f"general-{split}-{digest}", "kind": "general", "question": question,
                    "reference": reference, "answer": None})
    return out
