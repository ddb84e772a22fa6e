"""The GRPO and SFT trainers in-process on a char-level toy task: 1 device vs a 2x2x2 mesh, micro-batches
and minibatches against one big batch, prompts run once per group, dynamic sampling, mean reward going
up, the FLOP metrics, and the non-finite guard.

The toy task: prompts are random strings over a 9-letter alphabet; the reward is the fraction of the 8
completion slots that hold the letter "a" (≈ 1/12 for the initial policy, 1 when every token is "a").
Parameters are drawn on the host, so no init program is compiled; the runs that need the same compiled
steps share one trainer.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from r1jax.checkpoint import NonFiniteError, check_finite
from r1jax.grpo import GRPOConfig, grpo_loss
from r1jax.model import ModelConfig, abstract_model, get_preset, shard_model
from r1jax.rewards import combine
from r1jax.sampling import SampleOutput, SamplingConfig
from r1jax.sharding import make_mesh
from r1jax.trainers.loop import run_loop
from r1jax.trainers.optim import OptimConfig, make_optimizer, schedule_step, skip_update
from r1jax.trainers.rl import (
    GRPOTrainer,
    RLConfig,
    forward_flops,
    generation_flops,
    scoring_flops,
)
from r1jax.trainers.sft import sft_batch
from r1jax.trainers.steps import (
    accumulate_gradients,
    completion_logprobs,
    grpo_objective,
    init_opt_state,
    make_score_fn,
    make_update_step,
    sft_objective,
    training_compiler_options,
)

NEW_TOKENS = 8
LEARN_STEPS = 20


class CharTokenizer:
    """pad 0, bos 1, eos 2, then one id per letter."""

    alphabet = "abcdefghi"
    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(alphabet)

    def encode(self, text, *, add_bos=False, add_eos=False):
        return [self.bos_id] * add_bos + [3 + self.alphabet.index(c) for c in text] + [self.eos_id] * add_eos

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


def fraction_of_a(prompts, completions, **fields):
    return [c.count("a") / NEW_TOKENS for c in completions]


MODEL = ModelConfig(CharTokenizer.vocab_size, 32, 1, 2, 1, 64, max_position_embeddings=32)


class PromptStream:
    """Seeded random prompts, `n` per call, with a grain-like `get_state`/`set_state`."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.calls = n, seed, 0

    def __call__(self):
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        tok = CharTokenizer()
        texts = ["".join(rng.choice(list(tok.alphabet), size=rng.integers(2, 6))) for _ in range(self.n)]
        return {"prompt": texts, "prompt_ids": [tok.encode(t, add_bos=True) for t in texts]}

    __next__ = __call__

    def __iter__(self):
        return self

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = state["calls"]


def rl_config(**changes):
    tok = CharTokenizer()
    base = dict(
        steps=LEARN_STEPS, prompts_per_step=4,
        # β > 0 (a reference model), μ = 2 passes, 2 minibatches, 2 micro-batches each: every path at once
        loss=GRPOConfig(group_size=4, beta=0.04, num_iterations=2), num_minibatches=2, micro_batches=2,
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS, eos_ids=(tok.eos_id,), pad_id=tok.pad_id),
        # Adam's eps 1e-5, not 1e-8: with 1e-8 a weight whose gradient is ~1e-7 (rounding-level) moves by
        # up to lr, so float summation order alone (1 device vs a mesh) moved weights by 5e-5–3e-4 of
        # the largest one in 3 steps, depending on the data (seeds 0–2), before and after prompt sharing;
        # 1e-6 still left 1.8e-5 in attn.o on the samples of session 12's sampler (1e-5: 2.3e-6)
        optim=OptimConfig(learning_rate=3e-3, max_grad_norm=1.0, eps=1e-5), seed=0,
    )
    return RLConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def initial():
    return initial_params()


def initial_params():
    """graphdef and seeded parameters drawn on the host (norm scales 1, matrices N(0, 0.1²))."""
    graphdef, abstract = abstract_model(MODEL)
    rng = np.random.default_rng(0)

    def leaf(path, x):
        if "scale" in jax.tree_util.keystr(path):
            return np.ones(x.shape, x.dtype)
        return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(leaf, abstract)


def model_from(initial, mesh=None):
    graphdef, state = initial
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    return model if mesh is None else shard_model(model, mesh)


def grpo_trainer(initial, config=None, mesh=None):
    reward = combine({"a": (fraction_of_a, 1.0)})
    return GRPOTrainer(config or rl_config(), model_from(initial, mesh), CharTokenizer(), reward, mesh=mesh)


def reset(trainer, initial):
    """Back to step 0 with fresh state, keeping the trainer's compiled programs."""
    params = jax.device_put(nnx.state(model_from(initial)), jax.devices()[0])  # committed, like the trainer's
    trainer.load_train_state({"params": params, "opt_state": init_opt_state(trainer.optimizer, params),
                              "ref_params": jax.tree.map(jnp.copy, params)})
    trainer.step_count = 0


def host(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(tree)]


