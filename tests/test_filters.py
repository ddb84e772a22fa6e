"""Rejection-sampling filters, the preference-reward interface and the R1-format language reward: exact values."""

import pytest

from r1jax.data import general
from r1jax.data.filters import (
    FilterConfig,
    code_block,
    filter_samples,
    language_stats,
    long_paragraph,
    mixed_language,
    reject_reason,
    wrong_equations,
)
from r1jax.rewards import combine, get_reward
from r1jax.rewards.preference import (
    get_preference_model,
    only_for,
    preference_reward,
    r1_language_reward,
    register_preference_model,
    summary_of,
    token_f1,
)
from r1jax.stages_r1 import to_r1_format

S = "|special_token|"
CLEAN = f"{S} 7+5=12, 12*3=36 {S} The answer is \\boxed{{36}}."


def sample(completion, correct=True, prompt="Compute (7 + 5) * 3"):
    return {"prompt": prompt, "completion": completion, "correct": correct}


# ------------------------------------------------------------------------------------ mixed language


@pytest.mark.parametrize("cot, target, mixed", [
    ("7+5=12, 12*3=36", "en", False),  # arithmetic only: no words, nothing mixed
    ("First 7+5=12, then 12*3=36", "en", False),
    ("7+5=12, 所以 12*3=36", "en", True),  # one Han word in an English CoT
    ("7+5=12, итак 12*3=36", "en", True),  # Cyrillic
    ("Let $x = \\alpha$ so x+1=2", "en", False),  # math and single letters are neutral
    ("所以 7+5=12, 然后 12*3=36", "zh", False),
    ("所以 7+5=12, then 12*3=36", "zh", True),
])
def test_mixed_language(cot, target, mixed):
    assert mixed_language(cot, target) is mixed


def test_mixed_language_filter_reads_only_the_cot():
    # A foreign word in the summary is not a mixed *CoT*; in the reasoning it is.
    assert reject_reason(sample(f"{S} 7+5=12 {S} 答案 \\boxed{{12}}")) is None
    assert reject_reason(sample(f"{S} 7+5=12, 所以 12 {S} The answer is \\boxed{{12}}")) == "mixed_language"
    assert reject_reason(sample("<think> 所以 7+5=12 </think> <answer> 12 </answer>"),
                         FilterConfig(require_format="r1_zero")) == "mixed_language"
    assert reject_reason(sample(f"{S} 7+5=12, 所以 12 {S} ok"), FilterConfig(target_language=None)) is None


# ------------------------------------------------------------------------------------ long paragraphs


def test_long_paragraph():
    short = "a" * 40
    assert not long_paragraph(f"{short}\n\n{short}", max_chars=50)
    assert long_paragraph(f"{short}\n\n{'b' * 51}", max_chars=50)
    assert long_paragraph(f"{short}\n{short}", max_chars=50)  # one newline does not end a paragraph
    assert not long_paragraph(f"{short}\n \n{short}", max_chars=50)  # a blank line with spaces does
    assert not long_paragraph("x" * 10_000, max_chars=0)  # 0 disables
    wall = f"{S} " + "7+5=12, " * 40 + f"{S} The answer is \\boxed{{12}}."
    assert reject_reason(sample(wall), FilterConfig(max_paragraph_chars=200)) == "long_paragraph"
    steps = "\n\n".join(["7+5=12, 12*3=36"] * 20)
    assert reject_reason(sample(f"{S} {steps} {S} The answer is \\boxed{{36}}."),
                         FilterConfig(max_paragraph_chars=200)) is None


# ------------------------------------------------------------------------------------ code blocks


@pytest.mark.parametrize("text, has_code", [
    ("```python\nprint(36)\n```", True),
    ("we compute\n  ~~~\nx = 1\n~~~", True),
    ("<code>print(1)</code>", True),
    ("<PRE class='x'>a</PRE>", True),
    ("7+5=12, and `x` is inline code", False),  # inline backticks are not a block
    ("text with ``` in the middle of a line", False),
    ("    indented math line", False),
])
def test_code_block(text, has_code):
    assert code_block(text) is has_code


