"""Prompt and response templates: R1-Zero (paper Table 1), the R1 cold-start format, HF chat templates.

A template is a prompt pattern (with `{question}`) and, where the format is fixed, a response
pattern (with `{reasoning}` and `{answer}`). Everything is a function over the `TEMPLATES` registry,
so a config names a template by string and the trainer, the SFT corpus builder and the evaluator
agree on one spelling of each format.

The chat path does not render anything itself: it asks the tokenizer (`apply_chat_template`, present
on `transformers` tokenizers and on `r1jax.data.tokenizer.HFTokenizer` when the folder ships a
template) so that an HF model sees exactly the prompt it was trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
R1_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# R1 paper, section 2.3.1: "|special_token|<reasoning_process>|special_token|<summary>".
DEFAULT_SPECIAL_TOKEN = "|special_token|"

# DeepSeek-R1 paper, Table 1 (verbatim, including "User: prompt. Assistant:").
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question}. Assistant:"
)
R1_ZERO_RESPONSE = "<think> {reasoning} </think> <answer> {answer} </answer>"

# The instruction the R1 evaluation adds to math prompts (paper, section 3 / appendix).
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class Template:
    """One registered format.

    Attributes:
      name: registry key.
      prompt: `str.format` pattern with `{question}`; unused when `chat` is true.
      response: pattern with `{reasoning}` and `{answer}` (the R1 summary for `r1`), or None when
        the format leaves the response free (plain and chat prompts).
      chat: render the prompt with the tokenizer's chat template.
    """

    name: str
    prompt: str
    response: str | None = None
    chat: bool = False


TEMPLATES: dict[str, Template] = {
    "r1_zero": Template("r1_zero", R1_ZERO_PROMPT, R1_ZERO_RESPONSE),
    # R1-Zero's response format behind a one-line prompt: the base corpus of the embedded R1 demo,
    # where the paper's ~150-token instruction would be most of a tiny model's compute.
    "r1_zero_brief": Template("r1_zero_brief", "User: {question}. Assistant:", R1_ZERO_RESPONSE),
    # Cold-start / R1 stages on models without a chat template; the response is built by
    # `format_cold_start` so that the special token stays configurable.
    "r1": Template("r1", "User: {question}\nAssistant:", "{special} {reasoning} {special} {answer}"),
    "plain": Template("plain", "{question}"),
    "chat": Template("chat", "{question}", chat=True),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"template={name!r} is not registered; expected one of {sorted(TEMPLATES)}"
        ) from None


def format_prompt(
    template_name: str,
    question: str,
    *,
    tokenizer: Any = None,
    instruction: str | None = None,
    system: str | None = None,
) -> str:
    """The prompt text a policy is conditioned on.

    Args:
      template_name: a key of `TEMPLATES`.
      question: the problem statement.
      tokenizer: required for `chat`: anything with `apply_chat_template(messages, tokenize=False,
        add_generation_prompt=True)` (a `transformers` tokenizer or `HFTokenizer`).
      instruction: appended to the question on its own line (e.g. `MATH_INSTRUCTION`).
      system: optional system message (chat only).
    """
    template = get_template(template_name)
    question = question.strip()
    if instruction:
        question = f"{question}\n{instruction}"
    if not template.chat:
        if system is not None:
            raise ValueError(f"system= is only used by the chat template, not {template_name!r}")
        return template.prompt.format(question=question)
    if tokenizer is None or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError(
            "template='chat' needs a tokenizer with apply_chat_template (a transformers tokenizer, or "
            f"an HF tokenizer folder that ships a chat template); got {type(tokenizer).__name__}"
        )
    if getattr(tokenizer, "chat_template", "missing") is None:
        raise ValueError(f"{tokenizer!r} has no chat template; use template='r1_zero' or 'plain'")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": question}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_response(
    template_name: str, reasoning: str, answer: str, *, special_token: str = DEFAULT_SPECIAL_TOKEN
) -> str:
    """A completion in the template's output format (SFT targets, pretraining corpus, tests).

    For `r1` the `answer` argument is the summary (see `format_cold_start`).
    """
    template = get_template(template_name)
    if template.response is None:
        raise ValueError(f"template={template_name!r} has no fixed response format; use 'r1_zero' or 'r1'")
    if template_name == "r1":
        return format_cold_start(reasoning, answer, special_token=special_token)
    return template.response.format(reasoning=reasoning.strip(), answer=str(answer).strip())


def format_cold_start(reasoning: str, summary: str, *, special_token: str = DEFAULT_SPECIAL_TOKEN) -> str:
    """R1 cold-start output: `|special_token| reasoning |special_token| summary`."""
    if not special_token or special_token in reasoning or special_token in summary:
        raise ValueError(
            f"special_token={special_token!r} must be non-empty and absent from the reasoning and summary"
        )
    return f"{special_token} {reasoning.strip()} {special_token} {summary.strip()}"


def parse_cold_start(text: str, *, special_token: str = DEFAULT_SPECIAL_TOKEN) -> tuple[str, str] | None:
    """(reasoning, summary) from a cold-start completion, or None when the format is not followed.

    The format is followed when the text starts with the special token and contains it exactly twice.
    """
    parts = text.strip().split(special_token)
    if len(parts) != 3 or parts[0].strip():
        return None
    return parts[1].strip(), parts[2].strip()


def parse_r1_zero(text: str) -> tuple[str, str] | None:
    """(reasoning, answer) from `<think> … </think> <answer> … </answer>`, or None if malformed.

    Strict: one think block then one answer block and nothing else, as the format reward expects.
    Linear in the text's length (model output: a completion of tag spam must not stall the rewards).
    """
    if any(text.count(tag) != 1 for tag in R1_TAGS):
        return None
    starts = [text.index(tag) for tag in R1_TAGS]
    ends = [start + len(tag) for start, tag in zip(starts, R1_TAGS, strict=True)]
    if starts != sorted(starts) or any(s.strip() for s in (text[:starts[0]], text[ends[1]:starts[2]], text[ends[3]:])):
        return None
    return text[ends[0]:starts[1]].strip(), text[ends[2]:starts[3]].strip()