def max_rel_diff(a, b):
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12)) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def single(initial):
    """The default-device run: the trainer, its metrics per step and its parameters after 3 steps."""
    trainer = grpo_trainer(initial)
    stream = PromptStream(trainer.config.prompts_per_step)
    history, after3 = [], None
    for _ in range(LEARN_STEPS):
        history.append(trainer.step(stream))
        if trainer.step_count == 3:
            after3 = host(trainer.params)
    updates = {int(x) for x in jax.tree.leaves(trainer.opt_state) if np.ndim(x) == 0}
    # (later tests reset and reuse the trainer: what they check of this run is taken now)
    return trainer, history, after3, {"updates": updates, "compiles": trainer._update._cache_size()}


# ------------------------------------------------------------------------------------ sharding


@pytest.mark.slow
def test_three_grpo_steps_match_on_one_device_and_on_a_2x2x2_mesh(initial, single, capfd):
    trainer, history, after3, _ = single
    capfd.readouterr()
    mesh = make_mesh(2, 2, 2)
    sharded = grpo_trainer(initial, mesh=mesh)
    stream = PromptStream(sharded.config.prompts_per_step)
    sharded_history = [sharded.step(stream) for _ in range(3)]
    # really spread over the 8 devices: the embedding over fsdp × tensor; Adam's moments like the parameters,
    # and split over the data axis too where a dimension is free (ZeRO-1)
    embed = sharded.params["embed"][...]
    assert len(embed.sharding.device_set) == 8 and embed.sharding.shard_shape(embed.shape) != embed.shape
    mu = sharded.opt_state[1][0].mu
    assert mu["embed"][...].sharding.is_equivalent_to(embed.sharding, embed.ndim)
    assert sharded.params["final_norm"]["scale"][...].sharding.spec == P(None)
    assert mu["final_norm"]["scale"][...].sharding.spec == P("data")
    assert mu["layers"][0]["attn"]["k"][...].sharding.spec == P("fsdp", None, "data")  # kv_heads = 1 does not split
    assert sharded._update._cache_size() == 1  # the new state keeps its shardings: no recompile per step
    # no activation replicated on every device to reach another layout (XLA logs it when partitioning)
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert max_rel_diff(host(sharded.params), after3) <= 1e-5
    for a, b in zip(history[:3], sharded_history, strict=True):
        assert a["reward/mean"] == b["reward/mean"]
        np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-4, atol=1e-6)
    # the parameters moved, so the comparison is not between two copies of the initial state
    assert max_rel_diff(after3, host(initial[1])) > 1e-3


@pytest.mark.slow  # the shared single-device run takes ~20-50 s to compile and run
def test_each_step_runs_mu_times_minibatches_updates_and_compiles_once(single):
    _, history, _, run = single
    assert run["updates"] == {LEARN_STEPS * 2 * 2}
    assert run["compiles"] == 1  # the new state keeps its shardings: no recompile per step
    for m in history:
        assert np.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0
        assert m["train/kl"] >= 0 and 0 <= m["train/clip_frac_low"] <= 1 and 0 <= m["train/clip_frac_high"] <= 1


# ------------------------------------------------------------------------------------ learning


@pytest.mark.slow  # the shared single-device run takes ~20-50 s to compile and run
def test_grpo_raises_the_mean_reward_on_the_toy_task(single):
    _, history, _, _ = single
    rewards = [m["reward/mean"] for m in history]
    # the initial policy writes about 1/12 "a"; over 16 × 8 tokens chance moves the mean by ~0.025
    assert np.mean(rewards[:2]) < 0.2, rewards
    assert np.mean(rewards[-4:]) > 0.8, rewards
    assert history[-1]["reward/a"] == rewards[-1] and history[-1]["reward/a_std"] >= 0


# ------------------------------------------------------------------------------------ dynamic sampling


def a_unless_prompt_starts_late(prompts, completions, **fields):
    """fraction_of_a, but a constant for prompts from "c" on: those groups have all-equal rewards."""
    return [0.5 if p[0] >= "c" else c.count("a") / NEW_TOKENS for p, c in zip(prompts, completions, strict=True)]


@pytest.mark.slow
def test_dynamic_sampling_trains_on_whole_informative_groups_and_masks_what_it_cannot_fill(initial):
    """DAPO: groups with equal rewards are dropped and more prompts sampled (here up to 3 batches of 4);
    every update sees whole groups (one prompt each, as the shared prompt pass needs) that carry
    advantages, or fully masked filler groups where the rounds ran out. With `advantage_scale="batch"`
    the std is that of the rewards trained on (every round's kept groups; not the dropped groups,
    not the filler), one std for the whole batch."""
    loss = GRPOConfig(group_size=4, beta=0.04, num_iterations=2, advantage_scale="batch")
    config = rl_config(steps=2, dynamic_sampling=True, max_sampling_rounds=3, loss=loss)
    trainer = GRPOTrainer(config, model_from(initial), CharTokenizer(),
                          combine({"r": (a_unless_prompt_starts_late, 1.0)}))
    seen, update = [], trainer._update

    def spy(params, opt_state, batch):
        seen.append(jax.device_get(batch))
        return update(params, opt_state, batch)

    trainer._update = spy
    stream = PromptStream(config.prompts_per_step, seed=3)
    history = [trainer.step(stream) for _ in range(2)]
    g = config.loss.group_size
    kept = filler = 0
    for batch in seen:  # μ = 2 passes × 2 minibatches per step, 2 groups each
        for i in range(0, len(batch["mask"]), g):
            group = {k: v[i:i + g] for k, v in batch.items()}
            assert (group["prompt_tokens"] == group["prompt_tokens"][0]).all()
            assert (group["prompt_mask"] == group["prompt_mask"][0]).all()
            if group["mask"].any():
                assert group["mask"].any(axis=1).all() and np.std(group["advantages"]) > 0
                kept += 1
            else:
                assert (group["advantages"] == 0).all()
                filler += 1
    assert kept > 0 and filler > 0, (kept, filler)  # both paths ran
    a_id = 3 + CharTokenizer.alphabet.index("a")
    for step in range(2):  # the first pass's two minibatches hold the step's whole batch
        first_pass = seen[4 * step:4 * step + 2]
        whole = {k: np.concatenate([b[k] for b in first_pass]) for k in ("tokens", "mask", "advantages")}
        real = whole["mask"].any(axis=1)
        rewards = np.sum((whole["tokens"] == a_id) & whole["mask"], axis=1)[real] / NEW_TOKENS  # fraction_of_a
        centred = (rewards.reshape(-1, g) - rewards.reshape(-1, g).mean(axis=1, keepdims=True)).ravel()
        np.testing.assert_allclose(whole["advantages"][real], centred / (rewards.std() + 1e-6), rtol=1e-5, atol=1e-6)
    for m in history:
        sampled = m["groups/sampled"]
        assert sampled > config.prompts_per_step and 0 < m["groups/zero_std_fraction"] < 1
    assert all(np.isfinite(m["train/loss"]) for m in history)  # filler rows count for nothing in the loss


