"""GRPO for DeepSeek-R1 training: group advantages, token log-probs, and the clipped policy loss with
its DAPO, Dr.GRPO and GSPO variants.

This module owns the arithmetic between "log-probs and rewards" and "a scalar to differentiate". It
knows nothing of the model and imports only jax, numpy and the standard library; every function is
pure, so it composes with another codebase's `jax.jit`, `jax.grad`, `jax.vmap` and shardings.

Two design choices run through it:

1. **Global normalisers.** `grpo_loss` divides by `num_sequences` / `num_tokens` counted over the
   *whole* batch (the caller passes them; `batch_counts` computes them). The loss is then a plain
   sum over sequences, so the losses and gradients of micro-batches or data-parallel shards add up
   to exactly the full-batch ones. Normalising each micro-batch by its own count is the
   gradient-accumulation drift that several GRPO implementations shipped.
2. **Non-finite inputs are loud.** Values at padded positions (mask = 0) never reach the loss or
   its gradient, whatever they are. A NaN/inf at a *valid* position is counted in
   `metrics["nonfinite"]` and makes the loss and every gradient NaN on purpose, so no optimiser
   step silently trains on a corrupted batch (skip the step, e.g. `optax.apply_if_finite`).

Shapes: B sequences (completions), T completion positions, V vocabulary, D model width, G group
size, C chunk length, N chunks. Einsum letters: b batch, c position in chunk, d model, v vocab.
"""

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GRPOConfig",
    "PRESETS",
    "batch_counts",
    "chunked_token_logprobs",
    "group_advantages",
    "grpo_loss",
    "token_entropy",
    "token_logprobs",
]

AdvantageScale = Literal["group", "batch", "none"]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]

_ADVANTAGE_SCALES = ("group", "batch", "none")
_RATIO_LEVELS = ("token", "sequence")
_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
_KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------------
# Argument checks (trace time: shapes and dtypes are static).


def _compute_dtype(*dtypes: Any) -> jnp.dtype:
    """At least float32: log-softmax, ratios and sums never run in bf16/fp16."""
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def _require_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={x.dtype} must be a floating dtype (float32, float64, bfloat16)")


def _require_shape(name: str, x: jax.Array, want: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != tuple(want):
        raise ValueError(f"{name}.shape={tuple(x.shape)} must equal {what}={tuple(want)}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


# --------------------------------------------------------------------------------------------------
# Advantages.


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
    std_ddof: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Group-relative advantages, A_i = (r_i − mean(r_group)) / (std(r_group) + eps).

    Args:
      rewards: [B] rewards, B = (number of prompts) × G, each prompt's G completions consecutive.
      group_size: G (a Python int; it shapes the computation).
      scale: "group" divides by each group's std (DeepSeekMath / R1, eq. 3 of the R1 paper);
        "batch" divides by the std of all B rewards (group mean still subtracted; TRL's
        `scale_rewards="batch"`); "none" only subtracts the group mean (Dr.GRPO).
      eps: added to the std, so a near-constant group does not blow up.
      std_ddof: the std's delta degrees of freedom. The R1 paper writes std({r_1..r_G}) without
        saying which; the default 0 is the population std of those G numbers. TRL and verl use the
        unbiased std (ddof=1; TRL with eps=1e-4): pass `std_ddof=1` to match them.

    Returns:
      advantages: [B] in float32 (float64 if the rewards are), exactly 0 for every member of a
        zero-variance group (all G rewards equal: no learning signal; rounding in the mean must not
        turn into ±1/eps noise).
      info: `zero_variance_groups` (int count), `zero_variance_fraction` (of groups),
        `nonfinite_rewards` (int count; such a group's advantages are NaN, and `grpo_loss` reports
        them again as non-finite inputs).
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards.shape={tuple(rewards.shape)} must be 1-D [B] (B = prompts × group_size)")
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive Python int")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide rewards.shape[0]={n}")
    _require_choice("scale", scale, _ADVANTAGE_SCALES)
    count = group_size if scale == "group" else n
    if scale != "none" and not 0 <= std_ddof < count:
        raise ValueError(f"std_ddof={std_ddof} must be in [0, {count}) for scale={scale!r} over {count} rewards")

    with jax.named_scope("group_advantages"):
        dtype = _compute_dtype(rewards.dtype)
        r = rewards.astype(dtype).reshape(-1, group_size)  # [B/G, G]
        centred = r - r.mean(axis=-1, keepdims=True)  # [B/G, G]
        if scale == "group":
            std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / (group_size - std_ddof))
            adv = centred / (std + eps)
        elif scale == "batch":
            std = jnp.sqrt(jnp.sum((r - r.mean()) ** 2) / (n - std_ddof))
            adv = centred / (std + eps)
        else:
            adv = centred
        zero_var = jnp.all(r == r[:, :1], axis=-1)  # [B/G]; exact equality, not std < tol
        adv = jnp.where(zero_var[:, None], jnp.zeros_like(adv), adv).reshape(n)
        num_zero = jnp.sum(zero_var, dtype=jnp.int32)
        info = {
            "zero_variance_groups": num_zero,
            "zero_variance_fraction": num_zero.astype(dtype) / (n // group_size),
            "nonfinite_rewards": jnp.sum(~jnp.isfinite(r), dtype=jnp.int32),
        }
    return adv, info


# --------------------------------------------------------------------------------------------------
# Token log-probabilities and entropy.


def _gather_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits)[targets] and logsumexp, in logits' (float32+) dtype. [..., V] -> [...]."""
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    # Out-of-range targets gather NaN (mode "fill"), which grpo_loss then reports as non-finite.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="fill")[..., 0]
    return picked - lse, lse


