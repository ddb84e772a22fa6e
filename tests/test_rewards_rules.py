"""Exact-value tests of the string rules: format, language consistency, countdown, overlong penalty."""

import time
from pathlib import Path

import pytest

from r1jax.rewards import (
    countdown_reward,
    detect_language,
    evaluate_expression,
    format_reward,
    language_consistency_reward,
    overlong_penalty,
    r1_format_reward,
)

# --------------------------------------------------------------------------------------------
# Format

R1_ZERO_PROMPT = "A conversation between User and Assistant. ... User: 1+1? Assistant:"


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>1+1 is 2</think> <answer>2</answer>", 1.0),
        ("<think>\n1+1 is 2\n</think>\n<answer>\n2\n</answer>\n", 1.0),
        ("  <think>x</think><answer>2</answer>  ", 1.0),
        ("<think></think><answer>2</answer>", 1.0),  # empty reasoning: form is still right
        ("<think>x</think><answer> </answer>", 0.0),  # blank answer
        ("<think>x</think> <answer>2</answer> and more", 0.0),  # text after </answer>
        ("So: <think>x</think><answer>2</answer>", 0.0),  # text before <think>
        ("<think>x</think> so <answer>2</answer>", 0.0),  # text between the blocks
        ("<answer>2</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>2</answer><answer>3</answer>", 0.0),  # two answers
        ("<think>x<think>y</think><answer>2</answer>", 0.0),  # two <think>
        ("<think>x</answer><answer>2</think>", 0.0),  # interleaved
        ("<think>x</think>", 0.0),
        ("2", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_r1_zero(completion, expected):
    assert format_reward([R1_ZERO_PROMPT], [completion]) == [expected]


def test_format_reward_think_prefilled():
    prefilled = R1_ZERO_PROMPT + " <think>"
    good = "1+1 is 2 </think> <answer>2</answer>"
    assert format_reward([prefilled], [good]) == [1.0]  # detected from the prompt
    assert format_reward([R1_ZERO_PROMPT], [good]) == [0.0]  # not prefilled: <think> missing
    assert format_reward([prefilled], ["<think>1+1</think><answer>2</answer>"]) == [0.0]  # repeated
    assert format_reward([R1_ZERO_PROMPT], [good], think_prefilled=True) == [1.0]  # forced
    assert format_reward([prefilled], ["<think>a</think><answer>2</answer>"], think_prefilled=False) == [1.0]


def test_r1_format_reward():
    tok = "|special_token|"
    prompts = ["q"] * 6
    completions = [
        f"{tok} reasoning {tok} summary",
        f"\n{tok}reasoning{tok}summary\n",
        f"{tok} reasoning {tok}",  # no summary
        f"{tok}{tok} summary",  # no reasoning
        f"preamble {tok} r {tok} s",
        f"{tok} r {tok} s {tok}",
    ]
    assert r1_format_reward(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert r1_format_reward(["q <|sep|>"], ["reasoning <|sep|> summary"], special_token="<|sep|>") == [1.0]
    assert r1_format_reward(["q"], ["reasoning <|sep|> summary"], special_token="<|sep|>") == [0.0]


# --------------------------------------------------------------------------------------------
# Language consistency

EN_TEMPLATE = "A conversation between User and Assistant. The user asks a question. User: {} Assistant:"


@pytest.mark.parametrize(
    "cot, target, expected",
    [
        ("Let me compute. 我们计算", "en", 3 / 7),  # 3 English words, 4 Han characters
        ("Let me compute. 我们计算", "zh", 4 / 7),
        ("We have $x^2 + y = 3$, so x = 2 and \\(y\\) is 1.", "en", 1.0),  # math, x, numbers neutral
        ("We have $x^2 + y = 3$, so x = 2 and \\(y\\) is 1.", "zh", 0.0),
        ("所以 \\frac{1}{2} 是 答案", "zh", 1.0),  # the LaTeX command is neutral
        ("これはペンです", "ja", 1.0),  # kana, one word per character
        ("これは漢字です", "ja", 1.0),  # Han counts as Japanese too
        ("これは漢字です", "zh", 2 / 7),  # ... but kana do not count as Chinese
        ("안녕하세요 세계 hello", "ko", 2 / 3),
        ("Привет мир, hello", "ru", 2 / 3),
        ("مرحبا بالعالم hello", "ar", 2 / 3),
        ("$1 + 1 = 2$ 42 !!", "en", None),  # no words at all
        ("```python\nprint('hello world')\n```\nDone now", "en", 1.0),  # code is neutral
    ],
)
def test_language_consistency_exact(cot, target, expected):
    got = language_consistency_reward(["q"], [f"<think>{cot}</think><answer>1</answer>"],
                                      target_language=target)
    assert got == [pytest.approx(expected) if expected is not None else None]


def test_language_detection_from_prompt():
    assert detect_language(EN_TEMPLATE.format("What is 2 + 2?")) == "en"
    assert detect_language(EN_TEMPLATE.format("二加二等于多少？")) == "zh"
    assert detect_language(EN_TEMPLATE.format("にたすにはいくつですか？")) == "ja"
    assert detect_language(EN_TEMPLATE.format("2 더하기 2는 무엇입니까? 답을 알려 주세요 지금")) == "ko"
    assert detect_language(EN_TEMPLATE.format("Сколько будет два плюс два? Ответь пожалуйста")) == "ru"
    assert detect_language(EN_TEMPLATE.format("What is 2 + 2, 李?")) == "en"  # one Han char: below 10%
    prompt = EN_TEMPLATE.format("二加二等于多少？")
    completions = ["<think>二加二等于四</think><answer>4</answer>",
                   "<think>two plus two is four</think><answer>4</answer>",
                   "<think>二加二 is four</think><answer>4</answer>"]
    assert language_consistency_reward([prompt] * 3, completions) == [1.0, 0.0, pytest.approx(3 / 5)]


def test_language_is_detected_from_the_question_the_trainer_passes():
    """The R1-Zero template's 59 English words outvote a short question in another script; the record's
    question field (which rewards receive) settles the language, and a CoT in it scores 1."""
    from r1jax.data.templates import format_prompt
    from r1jax.rewards.preference import r1_language_reward

    questions = ["3加5等于多少？", "Сколько будет два плюс два?", "3 と 5 の和は？", "What is 3 + 5?"]
    prompts = [format_prompt("r1_zero", q) for q in questions]
    assert [detect_language(p) for p in prompts] == ["en"] * 4  # the whole prompt: always English
    cots = ["三加五等于八", "два плюс два четыре", "さんたすごはは", "three plus five is eight"]
    completions = [f"<think>{c}</think><answer>8</answer>" for c in cots]
    assert language_consistency_reward(prompts, completions, question=questions) == [1.0] * 4
    assert r1_language_reward(prompts, completions, question=questions) == [1.0] * 4
    assert language_consistency_reward(prompts, completions, question=[None] * 4) == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="question has 1 entries"):
        language_consistency_reward(prompts, completions, question=questions[:1])


def test_language_cot_extraction():
    # prefilled <think>: the CoT is what precedes </think>; no tags: the whole completion.
    assert language_consistency_reward(["q"], ["thinking here 中</think><answer>中文</answer>"],
                                       target_language="en") == [pytest.approx(2 / 3)]
    assert language_consistency_reward(["q"], ["plain words only"], target_language="en") == [1.0]
    both = language_consistency_reward(["q", "q"], ["one two", "一二"], target_language=["en", "zh"])
    assert both == [1.0, 1.0]
    with pytest.raises(ValueError, match="target_language"):
        language_consistency_reward(["q"], ["x"], target_language="klingon")


def test_language_bounded_on_1mb():
    text = "<think>" + ("word 字 $x$ \\alpha " * 60_000) + "</think>"
    start = time.monotonic()
    [score] = language_consistency_reward(["q"], [text], target_language="en")
    assert score == pytest.approx(0.5)
    assert time.monotonic() - start < 30  # linear scan; generous bound


# --------------------------------------------------------------------------------------------
# Countdown


def _cd(answer, target=9, numbers=(1, 2, 3)):
    return countdown_reward(["q"], [answer], target=[target], numbers=[list(numbers)])[0]


@pytest.mark.parametrize(
    "completion, target, numbers, expected",
    [
        ("<answer>(1 + 2) * 3</answer>", 9, (1, 2, 3), 1.0),
        ("<think>try</think> <answer> (1+2)*3 = 9 </answer>", 9, (1, 2, 3), 1.0),
        ("<answer>(1+2)*3 = 8</answer>", 9, (1, 2, 3), 0.1),  # claims the wrong target
        ("<answer>1 + 2 + 3</answer>", 9, (1, 2, 3), 0.1),  # wrong value
        ("<answer>(1+2)*3*1</answer>", 9, (1, 2, 3), 0.1),  # 1 used twice
        ("<answer>3 * 3</answer>", 9, (1, 2, 3), 0.1),  # 3 twice, 1 and 2 unused
        ("<answer>9</answer>", 9, (1, 2, 3), 0.1),
        ("The answer is (1+2)*3", 9, (1, 2, 3), 0.0),  # no answer tags
        ("<answer>(1+2)*3", 9, (1, 2, 3), 0.0),  # unclosed
        ("<answer>6 / (4 - 2)</answer>", 3, (6, 4, 2), 1.0),
        ("<answer>8 / (3 - 8 / 3)</answer>", 24, (8, 3, 8, 3), 1.0),  # exact only in fractions
        ("<answer>3 / (2 - 2)</answer>", 3, (3, 2, 2), 0.1),  # division by zero
        ("<answer>-(1 - 2) * 3 * 3</answer>", 9, (1, 2, 3, 3), 1.0),
        ("<answer>1 ** 2 + 8</answer>", 9, (1, 2, 8), 0.1),  # power is not allowed
        ("<answer>1.5 * 6</answer>", 9, (1.5, 6), 0.1),  # float literals are not allowed
        ("<answer>(1+2)*3</answer> then <answer>1+2+3</answer>", 9, (1, 2, 3), 0.1),  # the last counts
    ],
)
def test_countdown_exact(completion, target, numbers, expected):
    assert _cd(completion, target, numbers) == expected


def test_countdown_never_evaluates_code(tmp_path: Path):
    marker = tmp_path / "pwned"
    attacks = [
        f"__import__('os').system('touch {marker}')",
        f"(lambda: __import__('os').system('touch {marker}'))()",
        "[x for x in ().__class__.__base__.__subclasses__()]",
        f"open('{marker}', 'w')",
        "9 if True else 1",
        "(1).__add__(8)",
    ]
    for attack in attacks:
        assert _cd(f"<answer>{attack}</answer>") == 0.1
    assert not marker.exists()


def test_countdown_adversarial_sizes_bounded():
    start = time.monotonic()
    assert _cd("<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>") == 0.1
    assert _cd("<answer>" + "+".join(["1"] * 100_000) + "</answer>") == 0.1
    assert _cd("<answer>9" + "0" * 1_000_000 + "</answer>") == 0.1
    assert _cd("x" * 1_000_000) == 0.0
    assert _cd("<answer>" * 100_000 + "</answer>") == 0.1
    for claim in ("1e999999999", "9e0", "18/0", "0x9", "nine"):  # an exponent built that power of ten
        assert _cd(f"<answer>(1+2)*3 = {claim}</answer>") == 0.1
    assert _cd("<answer>(1+2)*3 = 9.0</answer>") == _cd("<answer>(1+2)*3 = 18/2</answer>") == 1.0
    assert time.monotonic() - start < 30


def test_evaluate_expression_returns_literals_in_order():
    value, literals = evaluate_expression("(7 - 3) / 2")
    assert value == 2 and literals == [7, 3, 2]


# --------------------------------------------------------------------------------------------
# Overlong penalty (DAPO eq. 13)


def test_overlong_penalty_exact():
    # L_max = 100, L_cache = 20: free up to 80 tokens, linear to -1 at 100, -1 beyond.
    assert overlong_penalty([0, 80, 81, 90, 99, 100, 101, 10_000], 100, 20) == [
        0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0]
    assert overlong_penalty([10, 11], 10, 10) == [-1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty([1], 10, 0)
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty([1], 10, 11)
