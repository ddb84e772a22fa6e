"""RewardPool (hard per-sample timeouts, failures counted, any thread), combine() and the registry."""

import functools
import os
import threading
import time

import pytest

from r1jax.rewards import (
    CombinedReward,
    RewardPool,
    accuracy_reward,
    combine,
    format_reward,
    get_reward,
    register_reward,
    reward_names,
)

# Rewards used in the workers must be importable there: module-level functions.


def misbehaving_reward(prompts, completions, **_):
    """len(completion), except on the completions named after a way to fail."""
    out = []
    for c in completions:
        if c == "raise":
            raise RuntimeError("boom")
        if c == "hang":
            time.sleep(1_000)
        if c == "spin":  # holds the GIL in C: no signal could interrupt this
            sum(range(10**13))
        if c == "crash":
            os._exit(3)
        if c == "garbage":
            return ["not a score"]
        if c == "none":
            out.append(None)
            continue
        out.append(float(len(c)))
    return out


def echo_answer_reward(prompts, completions, *, answer, scale=1.0, **_):
    return [float(a) * scale for a in answer]


BATCH = ["a", "raise", "hang", "bbb", "crash", "garbage", "none", "spin", "cc"]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout=2.0) as p:
        yield p


def test_pool_scores_and_counts_failures(pool):
    before = pool.stats
    start = time.monotonic()
    scores = pool.score(misbehaving_reward, ["q"] * len(BATCH), BATCH)
    elapsed = time.monotonic() - start
    assert scores == [1.0, 0.0, 0.0, 3.0, 0.0, 0.0, None, 0.0, 2.0]
    after = pool.stats
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"scored": 4, "errors": 3, "timeouts": 2, "restarts": 3}
    # two hangs on two workers, each bounded by the 2 s timeout: far less than the sleep
    assert elapsed < 2 * 2.0 + 20
    # the replaced workers serve the next batch normally
    assert pool.score(misbehaving_reward, ["q"] * 3, ["x", "yy", "zzz"]) == [1.0, 2.0, 3.0]


def test_pool_failure_score_none():
    with RewardPool(num_workers=1, timeout=1.0, failure_score=None) as p:
        assert p.score(misbehaving_reward, ["q"] * 3, ["ab", "raise", "hang"]) == [2.0, None, None]
        assert p.stats == {"scored": 1, "errors": 1, "timeouts": 1, "restarts": 1}


def test_pool_slices_fields_and_passes_options(pool):
    fn = functools.partial(echo_answer_reward, scale=2.0)
    assert pool.score(fn, ["q"] * 3, ["x"] * 3, answer=[1, 2, 3]) == [2.0, 4.0, 6.0]
    # a field that is not aligned with the batch is passed unchanged
    assert pool.score(echo_answer_reward, ["q"] * 2, ["x"] * 2, answer=[5, 6], scale=0.5) == [2.5, 3.0]