def _entropy_from(logits: jax.Array, lse: jax.Array) -> jax.Array:
    """H = logsumexp(x) − Σ_v p_v x_v. [..., V] -> [...]. −inf logits (banned tokens) contribute 0."""
    probs = jnp.exp(logits - lse[..., None])
    finite = jnp.where(jnp.isfinite(logits), logits, jnp.zeros_like(logits))
    return lse - jnp.sum(probs * finite, axis=-1)


def _check_logits_targets(logits: jax.Array, targets: jax.Array, mask: jax.Array | None) -> None:
    _require_float("logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"logits.shape={tuple(logits.shape)} must be [..., V] with at least 2 dims")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets.dtype={targets.dtype} must be an integer dtype (token ids)")
    _require_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    if mask is not None:
        _require_shape("mask", mask, targets.shape, "targets.shape")


def token_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """Per-token log π(target | context): log-softmax in float32 (at least), gathered at `targets`.

    Args:
      logits: [B, T, V] (any leading dims) next-token logits, aligned with `targets`, i.e.
        `logits[:, t]` predicts `targets[:, t]` (shift by one before calling if needed).
      targets: [B, T] integer token ids.
      mask: optional [B, T]; masked positions return 0.
      temperature: divide the logits first, to score tokens under the distribution the sampler
        actually used (the ratio π/π_old is only meaningful if both sides use the same τ).

    Returns:
      [B, T] log-probabilities, float32 (float64 for float64 logits). This holds B×T×V in float32;
      use `chunked_token_logprobs` from hidden states when that does not fit.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    mask = None if mask is None else jnp.asarray(mask)
    _check_logits_targets(logits, targets, mask)
    with jax.named_scope("token_logprobs"):
        x = logits.astype(_compute_dtype(logits.dtype))
        if temperature != 1.0:
            x = x / temperature
        logp, _ = _gather_logprobs(x, targets)
        if mask is not None:
            logp = jnp.where(mask != 0, logp, jnp.zeros_like(logp))
    return logp


def token_entropy(logits: jax.Array, mask: jax.Array | None = None, *, temperature: float = 1.0) -> jax.Array:
    """Per-token entropy of softmax(logits / temperature) in float32 (at least). [B, T, V] -> [B, T]."""
    logits, mask = jnp.asarray(logits), None if mask is None else jnp.asarray(mask)
    _require_float("logits", logits)
    if mask is not None:
        _require_shape("mask", mask, logits.shape[:-1], "logits.shape[:-1]")
    with jax.named_scope("token_entropy"):
        x = logits.astype(_compute_dtype(logits.dtype))
        if temperature != 1.0:
            x = x / temperature
        ent = _entropy_from(x, jax.nn.logsumexp(x, axis=-1))
        if mask is not None:
            ent = jnp.where(mask != 0, ent, jnp.zeros_like(ent))
    return ent


def chunked_token_logprobs(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`token_logprobs(hidden @ unembed.T, targets)` without ever holding B×T×V logits.

    The sequence axis is cut into chunks of C positions and `lax.map` computes one chunk's
    [B, C, V] float32 logits at a time. The chunk body is rematerialised (`jax.checkpoint`), so the
    backward pass stores only each chunk's inputs and recomputes its logits: peak logits memory
    is B×C×V in both passes. The batch axis is left whole so a batch-sharded `hidden` stays sharded.

    Args:
      hidden: [B, T, D] final hidden states (after the final norm), aligned with `targets`.
      unembed: [V, D], the layout of a tied token-embedding table. For an untied `[D, V]` LM head
        pass `head.T` (free under jit).
      targets: [B, T] integer token ids.
      mask: optional [B, T]; masked positions return 0.
      chunk_size: C, positions per chunk (a Python int; T is padded up to a multiple of C).
      temperature: as in `token_logprobs`.
      return_entropy: also return the per-token entropy [B, T] (differentiable too).

    Returns:
      logp [B, T] in float32 (at least) — or (logp, entropy) with `return_entropy=True`.
    """
    hidden, unembed, targets = jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(targets)
    mask = None if mask is None else jnp.asarray(mask)
    _require_float("hidden", hidden)
    _require_float("unembed", unembed)
    if hidden.ndim != 3:
        raise ValueError(f"hidden.shape={tuple(hidden.shape)} must be [B, T, D]")
    b, t, d = hidden.shape
    if unembed.ndim != 2 or unembed.shape[1] != d:
        raise ValueError(
            f"unembed.shape={tuple(unembed.shape)} must be [V, D] with D = hidden.shape[-1]={d} "
            "(tied-embedding layout; pass head.T for a [D, V] LM head)"
        )
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets.dtype={targets.dtype} must be an integer dtype (token ids)")
    _require_shape("targets", targets, (b, t), "hidden.shape[:2]")
    if mask is not None:
        _require_shape("mask", mask, (b, t), "hidden.shape[:2]")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive Python int")

    dtype = _compute_dtype(hidden.dtype, unembed.dtype)
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t

    @jax.checkpoint
    def one_chunk(h: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array]:
        # h [B, C, D], tgt [B, C]; the logits exist only inside this body.
        logits = jnp.einsum("bcd,vd->bcv", h, unembed, preferred_element_type=dtype)  # [B, C, V]
        if temperature != 1.0:
            logits = logits / temperature
        logp, lse = _gather_logprobs(logits, tgt)  # [B, C]
        ent = _entropy_from(logits, lse) if return_entropy else jnp.zeros_like(logp)
        return logp, ent

    with jax.named_scope("chunked_token_logprobs"):
        if pad:
            hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
            targets = jnp.pad(targets, ((0, 0), (0, pad)))
        hc = hidden.reshape(b, n, c, d).swapaxes(0, 1)  # [N, B, C, D]
        tc = targets.reshape(b, n, c).swapaxes(0, 1)  # [N, B, C]
        logp, ent = jax.lax.map(lambda xs: one_chunk(*xs), (hc, tc))  # [N, B, C] each
        logp = logp.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # [B, T]
        ent = ent.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # [B, T]
        if mask is not None:
            logp = jnp.where(mask != 0, logp, jnp.zeros_like(logp))
            ent = jnp.where(mask != 0, ent, jnp.zeros_like(ent))
    return (logp, ent) if return_entropy else logp


