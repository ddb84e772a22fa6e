"""The GRPO loop: prompts → G completions each → rule rewards → group advantages → μ policy updates.

    prompts (grain) ─► sample_groups ─► decode ─► rewards (process pool) ─► group advantages
        ─► [reference log-probs, only if β > 0] ─► μ × minibatch update (grpo_loss, global normalisers)
        ─► metrics ─► checkpoint

Three choices keep a step cheap: with μ = 1 and one minibatch (R1's setting) π_old is the update's
own forward, detached (the ratio is 1 at the update, as GRPO defines it), so no pass is added for it;
the reference model is scored only when β > 0; and the reference and policy passes run each prompt
once per group, its keys/values shared by the group's G completions (minibatches hold whole groups;
micro-batches runs of them). `RLConfig.old_logprobs` says where π_old comes from otherwise. Every
random draw derives from (seed, step), and the data iterator's state is checkpointed, so a resumed
run repeats exactly what an uninterrupted one does.

`perf/flops_per_s` counts model FLOPs from the config (`ModelConfig.flops_per_token`): prefill and
decode of the real tokens, the reference forward, and 3 × forward per update pass (each prompt once
per group, or per run of a group that a micro-batch holds), the LM head only where logits are
computed (each prompt's last token, the completion tokens); `perf/mfu`
divides it by the devices' dense bf16 peak where that is known (not on CPU).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from r1jax.grpo import GRPOConfig, group_advantages
from r1jax.metrics import peak_flops_per_device
from r1jax.model import ModelConfig
from r1jax.rewards import CombinedReward
from r1jax.sampling import SampleOutput, SamplingConfig, sample_groups
from r1jax.sharding import DEFAULT_RULES, all_processes, gather_processes, global_rows, row_blocks, sum_processes
from r1jax.trainers.optim import OptimConfig, learning_rate_schedule, make_optimizer, schedule_step, skip_update
from r1jax.trainers.steps import (
    grpo_objective,
    init_train_state,
    make_score_fn,
    mesh_context,
    prompt_run,
)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """One GRPO run. P = prompts_per_step prompts × G = loss.group_size completions per step (the global
    batch: on several hosts each process samples and scores P / processes prompts, whose rows form one
    batch on the mesh; metrics describe all of it).

    num_minibatches: optimizer steps per pass over the P·G completions (μ passes in all,
      μ = loss.num_iterations), each on whole groups (P / num_minibatches prompts, drawn at random).
      micro_batches: gradient accumulation inside one optimizer step.
    ref_update_every: copy the policy into the reference every N steps (0 = never). R1's "every 400
      steps" counts optimizer steps: 400 / (μ · num_minibatches) of these steps.
    dynamic_sampling: DAPO — drop groups whose rewards are all equal and sample more prompts (up to
      max_sampling_rounds batches) to refill; rows still missing are masked out, not faked.
    old_logprobs: where log π_old comes from. "trainer" (TRL's and verl's choice): the trainer's own
      log-probs under the parameters that sampled — with μ = 1 and one minibatch the update's forward,
      detached (no extra pass), else one scoring pass before the updates — so the ratio starts at exactly
      1 whatever the sampler's numerics (on a small random model in bf16, decode and training forward
      differed by 0.036 per token on average, 0.32 at most, and GSPO's ε clipped a third of the tokens
      at the first update). "sampler": the sampler's `policy_logprobs` (never an extra pass; the ratio
      then also carries the sampler/trainer mismatch, and the clip acts on it).
    """

    steps: int
    prompts_per_step: int
    loss: GRPOConfig
    sampling: SamplingConfig
    optim: OptimConfig
    num_minibatches: int = 1
    micro_batches: int = 1
    ref_update_every: int = 0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    chunk_size: int = 512
    seed: int = 0
    old_logprobs: str = "trainer"

    def __post_init__(self):
        rows = self.prompts_per_step * self.loss.group_size
        if self.old_logprobs not in ("trainer", "sampler"):
            raise ValueError(f"rl.old_logprobs={self.old_logprobs!r} must be 'trainer' or 'sampler'")
        if self.steps < 0 or self.prompts_per_step < 1:
            raise ValueError(f"rl.steps={self.steps} must be >= 0 and rl.prompts_per_step={self.prompts_per_step} >= 1")
        for name in ("num_minibatches", "micro_batches", "max_sampling_rounds", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
        if self.ref_update_every < 0:
            raise ValueError(f"rl.ref_update_every={self.ref_update_every} must be >= 0 (0 = never)")
        if self.prompts_per_step % self.num_minibatches:  # minibatches hold whole groups
            raise ValueError(f"rl.num_minibatches={self.num_minibatches} must divide "
                             f"rl.prompts_per_step={self.prompts_per_step} (a minibatch holds whole groups)")
        if (rows // self.num_minibatches) % self.micro_batches:
            raise ValueError(f"rl.micro_batches={self.micro_batches} must divide the minibatch of "
                             f"{rows // self.num_minibatches} completions")


def _repeat(values: Sequence[Any], g: int) -> list[Any]:
    return [v for v in values for _ in range(g)]


def decode_completions(out: SampleOutput, decode: Callable[[list[int]], str], stop_ids: Sequence[int]) -> list[str]:
    """Completion texts, cut before the stop token."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = []
    for row, n in zip(tokens, lengths, strict=True):
        ids = row[:n].tolist()
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        texts.append(decode(ids))
    return texts


