"""Rule rewards for R1 training: math accuracy, format, language consistency, countdown, code.

Every reward has the signature `fn(prompts, completions, **example_fields) -> list[float | None]`
(`RewardFn`), is pure Python, and is safe on adversarial text (bounded time, no `eval`, code run
only in a sandbox). `combine` weights several and keeps each for logging; `RewardPool` scores
batches in worker processes with hard per-sample timeouts; `get_reward(name)` serves configs.

Importing this package is light: sympy/math-verify load on the first math grade.
"""

from r1jax.rewards.code import code_reward, extract_program
from r1jax.rewards.combine import CombinedReward, RewardOutput, combine
from r1jax.rewards.countdown import countdown_reward, evaluate_expression
from r1jax.rewards.format import R1_SPECIAL_TOKEN, format_reward, r1_format_reward
from r1jax.rewards.language import detect_language, language_consistency_reward
from r1jax.rewards.length import overlong_penalty, overlong_reward
from r1jax.rewards.math import accuracy_reward, extract_answer, grade, grade_completion, normalize_answer
from r1jax.rewards.pool import RewardPool
from r1jax.rewards.registry import RewardFn, get_reward, register_reward, reward_names
from r1jax.rewards.sandbox import SandboxLimits, run_sandboxed, sandbox_mode

__all__ = [
    "R1_SPECIAL_TOKEN",
    "CombinedReward",
    "RewardFn",
    "RewardOutput",
    "RewardPool",
    "SandboxLimits",
    "accuracy_reward",
    "code_reward",
    "combine",
    "countdown_reward",
    "detect_language",
    "evaluate_expression",
    "extract_answer",
    "extract_program",
    "format_reward",
    "get_reward",
    "grade",
    "grade_completion",
    "language_consistency_reward",
    "normalize_answer",
    "overlong_penalty",
    "overlong_reward",
    "r1_format_reward",
    "register_reward",
    "reward_names",
    "run_sandboxed",
    "sandbox_mode",
]