# --------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO loss settings, validated on construction. Frozen and hashable: pass it to `jax.jit` as a
    static argument or close over it.

    Field → symbol in the papers (DeepSeekMath eq. 3 / R1 eq. 1; DAPO; Dr.GRPO; GSPO; Ye et al. 2020):

      group_size            G      completions sampled per prompt (R1-Zero: 16). Used by the trainer
                                   for `group_advantages`; the loss itself sees advantages only.
      num_iterations        μ      policy updates per generated batch. μ = 1 is on-policy: π_old is
                                   the current policy, detached (see `grpo_loss` on why the loss is 0).
      epsilon_low           ε / ε_low   the ratio is clipped below at 1 − ε_low.
      epsilon_high          ε / ε_high  the ratio is clipped above at 1 + ε_high (DAPO "clip-higher"
                                   uses ε_high > ε_low).
      dual_clip             δ (c in Ye et al.)  None, or δ > 1: for A < 0 the per-token objective is
                                   max(min(r·A, clip(r)·A), δ·A), bounding the loss of a huge ratio.
      beta                  β      KL coefficient (R1-Zero: 0.001). 0 skips the KL and π_ref entirely.
      kl_estimator          k1 | k2 | k3 of KL(π_θ ‖ π_ref) per token, with d = log π_ref − log π_θ:
                                   k1 = −d, k2 = d²/2, k3 = e^d − d − 1 (DeepSeekMath eq. 4, the default).
      ratio_level           "token": r_{i,t} = π_θ(o_{i,t}) / π_old(o_{i,t});
                            "sequence": GSPO's s_i = exp(mean_t log r_{i,t}), clipped per sequence.
      aggregation           how per-token losses ℓ_{i,t} become one number (N_seq, N_tok are global):
                            "seq_mean_token_mean"     (1/N_seq) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}  (DeepSeekMath, R1)
                            "token_mean"              (1/N_tok) Σ_i Σ_t ℓ_{i,t}             (DAPO)
                            "seq_mean_token_sum_norm" (1/N_seq) Σ_i (1/L_max) Σ_t ℓ_{i,t}   (Dr.GRPO)
      max_completion_length L_max  Dr.GRPO's constant normaliser (the generation budget); required
                                   by "seq_mean_token_sum_norm", ignored otherwise.
      advantage_scale       "group" (R1: divide by the group std), "batch", or "none" (Dr.GRPO):
                                   the `scale` of `group_advantages`. The GRPO trainer takes the
                                   "batch" std over the whole batch it trains on (every process's
                                   rows and sampling round), not over one process's or one round's.
      advantage_std_ddof,   the std's delta degrees of freedom and the ε added to it in
      advantage_eps         `group_advantages`: 0 and 1e-6 by default; TRL's are 1 and 1e-4.

    Presets (`GRPOConfig.preset(name, **overrides)`, table in `PRESETS`):
      grpo     DeepSeekMath/R1: ε = 0.2 symmetric, β = 0.001, k3, token ratio, seq_mean_token_mean,
               G = 16. β and G are R1-Zero's published values; ε = 0.2 is the PPO convention the
               open GRPO implementations use, not a number taken from the R1 paper.
      dapo     ε_low = 0.2, ε_high = 0.28, β = 0, token_mean (DAPO's dynamic sampling and overlong
               reward shaping live in the trainer and rewards, not here).
      dr_grpo  β = 0, seq_mean_token_sum_norm, advantage_scale "none"; needs
               `max_completion_length=` (the same L_max the sampler generates with).
      gspo     ratio_level "sequence", ε_low = 3e-4, ε_high = 4e-4 (GSPO paper), β = 0,
               seq_mean_token_mean (which gives GSPO's per-sequence objective exactly).
    """

    group_size: int = 16
    num_iterations: int = 1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.001
    kl_estimator: KLEstimator = "k3"
    ratio_level: RatioLevel = "token"
    aggregation: Aggregation = "seq_mean_token_mean"
    max_completion_length: int | None = None
    advantage_scale: AdvantageScale = "group"
    advantage_std_ddof: int = 0
    advantage_eps: float = 1e-6

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"GRPOConfig.{name}={value!r} must be an int >= {low}")

        def nonneg_float(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"GRPOConfig.{name}={value!r} must be a finite number >= 0")

        positive_int("group_size", self.group_size, 2)
        positive_int("num_iterations", self.num_iterations, 1)
        nonneg_float("epsilon_low", self.epsilon_low)
        nonneg_float("epsilon_high", self.epsilon_high)
        nonneg_float("beta", self.beta)
        nonneg_float("advantage_eps", self.advantage_eps)
        if self.advantage_std_ddof not in (0, 1) or isinstance(self.advantage_std_ddof, bool):
            raise ValueError(f"GRPOConfig.advantage_std_ddof={self.advantage_std_ddof!r} must be 0 or 1")
        if self.dual_clip is not None and (
            isinstance(self.dual_clip, bool)
            or not isinstance(self.dual_clip, int | float)
            or not 1 < self.dual_clip < math.inf
        ):
            raise ValueError(f"GRPOConfig.dual_clip={self.dual_clip!r} must be None or a finite number > 1")
        for name, choices in (
            ("kl_estimator", _KL_ESTIMATORS),
            ("ratio_level", _RATIO_LEVELS),
            ("aggregation", _AGGREGATIONS),
            ("advantage_scale", _ADVANTAGE_SCALES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} must be one of {choices}")
        if self.aggregation == "seq_mean_token_sum_norm":
            if self.max_completion_length is None:
                raise ValueError(
                    "GRPOConfig.max_completion_length=None: aggregation='seq_mean_token_sum_norm' "
                    "needs the constant L_max (an int >= 1, the sampler's max completion length)"
                )
            positive_int("max_completion_length", self.max_completion_length, 1)
        elif self.max_completion_length is not None:
            positive_int("max_completion_length", self.max_completion_length, 1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GRPOConfig":
        """A named preset ("grpo", "dapo", "dr_grpo", "gspo") with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} must be one of {tuple(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GRPOConfig field(s) {unknown}; the fields are {sorted(fields)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dapo": {"epsilon_low": 0.2, "epsilon_high": 0.28, "beta": 0.0, "aggregation": "token_mean"},
    "dr_grpo": {"beta": 0.0, "aggregation": "seq_mean_token_sum_norm", "advantage_scale": "none"},
    "gspo": {"ratio_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4, "beta": 0.0},
}


# --------------------------------------------------------------------------------------------------
# The loss.


def batch_counts(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(num_sequences, num_tokens) of a [B, T] completion mask, as int32 scalars.

    A sequence counts if it has at least one valid token, so all-padding rows (used to fill a
    micro-batch) count for nothing. Call this on the WHOLE batch and pass both to every `grpo_loss`
    call on its micro-batches or shards.
    """
    lengths = jnp.sum(mask != 0, axis=-1, dtype=jnp.int32)  # [B]
    return jnp.sum(lengths > 0, dtype=jnp.int32), jnp.sum(lengths, dtype=jnp.int32)


def _kl(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    d = ref_logp - logp  # log π_ref/π_θ, [B, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return jnp.expm1(d) - d  # k3 = e^d − d − 1, expm1 for accuracy near d = 0


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    config: GRPOConfig,
    *,
    num_sequences: jax.Array | int | None = None,
    num_tokens: jax.Array | int | None = None,
    logits: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss (minimise it) and its metrics.

    Per token, with A_i = advantages[i] and r_{i,t} the importance ratio:
      ℓ_{i,t} = −min(r·A_i, clip(r, 1 − ε_low, 1 + ε_high)·A_i)      [dual clip: for A_i < 0, min(·, −δ·A_i)]
                + β · KL_{i,t}(π_θ ‖ π_ref)                            [only if β > 0]
    then aggregated as `config.aggregation` says (see `GRPOConfig`). With
    `ratio_level="sequence"` (GSPO) every token of sequence i uses r_{i,t} = sg[s_i]·π_θ(o_t)/sg[π_θ(o_t)],
    s_i = exp((1/|o_i|) Σ_t log r_{i,t}): its value is s_i, clipping is decided per sequence, and
    the gradient equals GSPO's sequence-level gradient (GSPO-token with A_{i,t} = A_i).

    Args:
      logp: [B, T] log π_θ of the completion tokens (the only argument that carries gradient).
      old_logp: [B, T] log π_old (sampler or pre-update policy); same dtype as `logp`. Treated as a
        constant (stop_gradient is applied here), so `old_logp=logp` is a valid on-policy call.
      ref_logp: [B, T] log π_ref, same dtype as `logp`; may be None when β = 0, and is then not
        touched at all. Constant.
      advantages: [B] per-sequence advantages (e.g. `group_advantages`). Constant.
      mask: [B, T] 1/True on completion tokens that count, 0/False on padding (bool or numeric).
      config: a `GRPOConfig` (static).
      num_sequences: sequences (with ≥ 1 valid token) in the WHOLE batch this call is part of;
        divides the seq_mean_* aggregations. Default: this call's own count.
      num_tokens: valid tokens in the WHOLE batch; divides "token_mean" and the token metrics.
        Default: this call's own count. Get both from `batch_counts(full_mask)`. With them, the
        losses and gradients of micro-batches / data-parallel shards sum to the full batch's.
      logits: optional [B, T, V] policy logits, only to report the mean entropy (no gradient): those
        `logp` came from, divided by the sampling temperature (the metric is softmax(logits)'s entropy).
      entropy: optional [B, T] per-token entropy (e.g. from `chunked_token_logprobs`), instead.

    Returns:
      (loss, metrics). The loss is a float32 (float64 for float64 inputs) scalar.

    On-policy value (μ = 1, β = 0) — the loss is 0 and that is not a bug. With old_logp = logp
    detached, every ratio is exactly 1, nothing is clipped and ℓ_{i,t} = −A_i, so
      seq_mean_token_mean: loss = −(1/N_seq) Σ_i A_i = 0 whenever each group's advantages sum to 0
        (group-normalised advantages, every completion having ≥ 1 token) — the grpo and gspo presets;
      token_mean / seq_mean_token_sum_norm: loss = −Σ_i |o_i|·A_i / N_tok (resp. N_seq·L_max),
        which is 0 only if lengths are equal within groups.
    The gradient is not 0: ∇loss = −(1/N_seq) Σ_i A_i (1/|o_i|) Σ_t ∇log π_θ(o_{i,t}) (for
    seq_mean_token_mean), the policy gradient, because the ratio's gradient is ∇log π_θ at r = 1.

    Metrics (scalars). Sum-able across micro-batches/shards that share the global counts (adding
    them gives the full batch's value): `loss`, `pg_loss` (policy term, aggregated), `kl` (token
    mean of the KL estimate; only when β > 0), `clip_frac_low` (tokens with A < 0 and r < 1 − ε_low),
    `clip_frac_high` (A > 0 and r > 1 + ε_high), `clip_frac_dual` (A < 0 and r > δ; only with
    dual_clip), `ratio_mean`, `entropy` (token mean; only with `logits`/`entropy`),
    `advantage_mean` (over sequences), and the counts `nonfinite`, `num_tokens`, `num_sequences`
    (this call's). Per call (combine with min/max; ±inf when the call has no valid token):
    `ratio_min`, `ratio_max`, `advantage_min`, `advantage_max`; `advantage_std` is this call's
    std over sequences. `nonfinite` counts NaN/inf inputs at valid positions (logp, old_logp,
    ref_logp if used, entropy/logits, and advantages of sequences with tokens); when it is > 0 the
    loss and all gradients are NaN, so the step can be skipped (see the module docstring).
    """
    c = config
    if not isinstance(c, GRPOConfig):
        raise ValueError(f"config={c!r} must be a GRPOConfig (e.g. GRPOConfig.preset('grpo'))")
    # ---- trace-time checks -------------------------------------------------------------------
    logp, old_logp, advantages, mask = (jnp.asarray(x) for x in (logp, old_logp, advantages, mask))
    ref_logp, logits, entropy = (None if x is None else jnp.asarray(x) for x in (ref_logp, logits, entropy))
    _require_float("logp", logp)
    if logp.ndim != 2:
        raise ValueError(f"logp.shape={tuple(logp.shape)} must be [B, T]")
    bt = tuple(logp.shape)
    use_kl = c.beta > 0
    if use_kl and ref_logp is None:
        raise ValueError(f"ref_logp=None but GRPOConfig.beta={c.beta} > 0 needs reference log-probs")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp if use_kl else old_logp)):
        _require_float(name, x)
        _require_shape(name, x, bt, "logp.shape")
        if x.dtype != logp.dtype:
            raise ValueError(
                f"{name}.dtype={x.dtype} must equal logp.dtype={logp.dtype} (compute both in float32: "
                "bf16 log-probs move the ratio by more than GSPO's whole clip range)"
            )
    _require_float("advantages", advantages)
    _require_shape("advantages", advantages, bt[:1], "logp.shape[:1]")
    _require_shape("mask", mask, bt, "logp.shape")
    if logits is not None and entropy is not None:
        raise ValueError("pass logits or entropy (for the entropy metric), not both")
    if logits is not None:
        _require_float("logits", logits)
        if logits.ndim != 3 or tuple(logits.shape[:2]) != bt:
            raise ValueError(f"logits.shape={tuple(logits.shape)} must be [B, T, V] with [B, T]=logp.shape={bt}")
    if entropy is not None:
        _require_float("entropy", entropy)
        _require_shape("entropy", entropy, bt, "logp.shape")

    dtype = _compute_dtype(logp.dtype, advantages.dtype)
    sg = jax.lax.stop_gradient
    with jax.named_scope("grpo_loss"):
        valid = mask != 0  # [B, T]
        maskf = valid.astype(dtype)
        lengths = maskf.sum(axis=-1)  # [B]
        has_tokens = lengths > 0  # [B]

        with jax.named_scope("nonfinite"):
            nonfinite = jnp.sum(valid & ~jnp.isfinite(logp), dtype=jnp.int32)
            nonfinite += jnp.sum(valid & ~jnp.isfinite(old_logp), dtype=jnp.int32)
            if use_kl:
                nonfinite += jnp.sum(valid & ~jnp.isfinite(ref_logp), dtype=jnp.int32)
            nonfinite += jnp.sum(has_tokens & ~jnp.isfinite(advantages), dtype=jnp.int32)
            if logits is not None:
                entropy = token_entropy(sg(logits))  # [B, T], metric only
            if entropy is not None:
                nonfinite += jnp.sum(valid & ~jnp.isfinite(entropy), dtype=jnp.int32)

        # Padding can hold anything (NaN, -inf, stale values): replace it before any arithmetic, so
        # neither the value nor the gradient can see it (a where after the fact would leak NaN grads).
        # (Scalar fills keep the inputs' shardings, explicit ones included.)
        lp = jnp.where(valid, logp.astype(dtype), 0)
        old = sg(jnp.where(valid, old_logp.astype(dtype), 0))
        adv = sg(jnp.where(has_tokens, advantages.astype(dtype), 0))  # [B]
        n_seq = jnp.sum(has_tokens, dtype=dtype) if num_sequences is None else jnp.asarray(num_sequences, dtype)
        n_tok = lengths.sum() if num_tokens is None else jnp.asarray(num_tokens, dtype)
        # An empty batch (or micro-batch with zero global counts) gives 0, not 0/0.
        n_seq, n_tok = jnp.maximum(n_seq, 1), jnp.maximum(n_tok, 1)

        with jax.named_scope("ratio"):
            log_ratio = lp - old  # [B, T]
            if c.ratio_level == "sequence":  # GSPO: value s_i, per-token gradient s_i · ∇log π_θ(o_t)
                seq_log_ratio = jnp.sum(log_ratio * maskf, axis=-1) / jnp.maximum(lengths, 1)  # [B]
                log_ratio = sg(seq_log_ratio)[:, None] + lp - sg(lp)  # [B, T]
            r = jnp.exp(sg(log_ratio))  # the ratio's value, [B, T]

        with jax.named_scope("clipped_objective"):
            # min(r·A, clip(r, lo, hi)·A), written by cases: where the clip (or the dual clip, or A = 0)
            # decides, the objective is a constant; elsewhere it is r·A. The ratio is only
            # exponentiated where it is used, so an overflowing ratio in a clipped branch cannot
            # turn the gradient into 0·inf = NaN.
            a = adv[:, None]  # [B, 1]
            lo, hi = 1 - c.epsilon_low, 1 + c.epsilon_high
            clipped_low = (a < 0) & (r < lo)  # [B, T]
            clipped_high = (a > 0) & (r > hi)
            constant = jnp.where(clipped_low, lo * a, jnp.where(clipped_high, hi * a, 0.0))
            frozen = clipped_low | clipped_high | (a == 0)
            if c.dual_clip is not None:
                dual_clipped = (a < 0) & (r > c.dual_clip)  # max(min(r·A, clip(r)·A), δ·A) = δ·A
                constant = jnp.where(dual_clipped, c.dual_clip * a, constant)
                frozen = frozen | dual_clipped
            ratio = jnp.exp(jnp.where(frozen, 0.0, log_ratio))  # [B, T], carries the gradient
            pg = -jnp.where(frozen, constant, ratio * a)  # [B, T]

        def aggregate(per_token: jax.Array) -> jax.Array:
            row_sum = jnp.sum(per_token * maskf, axis=-1)  # [B]
            if c.aggregation == "seq_mean_token_mean":
                return jnp.sum(row_sum / jnp.maximum(lengths, 1)) / n_seq
            if c.aggregation == "token_mean":
                return jnp.sum(row_sum) / n_tok
            return jnp.sum(row_sum) / (c.max_completion_length * n_seq)

        with jax.named_scope("aggregate"):
            pg_loss = aggregate(pg)
            loss = pg_loss
            if use_kl:
                with jax.named_scope("kl"):
                    ref = sg(jnp.where(valid, ref_logp.astype(dtype), 0))
                    kl = _kl(lp, ref, c.kl_estimator)  # [B, T]
                    loss = loss + c.beta * aggregate(kl)
            # NaN both the value and (through the product) every gradient when an input was bad.
            loss = loss * jnp.where(nonfinite > 0, jnp.nan, 1.0).astype(dtype)

        with jax.named_scope("metrics"):

            def token_mean(x: jax.Array) -> jax.Array:
                return jnp.sum(jnp.where(valid, x, 0).astype(dtype)) / n_tok

            metrics: dict[str, jax.Array] = {
                "loss": sg(loss),
                "pg_loss": sg(pg_loss),
                "clip_frac_low": token_mean(clipped_low),
                "clip_frac_high": token_mean(clipped_high),
                "ratio_mean": token_mean(r),
                "ratio_min": jnp.min(jnp.where(valid, r, jnp.inf)),
                "ratio_max": jnp.max(jnp.where(valid, r, -jnp.inf)),
                "advantage_mean": jnp.sum(adv) / n_seq,
            }
            if c.dual_clip is not None:
                metrics["clip_frac_dual"] = token_mean(dual_clipped)
            if use_kl:
                metrics["kl"] = sg(token_mean(kl))
            n_local = jnp.maximum(jnp.sum(has_tokens, dtype=dtype), 1)
            adv_local_mean = jnp.sum(adv) / n_local
            metrics["advantage_std"] = jnp.sqrt(
                jnp.sum(jnp.where(has_tokens, (adv - adv_local_mean) ** 2, 0)) / n_local
            )
            metrics["advantage_min"] = jnp.min(jnp.where(has_tokens, adv, jnp.inf))
            metrics["advantage_max"] = jnp.max(jnp.where(has_tokens, adv, -jnp.inf))
            if entropy is not None:
                metrics["entropy"] = token_mean(sg(entropy.astype(dtype)))
            metrics["nonfinite"] = nonfinite
            metrics["num_tokens"] = jnp.sum(valid, dtype=jnp.int32)
            metrics["num_sequences"] = jnp.sum(has_tokens, dtype=jnp.int32)
    return loss, metrics