def adam_steps(opt_state) -> int:
    """How many updates AdamW has applied."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return int(state.count)


def test_dynamic_sampling_takes_no_optimizer_step_on_filler_only_minibatches(initial):
    """A minibatch of filler rows alone (dynamic sampling ran out of rounds) has no gradient, but an AdamW
    step on it would still move the weights by the momentum of earlier steps: it takes no step. A step
    that keeps no group at all leaves the weights alone and reports no batch or update metrics (no NaN
    for the non-finite guard to stop the run on). The learning-rate schedule counts the skipped updates
    too, so that a cosine decay still ends where planned."""
    config = rl_config(steps=3, dynamic_sampling=True, max_sampling_rounds=1, num_minibatches=4, micro_batches=1,
                       loss=GRPOConfig(group_size=4, beta=0.0, num_iterations=1))
    rewards = [fraction_of_a, lambda prompts, completions, **_: [0.5] * len(prompts), a_unless_prompt_starts_late]
    step_rewards = iter(rewards)
    trainer = GRPOTrainer(config, model_from(initial), CharTokenizer(),
                          combine({"r": (lambda *a, **k: current(*a, **k), 1.0)}))
    stream = PromptStream(config.prompts_per_step, seed=3)
    params, steps_taken, kept_groups = [], [], []
    for _ in rewards:
        current = next(step_rewards)
        metrics = trainer.step(stream)
        check_finite(trainer.step_count, metrics)
        params.append(host(trainer.params))
        steps_taken.append(adam_steps(trainer.opt_state))
        assert schedule_step(trainer.opt_state) == trainer.step_count * config.num_minibatches
        kept = round(metrics["groups/sampled"] * (1 - metrics["groups/zero_std_fraction"]))
        assert steps_taken[-1] - (steps_taken[-2] if len(steps_taken) > 1 else 0) == kept  # one group a minibatch
        assert ("train/loss" in metrics) == ("reward/mean" in metrics) == (kept > 0)
        kept_groups.append(kept)
    assert kept_groups[1] == 0 and any(0 < k < 4 for k in kept_groups), kept_groups  # both cases ran
    assert steps_taken[1] == steps_taken[0] > 0 and steps_taken[2] > steps_taken[1], steps_taken
    assert max_rel_diff(params[1], params[0]) == 0  # nothing kept: the momentum did not move the weights
    assert max_rel_diff(params[2], params[1]) > 0


class FixedSampler(GRPOTrainer):
    """A trainer whose "sampler" writes G fixed completions per prompt (no generation program), and whose
    update only records its batches (no update program): for tests of what a step assembles."""

    def sample(self, prompt_ids, key):
        rows, n = len(prompt_ids) * self.config.loss.group_size, NEW_TOKENS
        mask = np.ones((rows, n), bool)
        zeros = np.zeros((rows, n), np.float32)
        return SampleOutput(tokens=np.full((rows, n), 3, np.int32), mask=mask, lengths=mask.sum(1),
                            truncated=np.ones(rows, bool), logprobs=zeros, policy_logprobs=zeros,
                            prompt_tokens=np.ones((rows, 4), np.int32), prompt_mask=np.ones((rows, 4), bool),
                            steps=np.int32(n))


def test_dynamic_sampling_reports_the_reward_columns_of_the_rows_it_trains_on(initial):
    """Dynamic sampling keeps whole informative groups until the batch is full and cuts what overflows; the
    per-reward metrics (`reward/<name>`) describe the same rows as `reward/mean`: not the cut groups (nor,
    on several processes, a ragged list that cannot be gathered)."""
    config = rl_config(steps=1, dynamic_sampling=True, max_sampling_rounds=3, num_minibatches=1, micro_batches=1,
                       loss=GRPOConfig(group_size=4, beta=0.0))
    rounds = iter([
        [0.0, 1.0, 0.0, 1.0] + [0.5] * 12,  # round 1: group 0 informative, kept
        [0.0, 1.0, 0.0, 1.0] * 3 + [10.0, 11.0, 10.0, 11.0],  # round 2: four kept, the last one cut
    ])
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(),
                           combine({"r": (lambda prompts, completions, **_: next(rounds), 1.0)}))
    seen = []
    trainer._update = lambda params, opt_state, batch: (seen.append(jax.device_get(batch)), (params, opt_state, {}))[1]
    metrics = trainer.step(PromptStream(config.prompts_per_step))
    assert len(seen) == 1 and seen[0]["mask"].all()  # 4 groups trained on: round 1's and 3 of round 2's
    assert metrics["groups/sampled"] == 8 and metrics["reward/mean"] == 0.5
    assert metrics["reward/r"] == metrics["reward/mean"] and metrics["reward/r_std"] == metrics["reward/std"] == 0.5


def test_dynamic_sampling_drops_every_group_of_equal_rewards_whatever_their_float32_rounding(initial):
    """A group whose G rewards are all equal carries no signal (`group_advantages` gives it exactly 0) and
    is dropped, even where float32 rounding makes NumPy's std of the G equal numbers nonzero (0.9 × 3:
    2.4e-7); `groups/zero_std_fraction` counts it."""
    assert np.float32([0.9, 0.9, 0.9]).std() > 0  # the rounding this test is about
    config = rl_config(steps=1, dynamic_sampling=True, max_sampling_rounds=3, num_minibatches=1, micro_batches=1,
                       loss=GRPOConfig(group_size=3, beta=0.0))
    rounds = iter([[0.0, 1.0, 0.0] + [0.9] * 9, [0.0, 1.0, 1.0] * 4])  # round 1: 1 informative group of 4
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(),
                           combine({"r": (lambda prompts, completions, **_: next(rounds), 1.0)}))
    seen = []
    trainer._update = lambda params, opt_state, batch: (seen.append(jax.device_get(batch)), (params, opt_state, {}))[1]
    metrics = trainer.step(PromptStream(config.prompts_per_step))
    assert metrics["groups/sampled"] == 8 and metrics["groups/zero_std_fraction"] == 3 / 8
    (batch,) = seen
    assert batch["mask"].all() and (batch["advantages"].reshape(4, 3).std(axis=1) > 0.1).all()
    assert metrics["reward/mean"] == pytest.approx(np.mean([0.0, 1.0, 0.0] + [0.0, 1.0, 1.0] * 3))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_advantages_take_the_configured_std_ddof_and_eps(initial, scale):
    """advantage_std_ddof=1 and advantage_eps=1e-4 give TRL's advantages: (r − group mean) / (the
    unbiased std + 1e-4), of each group or of the whole batch (float64 NumPy reference)."""
    rewards = np.asarray([0.0, 1.0, 0.0, 1.0, 0.2, 0.3, 0.9, 0.1] + [0.5, 0.0, 0.25, 1.0] * 2)
    config = rl_config(steps=1, num_minibatches=1, micro_batches=1,
                       loss=GRPOConfig(group_size=4, beta=0.0, advantage_scale=scale, advantage_std_ddof=1,
                                       advantage_eps=1e-4))
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(),
                           combine({"r": (lambda prompts, completions, **_: rewards.tolist(), 1.0)}))
    seen = []
    trainer._update = lambda params, opt_state, batch: (seen.append(jax.device_get(batch)), (params, opt_state, {}))[1]
    trainer.step(PromptStream(config.prompts_per_step))
    groups = rewards.reshape(-1, 4)
    std = groups.std(axis=1, ddof=1, keepdims=True) if scale == "group" else rewards.std(ddof=1)
    expected = (groups - groups.mean(axis=1, keepdims=True)) / (std + 1e-4)
    np.testing.assert_allclose(seen[0]["advantages"], expected.ravel(), rtol=1e-6, atol=1e-7)


def test_the_old_policy_and_reference_passes_share_one_scoring_program(initial):
    """With μ > 1 and β > 0 a step scores the batch twice, for π_old and for π_ref: one compiled program
    serves both (the second pass must not see the first one's output as a new input)."""
    config = rl_config(steps=1, num_minibatches=1, micro_batches=1, loss=GRPOConfig(group_size=4, beta=0.04,
                                                                                    num_iterations=2))
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(), combine({"a": (fraction_of_a, 1.0)}))
    seen = []
    trainer._update = lambda params, opt_state, batch: (seen.append(jax.device_get(batch)), (params, opt_state, {}))[1]
    metrics = trainer.step(PromptStream(config.prompts_per_step))
    assert metrics["time/old_logp"] > 0 and metrics["time/reference"] > 0 and len(seen) == 2
    np.testing.assert_array_equal(seen[0]["old_logp"], seen[0]["ref_logp"])  # π_ref = π_θ = π_old at the start
    assert trainer._score._cache_size() == 1