def test_code_block_filter():
    fenced = f"{S} 7+5=12\n```python\nprint(7+5)\n```\n {S} The answer is \\boxed{{12}}."
    assert reject_reason(sample(fenced)) == "code_block"
    assert reject_reason(sample(fenced), FilterConfig(drop_code_blocks=False)) is None


# ------------------------------------------------------------------------------------ lucky answers


def test_wrong_equations():
    assert wrong_equations("7+5=12, 12*3=36, 36-40=-4") == 0
    assert wrong_equations("6+2=7, 7-8=0") == 2  # the answer 0 is "right" by luck
    assert wrong_equations("3 × 4 = 12 and 10 - 3 = 8") == 1
    assert wrong_equations("x+1=2, 1.5+1=2.5, 12+1=135 is not 13") == 1  # floats and variables are not checked
    # a binary piece of a longer expression is not an equation of its own (3+4=10 is not claimed here)
    assert wrong_equations("2*3+4=10, 10-2+3=11, 3+4*2=11, 2 + 3 = 4 + 1, 12/4+1=4, (1+2)*3 = 9") == 0
    assert wrong_equations("so 2 * 3 = 7 and x = 2+3 = 6") == 2
    lucky = sample(f"{S} 6+2=7, 7-8=0 {S} The answer is \\boxed{{0}}.")
    assert reject_reason(lucky) == "wrong_step"
    assert reject_reason(lucky, FilterConfig(check_arithmetic=False)) is None


# Whole equations in ordinary markdown and prose: checked (each text holds this many false ones).
@pytest.mark.parametrize("text, wrong", [
    ("- 2+2=5", 1),  # bullets
    ("* 2+2=5", 1),
    ("+ 2+2=5", 1),
    ("  - 2+2=5", 1),
    ("- 2+2=4\n- 3+3=7\n- 4+4=9", 2),  # a bullet on the next line does not continue the one before
    ("1. 2+2=5", 1),  # list labels
    ("a) 2+2=5", 1),
    ("**2+2=5**", 1),  # emphasis
    ("*2+2=5*", 1),
    ("- **2+2=5**", 1),
    ("**2+2=5**\n**3+3=7**", 2),
    ("**Step 1:** 2+2=5", 1),
    ("(2+2=5)", 1),  # brackets around the whole equation
    ("[2+2=5].", 1),
    ("- (2+2=5)", 1),
    ("$2+2=5$", 1),  # LaTeX delimiters
    ("\\(2+2=5\\)", 1),
    ("2+2=5 - so we continue", 1),  # a spaced dash to prose
    ("so - 2+2=5", 1),
    ("it – 2+2=5 – fine", 1),
    ("2+2=5 -- oops", 1),
    ("2+2=5 (wrong)", 1),  # a remark in brackets
    ("2+2=5.", 1),  # sentence punctuation
    ("2+2=5, then", 1),
    ("2+2=5: no", 1),
    ("2 + 2 = 5 apples", 1),
    ("x = 2+3 = 2+3 = 6", 1),  # the last claim is whole
    ("-3+5=3", 1),  # a leading minus after nothing, prose, `=`, a bullet or bold is a sign
    ("so -3+5=3", 1),
    ("x = -3+5 = 3", 1),
    ("- -3+5=3", 1),
    ("**-3+5=3**", 1),
    ("-3+5=2, 3 - 5 = -2, 3 - -5 = 8, 2*-3=-6", 0),
    ("3 - 5 = 2, 2+2=-4", 2),
])
def test_wrong_equations_checks_whole_equations_in_markdown(text, wrong):
    assert wrong_equations(text) == wrong


