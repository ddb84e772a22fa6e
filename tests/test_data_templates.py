"""Templates: the R1-Zero text verbatim, the cold-start format, the chat path."""

import pytest

from r1jax.data import templates
from r1jax.data.templates import format_cold_start, format_prompt, format_response, parse_cold_start

PAPER_TABLE_1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: What is 2+3. Assistant:"
)


def test_r1_zero_prompt_is_the_papers():
    assert format_prompt("r1_zero", "  What is 2+3 \n") == PAPER_TABLE_1
    assert format_response("r1_zero", " 2+3=5 ", "5") == "<think> 2+3=5 </think> <answer> 5 </answer>"
    assert templates.parse_r1_zero("<think> 2+3=5 </think> <answer> 5 </answer>") == ("2+3=5", "5")
    for bad in ("<answer> 5 </answer>", "<think> a </think> <answer> 5 </answer> extra", "<think></think>"):
        assert templates.parse_r1_zero(bad) is None
    # a reasoning ending in "<think" and an answer starting with ">" hold no tag between them
    assert templates.parse_r1_zero("<think> a <think</think><answer>> 5</answer>") == ("a <think", "> 5")
    assert templates.parse_r1_zero("\n<think></think>\t<answer></answer> ") == ("", "")
    spam = "<think>" + "</think> <answer>" * 20_000  # scanned once (the regular expression it replaces took ~25 s)
    assert templates.parse_r1_zero(spam) is None and templates.parse_r1_zero(spam + "</answer>") is None


def test_cold_start_format_and_configurable_token():
    text = format_cold_start("2+3=5", "The answer is 5.")
    assert text == "|special_token| 2+3=5 |special_token| The answer is 5."
    assert parse_cold_start(text) == ("2+3=5", "The answer is 5.")
    custom = format_response("r1", "r", "s", special_token="<|sep|>")
    assert custom == "<|sep|> r <|sep|> s" and parse_cold_start(custom, special_token="<|sep|>") == ("r", "s")
    assert parse_cold_start("r |special_token| s") is None
    with pytest.raises(ValueError, match="special_token"):
        format_cold_start("a |special_token| b", "s")
    assert format_prompt("r1", "Q?", instruction=templates.MATH_INSTRUCTION) == (
        "User: Q?\nPlease reason step by step, and put your final answer within \\boxed{}.\nAssistant:"
    )


class _ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_chat_path_uses_the_tokenizer():
    assert format_prompt("chat", "Q", tokenizer=_ChatTok(), system="S") == "<system>S<user>Q<assistant>"
    with pytest.raises(ValueError, match="apply_chat_template"):
        format_prompt("chat", "Q", tokenizer=object())
    with pytest.raises(ValueError, match="not registered"):
        format_prompt("r2", "Q")