def test_the_reference_model_is_the_policy_of_every_ref_update_every_th_step(initial):
    """R1: π_ref is replaced by the current policy every N steps; in between it stays fixed, and each step's
    KL is taken against the π_ref of its start."""
    config = rl_config(steps=4, num_minibatches=1, micro_batches=1, ref_update_every=2,
                       loss=GRPOConfig(group_size=4, beta=0.04))
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(), combine({"a": (fraction_of_a, 1.0)}))
    seen = []

    def update(params, opt_state, batch):  # a stand-in update that moves every weight
        seen.append(jax.device_get(batch))
        return jax.tree.map(lambda x: x * 1.5, params), opt_state, {}

    trainer._update = update
    stream, start = PromptStream(config.prompts_per_step), host(trainer.params)
    policies, refs = [], []
    for _ in range(4):
        trainer.step(stream)
        policies.append(host(trainer.params))
        refs.append(host(trainer.ref_params))
    for got, want in zip(refs, [start, policies[1], policies[1], policies[3]], strict=True):
        assert max_rel_diff(got, want) == 0
    assert max_rel_diff(policies[0], start) > 0.1
    score = trainer._score
    for step, ref in ((1, start), (2, policies[1])):  # steps 2 and 3 (0-based 1, 2): refreshed after step 2
        scored = score(jax.tree.map(jnp.asarray, jax.tree.unflatten(jax.tree.structure(trainer.params), ref)),
                       {k: seen[step][k] for k in ("prompt_tokens", "prompt_mask", "tokens", "mask")})
        np.testing.assert_array_equal(seen[step]["ref_logp"], np.asarray(scored))