# Pieces of longer expressions or numbers, names, ambiguous signs: skipped (all of these are false as read
# naively, so a count above 0 is a miscount).
@pytest.mark.parametrize("text", [
    "2*3+4=10", "10-2+3=11", "3+4*2=11", "2 + 3 = 4 + 1", "12/4+1=4", "2+2=4 = 5", "2+3=5=6",  # chains
    "3*(2+2=5)", "(2+2=5)*3", "f(2+2=5)", "(3)(2+2=5)", "(3)2+2=8", "2+2=5(3)", "2+2=4 (3)",  # factors
    "2**2+2=6", "2+2=5**2", "10^3+1=1001", "2+2=4/5", "2+2=4²", "3+3=3!", "50+50=100%", "|2-5=3|",
    "2 \\times 3+1=7", "2+2=4 \\cdot 3", "3 x 2+2=8", "2+2=4 x 3", "2+2=4 times 3", "2+2=5 - x",
    "7 + 5 = 2 mod 10", "2+2=10 (mod 8)", "10 mod 3+2=3",
    "x-3+5=3", "x -3+5=3", "2 -3+5=5", "x = - 2+2 = 0", "5 −2+2=5", "−3+5=3",  # binary or unicode minus
    "3 +\n2+2=7", "2+2=4\n= 5",  # an operator across a line break
    "1,000+1=1001", "999+1=1,000", "1 000 + 2 = 1 002", "1\u202f000+2=1\u202f002", "1'000+2=1'002",
    "2.5+1=3.5", "2.5+1=3.6", "2+2=4.5", "2,5+1=3,5", "1+3=4 1/2", "Step 3 2+2=5",  # bigger numbers
    "x2+3=6", "a_1+2=4", "1e5+1=2", "2+2=5x", "2+2=5-fold", "word-2+2=5",  # names and compounds
    "2020-12-25", "2020-12-25 = 3", "10:30+15=10:45", "10:30 + 15 = 10:45",  # dates and times
])
def test_wrong_equations_skips_pieces(text):
    assert wrong_equations(text) == 0


def test_wrong_step_in_a_markdown_cot():
    cot = "Steps:\n- **7+5=12**\n- 12*3=37 (then check)\n\nSo the total is 36."
    assert reject_reason(sample(f"{S} {cot} {S} The answer is \\boxed{{36}}.")) == "wrong_step"


# ------------------------------------------------------------------------------------ whole samples


def test_reject_reason_order_and_counts():
    samples = [
        sample(CLEAN),
        sample(CLEAN),  # duplicate of the first
        sample(CLEAN, correct=False),
        sample("The answer is 36"),  # no R1 format
        sample(f"{S} 7+5=12, 所以 12*3=36 {S} The answer is \\boxed{{36}}."),
        sample(f"{S} ```\n7+5\n``` {S} The answer is \\boxed{{36}}."),
        sample(CLEAN.replace("36", "36 "), prompt="other"),
        sample(CLEAN.replace("12*3", "12 * 3"), prompt="other"),  # over the per-prompt cap of 1
    ]
    kept, counts = filter_samples(samples, FilterConfig(), per_prompt=1)
    assert [k["completion"] for k in kept] == [CLEAN, CLEAN.replace("36", "36 ")]
    assert counts == {"seen": 8, "kept": 2, "incorrect": 1, "format": 1, "wrong_step": 0, "mixed_language": 1,
                      "long_paragraph": 0, "code_block": 1, "too_long": 0, "duplicate": 1, "per_prompt_cap": 1}


def test_incorrect_comes_first_and_ungraded_samples():
    mixed_wrong = sample(f"{S} 所以 1 {S} x", correct=False)
    assert reject_reason(mixed_wrong) == "incorrect"
    assert reject_reason({**mixed_wrong, "correct": None}, FilterConfig(require_correct=False)) == "mixed_language"
    assert reject_reason(sample(CLEAN), FilterConfig(max_chars=10)) == "too_long"
    with pytest.raises(ValueError, match="require_format"):
        FilterConfig(require_format="xml")
    with pytest.raises(ValueError, match="target_language"):
        FilterConfig(target_language="klingon")


def test_language_stats():
    stats = language_stats(["7+5=12", "7+5=12, 所以 12", "First 1+1=2", "First 所以"], "en")
    assert stats["consistent_fraction"] == 0.5
    assert stats["word_share"] == pytest.approx(2 / 6)  # First, First vs 所, 以, 所, 以 (one Han word per character)
    assert language_stats([], "en")["consistent_fraction"] != language_stats([], "en")["consistent_fraction"]  # nan


def test_to_r1_format():
    expected = f"{S} 7+5=12 {S} The answer is \\boxed{{12}}."
    assert to_r1_format("<think> 7+5=12 </think> <answer> 12 </answer>") == expected
    assert to_r1_format("<think> </think> <answer> 12 </answer>") is None  # no reasoning to keep
    assert to_r1_format("12") is None
    assert to_r1_format(f"<think> {S} 7 </think> <answer> 7 </answer>") is None  # would break the format