def test_pool_runs_registry_rewards(pool):
    completions = ["<think>t</think><answer>\\frac{1}{2}</answer>", "\\boxed{0.5}", "\\boxed{3}", "#### 7"]
    answers = ["0.5", "\\frac{1}{2}", "4", None]
    assert pool.score("accuracy", ["q"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, None]


def test_pool_usable_from_a_thread(pool):
    out = {}

    def work():
        out["shared"] = pool.score(misbehaving_reward, ["q"] * 3, ["a", "raise", "bb"])
        with RewardPool(num_workers=1, timeout=1.0) as own:  # created and used off the main thread
            out["own"] = own.score(misbehaving_reward, ["q"] * 2, ["hang", "ccc"])
            out["accuracy"] = own.score(accuracy_reward, ["q"], ["\\boxed{2\\sqrt{2}}"], answer=["\\sqrt{8}"])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert out == {"shared": [1.0, 0.0, 2.0], "own": [0.0, 3.0], "accuracy": [1.0]}


def test_pool_inline_mode_catches_errors():
    with RewardPool(num_workers=0) as p:
        assert p.score(misbehaving_reward, ["q"] * 3, ["a", "raise", "garbage"]) == [1.0, 0.0, 0.0]
        assert p.stats["errors"] == 2


def test_pool_rejects_unpicklable_rewards(pool):
    with pytest.raises(TypeError, match="module-level function"):
        pool.score(lambda prompts, completions: [1.0], ["q"], ["a"])


def test_pool_rejects_fork_and_bad_sizes():
    with pytest.raises(ValueError, match="fork"):
        RewardPool(num_workers=1, start_method="fork")
    with pytest.raises(ValueError, match="prompts has 1 entries"):
        RewardPool(num_workers=0).score(misbehaving_reward, ["q"], ["a", "b"])


def test_call_with_deadline_any_thread():
    from r1jax.rewards.deadline import call_with_deadline

    assert call_with_deadline(sum, ([1, 2],), 5.0) == 3
    out = {}

    def work():
        out["value"] = call_with_deadline(sum, ([1, 2],), 5.0)
        start = time.monotonic()
        try:
            call_with_deadline(sum, (range(10**13),), 1.0)  # a C loop: only a kill stops it
        except Exception as e:  # reported below
            out["error"], out["elapsed"] = type(e).__name__, time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert out["value"] == 3 and out["error"] == "TimeoutError"
    assert out["elapsed"] < 1.0 + 2.0 + 15


# --------------------------------------------------------------------------------------------
# combine() and the registry


COMPLETIONS = [
    "<think>1+1</think> <answer>2</answer>",  # right, well formed
    "<think>1+1</think> <answer>3</answer>",  # wrong, well formed
    "the answer is \\boxed{2}",  # right, no format
    "<think>?</think> <answer>2</answer>",  # gold unknown: accuracy None
]
ANSWERS = ["2", "2", "2", None]


def test_combine_totals_and_columns():
    reward = combine({"accuracy": ("accuracy", 1.0), "format": (format_reward, 0.5)})
    assert isinstance(reward, CombinedReward)
    out = reward.score(["q"] * 4, COMPLETIONS, answer=ANSWERS)
    assert out.columns == {"accuracy": [1.0, 0.0, 1.0, None], "format": [1.0, 1.0, 0.0, 1.0]}
    assert out.totals == [1.5, 0.5, 1.0, 0.5]  # a None component is left out of the total
    assert reward(["q"] * 4, COMPLETIONS, answer=ANSWERS) == out.totals
    means = out.means()
    assert means == {"total": pytest.approx(3.5 / 4), "accuracy": pytest.approx(2 / 3), "format": 0.75}


def test_combine_in_pool_isolates_components(pool):
    reward = combine({"misbehaving": (misbehaving_reward, 1.0), "format": ("format", 1.0)})
    completions = ["<think>a</think><answer>1</answer>", "raise"]
    out = reward.score(["q"] * 2, completions, pool=pool)
    assert out.columns == {"misbehaving": [34.0, 0.0], "format": [1.0, 0.0]}
    assert out.totals == [35.0, 0.0]


def test_registry():
    expected = {"accuracy", "format", "r1_format", "language", "countdown", "code", "overlong"}
    assert expected <= set(reward_names())
    prefilled = get_reward("format", think_prefilled=True)
    assert prefilled(["q"], ["a</think><answer>1</answer>"]) == [1.0]
    assert get_reward("accuracy") is accuracy_reward
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")
    register_reward("test_echo", echo_answer_reward, overwrite=True)
    assert get_reward("test_echo")(["q"], ["x"], answer=[4]) == [4.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format", echo_answer_reward)
    overlong = get_reward("overlong", max_length=10, cache_length=5)
    assert overlong(["q"] * 3, ["a"] * 3, completion_length=[5, 8, 11]) == [0.0, -0.6, -1.0]