def test_train_lr_is_the_learning_rate_of_the_last_update_taken(initial):
    """A step whose later minibatches hold only dynamic sampling's filler skips them (the schedule still
    counts them): `train/lr` is the rate the last update that ran was taken with, not a skipped one's."""
    config = rl_config(steps=1, dynamic_sampling=True, max_sampling_rounds=1, num_minibatches=4, micro_batches=1,
                       loss=GRPOConfig(group_size=4, beta=0.0),
                       optim=OptimConfig(learning_rate=1.0, warmup_steps=100, eps=1e-6))  # lr = count / 100
    rewards = [0.0, 1.0, 0.0, 1.0] + [0.5] * 12  # one informative group, three of filler
    trainer = FixedSampler(config, model_from(initial), CharTokenizer(),
                           combine({"r": (lambda prompts, completions, **_: rewards, 1.0)}))
    taken = []

    def update(params, opt_state, batch):  # a stand-in update that only counts as one for the schedule
        taken.append(schedule_step(opt_state))
        return params, skip_update(opt_state), {}

    trainer._update = update
    for seed in range(8):  # the minibatches' order is random: until the real group is not the last one
        taken.clear()
        metrics = trainer.step(PromptStream(config.prompts_per_step, seed=seed))
        if taken[-1] % 4 != 3:
            break
    assert len(taken) == 1 and taken[-1] % 4 != 3 and schedule_step(trainer.opt_state) % 4 == 0
    assert metrics["train/lr"] == pytest.approx(taken[-1] / 100)


# ------------------------------------------------------------------------------------ micro-batches


def grpo_batch(rows=8, slots=8, n=NEW_TOKENS, seed=0, group=1):
    """A batch with ragged prompts and completions (one row fully masked) and π_old, π_ref ≠ π_θ; the
    rows in groups of `group` with the same prompt (padding slots hold random tokens, not pad ids)."""
    rng = np.random.default_rng(seed)
    prompt_len, completion_len = rng.integers(1, slots + 1, rows // group).repeat(group), rng.integers(1, n + 1, rows)
    completion_len[3] = 0
    batch = {
        "prompt_tokens": rng.integers(3, MODEL.vocab_size, (rows // group, slots)).astype(np.int32).repeat(group, 0),
        "prompt_mask": np.arange(slots)[None] < prompt_len[:, None],
        "tokens": rng.integers(3, MODEL.vocab_size, (rows, n)).astype(np.int32),
        "mask": np.arange(n)[None] < completion_len[:, None],
        "advantages": rng.standard_normal(rows).astype(np.float32),
        "old_logp": (np.log(1 / MODEL.vocab_size) + 0.3 * rng.standard_normal((rows, n))).astype(np.float32),
        "ref_logp": (np.log(1 / MODEL.vocab_size) + 0.3 * rng.standard_normal((rows, n))).astype(np.float32),
    }
    return {k: jnp.asarray(v) for k, v in batch.items()}


# What is compared is the program's arithmetic, not XLA's code generation: a cheaper backend pass
# makes the six compiles of this test about 2.5x faster on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def one_update(initial, objective, batch, micro_batches, group_size=1):
    graphdef, state = initial
    params = jax.tree.map(jnp.asarray, state)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, max_grad_norm=0.0))
    opt_state = optimizer.init(params)
    step = make_update_step(graphdef, optimizer, objective, micro_batches, group_size=group_size)
    step = step.lower(params, opt_state, batch).compile(compiler_options=FAST_COMPILE)
    params, _, metrics = step(params, opt_state, batch)
    return host(params), jax.device_get(metrics)


class LogProbScale(nnx.Module):
    """A "model" whose log-probs are the batch's scaled by one parameter: the GRPO loss without a network."""

    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))