# ------------------------------------------------------------------------------------ rewards


def test_r1_language_reward_on_r1_format():
    prompts = ["User: Compute 7 + 5\nAssistant:"] * 4
    completions = [CLEAN, f"{S} 7+5=12, 所以 12 {S} The answer is \\boxed{{12}}.",
                   f"{S} First 7+5=12, 所以 12 {S} ok", "<think> 7+5 </think> <answer> 12 </answer>"]
    assert r1_language_reward(prompts, completions) == [1.0, 0.0, pytest.approx(1 / 3), 1.0]  # First / 所, 以
    assert r1_language_reward(prompts, completions, no_words=None) == [None, 0.0, pytest.approx(1 / 3), None]
    assert get_reward("language_r1")(prompts[:1], ["所以"], target_language="zh") == [1.0]


def test_preference_reward_scopes():
    prompts = ["User: Say hello.\nAssistant:"] * 3
    completions = [f"{S} the user greets; I could kill time {S} Hello! How can I help you?",
                   "Hello! How can I help you?", "Goodbye."]
    ref = ["Hello! How can I help you?"] * 3
    assert summary_of(completions[0]) == "Hello! How can I help you?"
    help_ = preference_reward(prompts, completions, model="helpfulness_proxy", scope="summary", reference=ref)
    assert help_ == [1.0, 1.0, 0.0]
    # Harmlessness reads the whole response, reasoning included (the blocked word is in the CoT).
    harm = preference_reward(prompts, completions, model="harmlessness_proxy", scope="response")
    assert harm == [0.0, 1.0, 1.0]
    assert preference_reward(prompts, completions, model="harmlessness_proxy", scope="summary") == [1.0, 1.0, 1.0]
    assert token_f1("3, 4, 5", "3, 4, 5, 6") == pytest.approx(2 * 1 * 0.75 / 1.75)
    with pytest.raises(ValueError, match="scope"):
        preference_reward(prompts, completions, scope="cot")


def test_preference_model_is_pluggable():
    class Shouty:
        def score(self, prompts, responses, **_):
            return [float(r.isupper()) for r in responses]

    register_preference_model("test_shouty", Shouty(), overwrite=True)
    assert get_preference_model("test_shouty").score([], ["HI"]) == [1.0]
    assert preference_reward(["p", "p"], [f"{S} quiet {S} HI", "hi"], model="test_shouty") == [1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_preference_model("test_shouty", Shouty())
    with pytest.raises(KeyError, match="unknown preference model"):
        preference_reward(["p"], ["x"], model="nope")


def test_only_for_routes_by_kind_and_combines():
    prompts = ["q1", "q2", "q3"]
    completions = [f"{S} 7+5=12 {S} The answer is \\boxed{{12}}.", "Hello! How can I help you?", "\\boxed{12}"]
    fields = {"kind": ["reasoning", "general", None], "answer": ["12", None, "12"],
              "reference": [None, "Hello! How can I help you?", None]}
    reward = combine({"accuracy": (only_for("reasoning", get_reward("accuracy")), 1.0),
                      "helpfulness": (only_for("general", get_reward("helpfulness")), 1.0)})
    out = reward.score(prompts, completions, **fields)
    assert out.columns == {"accuracy": [1.0, None, 1.0], "helpfulness": [None, 1.0, None]}
    assert out.totals == [1.0, 1.0, 1.0]


def test_general_data_is_seeded_and_split():
    train, test = general.generate("train", 200, seed=0), general.generate("test", 30, seed=0)
    assert train == general.generate("train", 200, seed=0)
    assert all(r["kind"] == "general" and r["reference"] and r["answer"] is None for r in train)
    greetings = {"Say hello.", "Greet the user.", "Say thank you.", "Say goodbye."}
    overlap = {r["question"] for r in train} & {r["question"] for r in test}
    assert overlap <= greetings
    assert {r["question"]: r["reference"] for r in train}.get("Which is larger, 7 or 12?", "12") == "12"
