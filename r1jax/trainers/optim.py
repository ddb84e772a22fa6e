"""The optimizer: optax AdamW with linear warmup, then a constant or cosine schedule, and global-norm clipping.

Weight decay skips norm scales and biases, whatever their rank (Qwen2's q/k/v biases are [heads,
head_dim]), as HF's and TRL's trainers do; every other parameter, the embedding included, decays.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings. `max_grad_norm=0` disables clipping; `total_steps` bounds the cosine decay."""

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 1
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; accepted: {SCHEDULES}")
        if not self.learning_rate > 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate!r} must be > 0")
        for name in ("warmup_steps", "total_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError(f"optim.max_grad_norm={self.max_grad_norm} and optim.weight_decay={self.weight_decay} "
                             "must be >= 0")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    else:
        decay = max(1, cfg.total_steps - cfg.warmup_steps)
        main = optax.cosine_decay_schedule(cfg.learning_rate, decay, alpha=cfg.final_lr_fraction)
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _parameter_name(path) -> str:
    """The last named key of a parameter's pytree path (`q_bias` for layers/0/attn/q_bias/value)."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
    return names[-1] if names else ""


def decay_mask(params):
    """True for the parameters weight decay applies to: matrices, not norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not _parameter_name(path).endswith(("bias", "scale")), params)


def _is_schedule_state(x) -> bool:
    return isinstance(x, optax.ScaleByScheduleState)


def skip_update(opt_state):
    """`opt_state` after a planned update that is not taken (a minibatch with no data): the learning-rate
    schedule moves on, so that it still ends where planned; AdamW's moments and step count stay."""
    return jax.tree.map(lambda x: x._replace(count=x.count + 1) if _is_schedule_state(x) else x, opt_state,
                        is_leaf=_is_schedule_state)


def schedule_step(opt_state) -> int:
    """How many planned updates the schedule has counted, taken or skipped."""
    (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state) if _is_schedule_state(x)]
    return int(state.count)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