def test_micro_batches_report_the_one_big_batch_metrics():
    """Every GRPO metric of a step accumulated over micro-batches is the whole batch's: the sums, the
    extrema, and the advantages' std (the std over all sequences, not a mean of per-micro-batch stds)."""
    rng = np.random.default_rng(0)
    rows, n = 16, 5
    lengths = rng.integers(1, n + 1, rows)
    lengths[[3, 6, 7]] = 0  # empty rows, a micro-batch with none of its rows filled among them
    logp = -rng.gamma(2.0, 1.0, (rows, n))
    batch = {"logp": logp, "old_logp": logp + 0.3 * rng.standard_normal((rows, n)),
             "ref_logp": logp + 0.2 * rng.standard_normal((rows, n)),
             "advantages": 2.0 + rng.standard_normal(rows) * np.arange(rows) / 4,
             "mask": np.arange(n)[None] < lengths[:, None]}
    batch = {k: jnp.asarray(v, jnp.float32 if k != "mask" else None) for k, v in batch.items()}
    config = GRPOConfig(group_size=4, beta=0.04, dual_clip=1.3)

    def objective(model, batch, counts, prompt_run):
        return grpo_loss(batch["logp"] * model.scale[...], batch["old_logp"], batch["ref_logp"], batch["advantages"],
                         batch["mask"], config, num_sequences=counts[0], num_tokens=counts[1])

    graphdef, params = nnx.split(LogProbScale())
    _, whole = grpo_loss(batch["logp"], batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"],
                         config)
    real = np.asarray(lengths > 0)
    np.testing.assert_allclose(whole["advantage_std"], np.asarray(batch["advantages"])[real].std(), rtol=1e-6)
    for m in (1, 2, 4, 8):
        _, _, metrics = jax.jit(accumulate_gradients, static_argnums=(0, 3, 4))(graphdef, params, batch, objective, m)
        assert set(metrics) == set(whole)
        for k, v in whole.items():
            np.testing.assert_allclose(metrics[k], v, rtol=2e-6, atol=1e-6, err_msg=f"{k}, {m} micro-batches")


@pytest.mark.slow
def test_micro_batches_give_the_one_big_batch_update(initial):
    loss = GRPOConfig(group_size=4, beta=0.04, epsilon_low=0.1, epsilon_high=0.1)
    cases = {
        "grpo": (grpo_objective(loss, temperature=1.0, chunk_size=4), grpo_batch()),
        "sft": (sft_objective(chunk_size=4), {k: jnp.asarray(v) for k, v in sft_batch(
            [([1, 3, 4], [5, 6, 7, 2]), ([1], [3, 2]), ([1, 9, 9, 9, 9], [4] * 9), ([1, 5], [2])] * 2,
            pad_id=0, max_length=32).items()}),
    }
    for name, (objective, batch) in cases.items():
        reference, ref_metrics = one_update(initial, objective, batch, 1)
        assert max_rel_diff(reference, host(initial[1])) > 1e-4, name  # the update does something
        for m in (2, 4):
            params, metrics = one_update(initial, objective, batch, m)
            assert max_rel_diff(params, reference) <= 1e-6, (name, m)
            np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6, err_msg=f"{name} {m}")
            np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
        if name == "grpo":  # the clipped ratios were really exercised
            assert ref_metrics["clip_frac_low"] + ref_metrics["clip_frac_high"] > 0


@pytest.mark.slow
def test_micro_batches_of_groups_run_each_prompt_once_and_give_the_one_big_batch_update(initial):
    """Rows in groups of 4 with the same prompt: micro-batches of whole groups (M = 1, 2) and of half
    groups (M = 4: 2 rows each) give the update of one pass per row over the whole batch."""
    objective = grpo_objective(GRPOConfig(group_size=4, beta=0.04, epsilon_low=0.1, epsilon_high=0.1),
                               temperature=1.0, chunk_size=4)
    batch = grpo_batch(group=4)
    reference, ref_metrics = one_update(initial, objective, batch, 1)
    for m in (1, 2, 4):
        params, metrics = one_update(initial, objective, batch, m, group_size=4)
        assert max_rel_diff(params, reference) <= 1e-5, m  # a shared prompt sums its gradients in another order
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, err_msg=str(m))
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("run", [2, 4])
def test_a_run_of_rows_with_one_prompt_runs_it_once_with_the_same_log_probs_and_gradients(initial, run):
    graphdef, state = initial
    params = jax.tree.map(jnp.asarray, state)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((8, NEW_TOKENS)), jnp.float32)

    def loss(params, batch, prompt_run):
        logp, ent = completion_logprobs(nnx.merge(graphdef, params), batch, prompt_run=prompt_run, chunk_size=4,
                                        entropy=True)
        return jnp.sum(jnp.where(batch["mask"], weights * logp + ent, 0.0)), (logp, ent)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)
    batch = grpo_batch(group=4)
    (g_one, (logp_one, ent_one)), (g_run, (logp_run, ent_run)) = grad(params, batch, 1), grad(params, batch, run)
    mask = np.asarray(batch["mask"])
    np.testing.assert_allclose(np.asarray(logp_run)[mask], np.asarray(logp_one)[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent_run)[mask], np.asarray(ent_one)[mask], rtol=1e-5, atol=1e-6)
    assert max_rel_diff(host(g_run), host(g_one)) <= 1e-5
    # the prompt is really run once per run: fewer FLOPs, and rows whose prompts differ are not seen
    flops = [grad.lower(params, batch, r).compile().cost_analysis()["flops"] for r in (1, run)]
    assert flops[1] < flops[0], flops
    distinct = grpo_batch(group=1)
    _, (logp_distinct, _) = grad(params, distinct, run)
    _, (logp_true, _) = grad(params, distinct, 1)
    mask = np.asarray(distinct["mask"])
    assert not np.allclose(np.asarray(logp_distinct)[mask], np.asarray(logp_true)[mask], atol=1e-3)