class GRPOTrainer:
    """Runs `RLConfig.steps` GRPO steps; one instance per run (or per pipeline stage)."""

    def __init__(
        self,
        config: RLConfig,
        model: nnx.Module,
        tokenizer,
        reward: CombinedReward,
        *,
        mesh: Mesh | None = None,
        reward_pool=None,
    ):
        # Each process samples and scores prompts_per_step / processes prompts, its rows on its own devices.
        if (1 if mesh is None else row_blocks(mesh)) != jax.process_count():
            raise ValueError(f"on {jax.process_count()} processes GRPO needs a mesh whose batch axes "
                             f"{DEFAULT_RULES.mesh_axes('batch')} span them, each process's rows on its own "
                             f"devices; got {None if mesh is None else dict(mesh.shape)}")
        if config.prompts_per_step % jax.process_count():
            raise ValueError(f"rl.prompts_per_step={config.prompts_per_step} must split evenly over "
                             f"{jax.process_count()} processes")
        self.config = config
        self.tokenizer = tokenizer
        self.reward = reward
        self.pool = reward_pool
        self.mesh = mesh
        self.graphdef, params = nnx.split(model)
        self.model_config = model.cfg
        self.optimizer = make_optimizer(config.optim)
        self.schedule = learning_rate_schedule(config.optim)
        loss_cfg = config.loss
        objective = grpo_objective(loss_cfg, temperature=config.sampling.temperature, chunk_size=config.chunk_size)
        params, opt_state, self._update = init_train_state(self.graphdef, params, self.optimizer, objective,
                                                           config.micro_batches, mesh, group_size=loss_cfg.group_size)
        self._score = make_score_fn(self.graphdef, group_size=loss_cfg.group_size,
                                    temperature=config.sampling.temperature,
                                    chunk_size=config.chunk_size)
        self.params, self.opt_state = params, opt_state
        self._peak_flops = peak_flops_per_device()
        self._num_devices = 1 if mesh is None else mesh.size
        self.ref_params = jax.tree.map(jnp.copy, params) if loss_cfg.beta > 0 else None
        self.step_count = 0
        self.key = jax.random.key(config.seed)

    # ------------------------------------------------------------------------------------ helpers

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def train_state(self) -> dict[str, Any]:
        state = {"params": self.params, "opt_state": self.opt_state}
        if self.ref_params is not None:
            state["ref_params"] = self.ref_params
        return state

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.ref_params = state.get("ref_params")

    # ------------------------------------------------------------------------------------ one step

    def sample(self, prompt_ids: Sequence[Sequence[int]], key: jax.Array) -> SampleOutput:
        return sample_groups(self.graphdef, self.params, prompt_ids, self.config.loss.group_size, key,
                             self.config.sampling, mesh=self.mesh)

    def _score_rewards(self, batch: dict[str, Any], out: SampleOutput) -> tuple[np.ndarray, dict[str, Any]]:
        g = self.config.loss.group_size
        texts = decode_completions(out, self.tokenizer.decode, self.config.sampling.eos_ids)
        fields = {k: _repeat(v, g) for k, v in batch.items() if k not in ("prompt", "prompt_ids", "prompt_length")}
        # Token counts, the stop token included, for length rules (DAPO's overlong shaping, `rewards.length`).
        fields["completion_length"] = np.asarray(out.lengths).tolist()
        scored = self.reward.score(_repeat(batch["prompt"], g), texts, pool=self.pool, **fields)
        totals = np.asarray([0.0 if r is None else r for r in scored.totals], np.float32)
        return totals, {"texts": texts, "columns": scored.columns}

    def _timed_score(self, params, batch: dict[str, jax.Array]) -> tuple[jax.Array, float]:
        """Completion log-probs of `batch` under `params` (one scoring pass) and its wall seconds. Only the
        arrays scoring reads go in: one compiled program for the π_old and π_ref passes, though the second
        batch also holds the first one's log-probs."""
        t = time.perf_counter()
        with mesh_context(self.mesh):
            inputs = {k: batch[k] for k in ("prompt_tokens", "prompt_mask", "tokens", "mask")}
            logp = jax.block_until_ready(self._score(params, inputs))
        return logp, time.perf_counter() - t

    def step(self, batches: Callable[[], dict[str, Any]]) -> dict[str, float]:
        """One GRPO step; `batches()` yields the next batch of prompts (called again to refill)."""
        cfg, g = self.config, self.config.loss.group_size
        step = self.step_count
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        rows = cfg.prompts_per_step * g  # the global batch; this process samples local_rows of it
        local_rows = rows // jax.process_count()
        kept: list[dict[str, np.ndarray]] = []
        columns: dict[str, list] = {}
        sampled_groups = zero_groups = 0
        flops = 0.0
        for round_ in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            batch = batches()
            key = jax.random.fold_in(jax.random.fold_in(self.key, step), round_)
            t = time.perf_counter()
            out = self.sample(batch["prompt_ids"], key)
            jax.block_until_ready(out.tokens)
            times["generate"] = times.get("generate", 0.0) + time.perf_counter() - t
            flops += generation_flops(self.model_config, np.asarray(out.prompt_mask).sum(1), np.asarray(out.lengths), g)
            t = time.perf_counter()
            rewards, info = self._score_rewards(batch, out)
            times["reward"] = times.get("reward", 0.0) + time.perf_counter() - t
            # "batch" takes one std over the whole global batch, once it is assembled (below)
            scale = "none" if cfg.loss.advantage_scale == "batch" else cfg.loss.advantage_scale
            adv = np.asarray(group_advantages(jnp.asarray(rewards), g, scale=scale, eps=cfg.loss.advantage_eps,
                                              std_ddof=cfg.loss.advantage_std_ddof)[0])
            # All G rewards equal: no signal (group_advantages gives exactly 0). Tested as group_advantages
            # does, by equality: float32 rounding makes NumPy's std of equal numbers nonzero (0.9 × 3: 2.4e-7).
            grouped = rewards.reshape(-1, g)
            equal = np.all(grouped == grouped[:, :1], axis=1)
            sampled_groups += len(equal)
            zero_groups += int(np.sum(equal))
            keep_groups = ~equal if cfg.dynamic_sampling else np.ones_like(equal)
            keep = np.repeat(keep_groups, g)
            kept.append(_host_rows(out, adv, rewards, keep))
            for name, col in info["columns"].items():
                columns.setdefault(name, []).extend(np.asarray(col, dtype=object)[keep].tolist())
            if all_processes(sum(len(k["advantages"]) for k in kept) >= local_rows):
                break
        host = _assemble(kept, local_rows)
        columns = _row_columns(columns, local_rows)
        # which of the global batch's rows hold data (whole groups; the rest is dynamic sampling's filler)
        real = np.repeat(gather_processes(host["mask"].reshape(-1, g * host["mask"].shape[1]).any(axis=1)), g)
        if cfg.loss.advantage_scale == "batch":
            host["advantages"] = _batch_scaled_advantages(host["rewards"], real, cfg.loss)
        # The sampler's log-probs serve as π_old only when asked for; with "trainer" and μ = 1, one
        # minibatch, the update takes its own (detached), else the parameters that sampled score the batch
        # before the first update moves them.
        old_pass = cfg.old_logprobs == "trainer" and updates_per_step(cfg) > 1
        host_only = ("rewards", "lengths", "truncated") + (("old_logp",) if cfg.old_logprobs == "trainer" else ())
        batch_dev = {k: global_rows(v, self.mesh) for k, v in host.items() if k not in host_only}
        old_time = ref_time = 0.0
        if old_pass:
            batch_dev["old_logp"], old_time = self._timed_score(self.params, batch_dev)
        if cfg.loss.beta > 0:
            batch_dev["ref_logp"], ref_time = self._timed_score(self.ref_params, batch_dev)

        t = time.perf_counter()
        update_metrics = []
        mb = rows // cfg.num_minibatches
        params, opt_state = self.params, self.opt_state
        first = schedule_step(opt_state)  # the schedule's count at this step's first update (skipped ones count)
        lr_count = first + updates_per_step(cfg) - 1  # the last update taken's (none taken: the last planned)
        with mesh_context(self.mesh):
            for it in range(cfg.loss.num_iterations):
                groups = np.arange(rows // g)
                if cfg.num_minibatches > 1:
                    shuffle = jax.random.fold_in(jax.random.fold_in(self.key, step), it)
                    groups = np.asarray(jax.random.permutation(shuffle, groups))
                order = (groups[:, None] * g + np.arange(g)).ravel()  # whole groups: prompts run once per group
                for i in range(cfg.num_minibatches):
                    idx = order[i * mb:(i + 1) * mb]
                    if not real[idx].any():  # only filler: no step (AdamW's momentum would still move weights)
                        opt_state = skip_update(opt_state)
                        continue
                    lr_count = first + it * cfg.num_minibatches + i
                    minibatch = batch_dev if cfg.num_minibatches == 1 else _one_at_a_time(_take_rows(batch_dev, idx))
                    params, opt_state, m = _one_at_a_time(self._update(params, opt_state, minibatch))
                    update_metrics.append(m)
            jax.block_until_ready(params)
        times["update"] = time.perf_counter() - t
        self.params, self.opt_state = params, opt_state
        self.step_count = step + 1
        if cfg.loss.beta > 0 and cfg.ref_update_every and self.step_count % cfg.ref_update_every == 0:
            self.ref_params = jax.tree.map(jnp.copy, params)

        # Metrics describe the global batch: every process's rows, in the global order.
        host, columns = gather_processes(
            ({k: host[k] for k in ("rewards", "lengths", "truncated", "mask", "prompt_mask")}, columns))
        sampled_groups, zero_groups, flops = sum_processes(np.asarray([sampled_groups, zero_groups, flops]))
        metrics = _step_metrics(host, columns, update_metrics, times, ref_time, sampled_groups, zero_groups)
        metrics["time/old_logp"] = old_time
        metrics["train/lr"] = float(self.schedule(lr_count))  # the last update's (skipped ones' rates were not used)
        metrics["time/step"] = time.perf_counter() - t0
        metrics["tokens_per_s"] = float(host["lengths"].sum()) / metrics["time/step"]
        # Model FLOPs of the work done on the real rows (whole groups: filler rows come in groups):
        # reference forward (β > 0) and μ passes of forward + backward (3 × forward), on top of generation.
        prompt_lengths, lengths = host["prompt_mask"][real].sum(1), host["lengths"][real]
        update_run = prompt_run(g, rows // cfg.num_minibatches, cfg.micro_batches)
        flops += 3 * cfg.loss.num_iterations * scoring_flops(self.model_config, prompt_lengths, lengths, update_run)
        flops += (int(cfg.loss.beta > 0) + int(old_pass)) * scoring_flops(self.model_config, prompt_lengths, lengths, g)
        metrics["perf/flops_per_s"] = flops / metrics["time/step"]
        if self._peak_flops is not None:
            metrics["perf/mfu"] = metrics["perf/flops_per_s"] / (self._peak_flops * self._num_devices)
        return metrics


@jax.jit
def _take_rows(batch: dict[str, jax.Array], idx: np.ndarray) -> dict[str, jax.Array]:
    """Rows `idx` of every array of `batch`, in one program."""
    return jax.tree.map(lambda v: v[idx], batch)


def _one_at_a_time(outputs):
    """`outputs`, computed, on several processes. XLA:CPU may run two programs at once, and their
    collectives (gloo) then meet in different orders on different hosts: a deadlock (seen: an update
    and the next minibatch's row gather). One process, or one device stream per chip: as they are."""
    return jax.block_until_ready(outputs) if jax.process_count() > 1 else outputs


def updates_per_step(cfg: RLConfig) -> int:
    """Optimizer steps per GRPO step: μ passes over the batch, num_minibatches each."""
    return cfg.loss.num_iterations * cfg.num_minibatches


def forward_flops(cfg: ModelConfig, start, stop, logits=None) -> float:
    """Forward FLOPs over the tokens at positions start+1 … stop of each sequence (arrays allowed), each
    token attending to every position up to its own: Σ flops_per_token(i) = n · flops_per_token(mean i).
    `logits`: on how many of each sequence's tokens the LM head runs (default: all of them)."""
    start, stop = np.asarray(start, np.float64), np.asarray(stop, np.float64)
    body = np.sum((stop - start) * cfg.flops_per_token((start + stop + 1) / 2, head=False))
    head = cfg.flops_per_token(0) - cfg.flops_per_token(0, head=False)
    return float(body + head * np.sum(stop - start if logits is None else np.broadcast_to(logits, np.shape(stop))))


def scoring_flops(cfg: ModelConfig, prompt_lengths: np.ndarray, completion_lengths: np.ndarray,
                  prompt_run: int) -> float:
    """Forward FLOPs of scoring rows (`trainers.steps.completion_logprobs`): each run of `prompt_run`
    rows with one prompt runs it once, then every row's completion attends to it; the LM head on the
    completion tokens only (the log-probs taken)."""
    return (forward_flops(cfg, 0, prompt_lengths[::prompt_run], logits=0)
            + forward_flops(cfg, prompt_lengths, prompt_lengths + completion_lengths, logits=completion_lengths))


def generation_flops(cfg: ModelConfig, prompt_lengths: np.ndarray, completion_lengths: np.ndarray,
                     group_size: int) -> float:
    """Sampling FLOPs of B = P·G rows: each distinct prompt prefilled once (logits of its last token:
    a row's first draw), then one forward per further completion token of every row (padding slots,
    bucketing and the loop's forward after the last draw not counted)."""
    return (forward_flops(cfg, 0, prompt_lengths[::group_size], logits=1)
            + forward_flops(cfg, prompt_lengths, prompt_lengths + np.maximum(completion_lengths - 1, 0)))


def _host_rows(out: SampleOutput, adv: np.ndarray, rewards: np.ndarray, keep: np.ndarray) -> dict[str, np.ndarray]:
    rows = {
        "prompt_tokens": out.prompt_tokens, "prompt_mask": out.prompt_mask, "tokens": out.tokens, "mask": out.mask,
        "old_logp": out.policy_logprobs, "lengths": out.lengths, "truncated": out.truncated,
    }
    rows = {k: np.asarray(v)[keep] for k, v in rows.items()}
    rows["advantages"] = adv[keep].astype(np.float32)
    rows["rewards"] = rewards[keep]
    return rows


def _assemble(kept: list[dict[str, np.ndarray]], rows: int) -> dict[str, np.ndarray]:
    """Concatenate sampling rounds and cut (or pad with fully masked rows) to exactly `rows`."""
    width = max(k["prompt_tokens"].shape[1] for k in kept)

    def pad_prompt(x):  # prompt slot buckets may differ between rounds
        return np.pad(x, [(0, 0), (0, width - x.shape[1])])

    for k in kept:
        k["prompt_tokens"], k["prompt_mask"] = pad_prompt(k["prompt_tokens"]), pad_prompt(k["prompt_mask"])
    out = {name: np.concatenate([k[name] for k in kept])[:rows] for name in kept[0]}
    missing = rows - len(out["advantages"])
    if missing > 0:  # dynamic sampling ran out of rounds: masked rows count for nothing in the loss
        filler = {name: np.zeros((missing, *v.shape[1:]), v.dtype) for name, v in out.items()}
        filler["prompt_mask"][:, 0] = True  # one real slot so positions stay defined
        out = {name: np.concatenate([out[name], filler[name]]) for name in out}
    return out


def _row_columns(columns: dict[str, list], rows: int) -> dict[str, np.ndarray]:
    """The reward columns of the kept rows, cut or padded (NaN: not judged) to exactly `rows` as `_assemble`
    cuts or pads the rows themselves, so that they describe the rows trained on and every process's have
    the same length (for `gather_processes`)."""
    out = {}
    for name, col in columns.items():
        values = np.asarray([np.nan if v is None else v for v in col[:rows]], np.float64)
        out[name] = np.pad(values, (0, rows - len(values)), constant_values=np.nan)
    return out


def _batch_scaled_advantages(local_rewards: np.ndarray, real: np.ndarray, loss: GRPOConfig) -> np.ndarray:
    """This process's advantages with `advantage_scale="batch"`: group-centred rewards divided by the std
    of the rewards of the batch that is trained on — every process's rows and sampling rounds, the groups
    dynamic sampling dropped and the filler rows (`real` false; their advantages stay 0) left out."""
    rewards = gather_processes(local_rewards)
    adv = np.zeros(len(rewards), np.float32)
    if real.any():
        adv[real] = np.asarray(group_advantages(jnp.asarray(rewards[real]), loss.group_size, scale="batch",
                                                eps=loss.advantage_eps, std_ddof=loss.advantage_std_ddof)[0])
    return adv.reshape(jax.process_count(), -1)[jax.process_index()]


def _step_metrics(host, columns, update_metrics, times, ref_time, sampled_groups, zero_groups) -> dict[str, float]:
    """The step's metrics. The batch's (rewards, lengths) and the updates' (`train/*`) are left out when
    there is nothing to describe: dynamic sampling kept no group, so no update ran."""
    metrics: dict[str, float] = {
        "groups/zero_std_fraction": zero_groups / max(sampled_groups, 1),
        "groups/sampled": float(sampled_groups),
        "time/generate": times.get("generate", 0.0),
        "time/reward": times.get("reward", 0.0),
        "time/reference": ref_time,
        "time/update": times.get("update", 0.0),
    }
    real = host["mask"].any(axis=1)
    if real.any():
        lengths = host["lengths"][real]
        metrics.update({
            "reward/mean": float(host["rewards"][real].mean()), "reward/std": float(host["rewards"][real].std()),
            "completion/length_mean": float(lengths.mean()), "completion/length_max": float(lengths.max()),
            "completion/truncated": float(host["truncated"][real].mean()),
        })
    for name, col in columns.items():
        judged = col[~np.isnan(col)]  # NaN: not judged by this reward
        if judged.size:
            metrics[f"reward/{name}"] = float(np.mean(judged))
            metrics[f"reward/{name}_std"] = float(np.std(judged))
    stacked = jax.device_get(update_metrics)
    for k in stacked[0] if stacked else ():
        values = np.asarray([m[k] for m in stacked], np.float64)
        metrics[f"train/{k}"] = float(values.max() if k.endswith("_max") else values.min() if k.endswith("_min")
                                      else values.mean())
    return metrics