# ------------------------------------------------------------------------------------ FLOPs


def test_sft_batch_cuts_each_pair_to_max_length_whatever_else_is_in_the_batch():
    """max_length bounds each pair's prompt + completion: a pair that fits keeps every token, EOS included,
    beside a longer prompt; a prompt over half of max_length is fine; one that fills it is an error."""
    short, long_prompt = ([1, 3], list(range(3, 13))), (list(range(3, 15)), [4, 5])  # 2 + 10 and 12 + 2 tokens
    rows = sft_batch([short, long_prompt], pad_id=0, max_length=14)
    assert rows["tokens"][0][rows["mask"][0]].tolist() == short[1]
    assert rows["prompt_tokens"][1][rows["prompt_mask"][1]].tolist() == long_prompt[0]
    cut = sft_batch([([1] * 9, list(range(3, 13)))], pad_id=0, max_length=14)  # 9 + 10 > 14: 5 kept
    assert cut["tokens"][0][cut["mask"][0]].tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="pair 1: a prompt of 14 tokens leaves no room under sft.max_length=14"):
        sft_batch([short, ([1] * 14, [2])], pad_id=0, max_length=14)


def test_forward_flops_sum_flops_per_token_over_positions():
    head = 2 * MODEL.vocab_size * MODEL.hidden_size
    assert MODEL.flops_per_token(9) - MODEL.flops_per_token(9, head=False) == head
    rng = np.random.default_rng(0)
    for _ in range(5):
        start, stop = sorted(rng.integers(0, 100, 2))
        brute = sum(MODEL.flops_per_token(i) for i in range(start + 1, stop + 1))
        assert forward_flops(MODEL, start, stop) == pytest.approx(brute, rel=1e-12)
        # the LM head on the last 3 tokens only (log-probs of a completion)
        brute = sum(MODEL.flops_per_token(i, head=i > stop - 3) for i in range(start + 1, stop + 1))
        assert forward_flops(MODEL, start, stop, logits=min(3, stop - start)) == pytest.approx(brute, rel=1e-12)
    # prefill once per distinct prompt (the head on its last token: every row's first draw), then one
    # forward per further completion token of each of the G rows
    prompts, completions = np.array([5, 5, 5, 7, 7, 7]), np.array([1, 4, 0, 2, 2, 3])
    expected = sum(MODEL.flops_per_token(i, head=i == p) for p in (5, 7) for i in range(1, p + 1))
    expected += sum(MODEL.flops_per_token(i) for p, c in zip(prompts, completions, strict=True)
                    for i in range(p + 1, p + c))
    assert generation_flops(MODEL, prompts, completions, 3) == pytest.approx(expected, rel=1e-12)
    # scoring: each run's prompt once (no head), then every row's completion tokens with the head
    for run in (1, 3):
        expected = sum(MODEL.flops_per_token(i, head=False) for p in prompts[::run] for i in range(1, p + 1))
        expected += sum(MODEL.flops_per_token(i) for p, c in zip(prompts, completions, strict=True)
                        for i in range(p + 1, p + c + 1))
        assert scoring_flops(MODEL, prompts, completions, run) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow  # the shared single-device run takes ~20-50 s to compile and run
def test_step_reports_flops_per_second_and_mfu_when_the_peak_is_known(initial, single, monkeypatch):
    trainer, history, _, _ = single
    assert all(m["perf/flops_per_s"] > 0 and "perf/mfu" not in m for m in history)  # CPU: no known peak
    reset(trainer, initial)
    monkeypatch.setattr(trainer, "_peak_flops", 1e12)
    m = trainer.step(PromptStream(trainer.config.prompts_per_step))
    assert m["perf/mfu"] == pytest.approx(m["perf/flops_per_s"] / 1e12)


# ------------------------------------------------------------------------------------ non-finite


@pytest.mark.slow  # the shared single-device run takes ~20-50 s to compile and run
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(initial, single, tmp_path):
    trainer, _, _, _ = single
    reset(trainer, initial)
    real_step = trainer.step

    def step(batches):
        if trainer.step_count == 2:  # poison a weight: the real step then computes a NaN loss
            scale = trainer.params["final_norm"]["scale"]
            scale.set_value(scale[...].at[0].set(jnp.nan))
        return real_step(batches)

    trainer.step = step
    evaluate = lambda _: {"eval/pass@1_stderr": float("nan")}  # one problem: no standard error, not a bad step
    try:
        with pytest.raises(NonFiniteError, match=r"step 3: non-finite metrics \['train/.*'train/loss'") as raised:
            run_loop(trainer, PromptStream(trainer.config.prompts_per_step), steps=6, workdir=tmp_path,
                     save_every=1, keep=5, evaluate=evaluate, eval_every=1)
    finally:
        del trainer.step
    assert "the last good checkpoint is kept" in str(raised.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["eval/pass@1_stderr"] is None for r in rows)  # (JSON null)


def ynn_dots(compiled) -> int:
    """How many matmuls a compiled CPU program runs inside YNNPACK fusions."""
    text = compiled.as_text()
    called = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", text)
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S)}
    return sum(" dot(" in bodies[name] for name in called)


def test_rewards_get_the_completion_token_counts_so_dapo_overlong_shaping_runs_from_a_config(initial):
    """The trainer passes each completion's token count (stop token included) as `completion_length`; a
    config table binds the overlong reward's options. DAPO eq. 13 with L_max = 6, L_cache = 4."""
    from r1jax.stages import reward_table

    tok = CharTokenizer()
    table = reward_table(ConfigDict({"overlong": {"weight": 0.5, "max_length": 6, "cache_length": 4}}))
    trainer = GRPOTrainer(rl_config(), model_from(initial), tok, combine(table))
    lengths = np.array([1, 2, 3, 5, 6, 7, 8, 8])
    tokens = np.full((8, NEW_TOKENS), tok.pad_id)
    for row, n in enumerate(lengths):
        tokens[row, :n] = 3  # "a" …
    tokens[lengths < NEW_TOKENS, lengths[lengths < NEW_TOKENS] - 1] = tok.eos_id  # … ended by the stop token
    out = SampleOutput(*(None,) * len(SampleOutput._fields))._replace(tokens=tokens, lengths=lengths)
    totals, info = trainer._score_rewards({"prompt": ["x", "y"]}, out)
    expected = [0.0 if n <= 2 else -1.0 if n > 6 else (2 - n) / 4 for n in lengths]  # 0 up to 6 − 4, ramp, −1
    np.testing.assert_allclose(info["columns"]["overlong"], expected)
    np.testing.assert_allclose(totals, 0.5 * np.asarray(expected))


class OffSampler(GRPOTrainer):
    """A trainer whose sampler's log-probs are off by 0.5 per token (as a bf16 decode can be): its
    tokens are the same, so only the ratio's π_old can tell."""

    def sample(self, prompt_ids, key):
        out = super().sample(prompt_ids, key)
        return out._replace(policy_logprobs=jnp.where(out.mask, out.policy_logprobs - 0.5, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("passes", [(1, 1), (2, 2)])  # (μ, minibatches): π_old in the update / a scoring pass
def test_old_log_probs_are_the_trainers_unless_the_samplers_are_asked_for(initial, passes):
    mu, minibatches = passes

    def one_step(cls, old_logprobs):
        config = rl_config(loss=GRPOConfig(group_size=4, beta=0.04, num_iterations=mu), num_minibatches=minibatches,
                           micro_batches=2, old_logprobs=old_logprobs)
        trainer = cls(config, model_from(initial), CharTokenizer(), combine({"a": (fraction_of_a, 1.0)}))
        metrics = trainer.step(PromptStream(config.prompts_per_step))
        return host(trainer.params), metrics

    exact, metrics = one_step(GRPOTrainer, "trainer")
    assert max_rel_diff(one_step(OffSampler, "trainer")[0], exact) == 0.0  # the sampler's log-probs are not read
    assert (metrics["time/old_logp"] > 0) == (mu * minibatches > 1)
    if mu == 1:  # ratio exactly 1 at the one update: nothing clipped
        assert metrics["train/clip_frac_low"] == metrics["train/clip_frac_high"] == 0.0
    off, off_metrics = one_step(OffSampler, "sampler")
    assert max_rel_diff(off, exact) > 1e-3  # π_old from the sampler: the ratio e^0.5 is clipped
    assert off_metrics["train/clip_frac_high"] + off_metrics["train/clip_frac_low"] > 0.2


def test_weight_decay_skips_biases_and_norm_scales_whatever_their_rank():
    """AdamW's decoupled decay (zero gradients: the update is −lr·wd·p) reaches every matrix, the
    embedding included, and no norm scale or bias — Qwen2's q/k/v biases are [heads, head_dim]."""
    _, abstract = abstract_model(get_preset("tiny-qwen2"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), abstract)
    optimizer = make_optimizer(OptimConfig(learning_rate=1.0, weight_decay=0.1, max_grad_norm=0.0))
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    kept = []
    for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params), strict=True):
        name = jax.tree_util.keystr(path)
        exempt = "bias" in name or "scale" in name
        np.testing.assert_allclose(np.asarray(u), 0.0 if exempt else -0.1 * np.asarray(p), rtol=1e-6, err_msg=name)
        kept += [name] * (exempt and u.ndim > 1)
    assert any("q_bias" in n for n in kept), kept  # the rank-2 biases are among the exempt


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU setting")
def test_training_programs_run_their_matmuls_outside_ynnpack_on_cpu(initial):
    if not training_compiler_options():
        pytest.skip("this XLA has no YNNPACK fusion option")
    with pytest.MonkeyPatch.context() as m:  # a choice made in XLA_FLAGS stands
        m.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
        assert training_compiler_options.__wrapped__() == {}
    graphdef, state = initial
    params, batch = jax.tree.map(jnp.asarray, state), grpo_batch(group=2)
    score = make_score_fn(graphdef, group_size=2)
    assert ynn_dots(jax.jit(score.__wrapped__).lower(params, batch).compile()) > 0  # XLA's default
    assert ynn_dots(score.lower(params, batch).compile()) == 0
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2))
    objective = grpo_objective(GRPOConfig(group_size=2), temperature=1.0, chunk_size=4)
    step = make_update_step(graphdef, optimizer, objective, group_size=2)
    assert ynn_dots(step.lower(params, optimizer.init(params), batch).compile()) == 0
