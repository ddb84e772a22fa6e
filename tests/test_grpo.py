"""Tests for r1jax.grpo: each preset against an independent float64 NumPy implementation (value and
analytic gradient), finite differences, the on-policy zero-loss property, micro-batch and 8-device
gradient equality, transforms, light imports, errors, non-finite inputs, chunked log-probs and the
README example.

Float64 runs inside `jax.enable_x64(True)` (the `x64` fixture), never globally: conftest is shared.
"""

import functools
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax import grpo
from r1jax.grpo import GRPOConfig

REPO = Path(__file__).resolve().parents[1]
L_MAX = 12  # T, and Dr.GRPO's constant normaliser in these tests

# The configurations every equality test runs: the four presets, plus variants that reach the dual
# clip, the k1/k2 estimators and GSPO under a token-mean aggregation with a KL term.
CONFIGS = {
    "grpo": GRPOConfig.preset("grpo"),
    "dapo": GRPOConfig.preset("dapo"),
    "dr_grpo": GRPOConfig.preset("dr_grpo", max_completion_length=L_MAX),
    "gspo": GRPOConfig.preset("gspo"),
    "grpo_dual_k2": GRPOConfig.preset("grpo", dual_clip=1.3, kl_estimator="k2", beta=0.05),
    "dapo_k1": GRPOConfig.preset("dapo", beta=0.02, kl_estimator="k1"),
    "gspo_token_mean_k3": GRPOConfig.preset("gspo", beta=0.03, aggregation="token_mean"),
}
PRESETS = ["grpo", "dapo", "dr_grpo", "gspo"]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------------------------------
# Data and the independent NumPy reference.


def make_batch(seed: int, config: GRPOConfig, b: int = 16, t: int = L_MAX) -> dict[str, np.ndarray]:
    """Random ragged batch: rows of 1, 2 and T tokens, one all-padding row, one mask with a hole."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, b)
    lengths[:4] = [1, 2, t, 3]
    lengths[5] = 0
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[2, 4] = False
    logp = -rng.gamma(2.0, 1.0, (b, t))
    if config.ratio_level == "sequence":  # sequence log-ratios around GSPO's tiny clip range
        old = logp + rng.uniform(-8e-4, 8e-4, (b, 1)) + rng.normal(0, 1e-4, (b, t))
    else:
        old = logp + rng.normal(0, 0.3, (b, t))
    ref = logp + rng.normal(0, 0.2, (b, t))
    adv = rng.normal(size=b)
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "advantages": adv, "mask": mask}


def np_objective(r, a, lo, hi, dual):
    """min(r·A, clip(r)·A) [dual-clipped] and its derivative in r, elementwise, float64."""
    unclipped, clipped = r * a, np.clip(r, lo, hi) * a
    take_unclipped = unclipped <= clipped  # inside [lo, hi] both coincide and d/dr = A
    value = np.where(take_unclipped, unclipped, clipped)
    deriv = np.where(take_unclipped, a, 0.0)
    if dual is not None:
        active = (a < 0) & (value < dual * a)
        value = np.where(active, dual * a, value)
        deriv = np.where(active, 0.0, deriv)
    return value, deriv


def np_grpo(batch, c: GRPOConfig, num_sequences=None, num_tokens=None):
    """Loss, dloss/dlogp and clip fractions, written from the papers' formulas in float64 NumPy.

    GSPO is written in its sequence-level form (one ratio s_i per sequence, ds_i/dlogp_t = s_i/|o_i|),
    independent of the per-token "GSPO-token" form the code uses.
    """
    lp, old, ref = (np.asarray(batch[k], np.float64) for k in ("logp", "old_logp", "ref_logp"))
    adv = np.asarray(batch["advantages"], np.float64)
    m = np.asarray(batch["mask"], bool).astype(np.float64)
    lengths = m.sum(1)
    n_seq = (lengths > 0).sum() if num_sequences is None else num_sequences
    n_tok = lengths.sum() if num_tokens is None else num_tokens
    safe_len = np.maximum(lengths, 1)[:, None]
    if c.aggregation == "seq_mean_token_mean":
        w = m / safe_len / n_seq
    elif c.aggregation == "token_mean":
        w = m / n_tok
    else:
        w = m / (c.max_completion_length * n_seq)
    lo, hi = 1 - c.epsilon_low, 1 + c.epsilon_high
    if c.ratio_level == "token":
        r = np.exp(lp - old)
        obj, dobj = np_objective(r, adv[:, None], lo, hi, c.dual_clip)
        loss = -(w * obj).sum()
        grad = -w * dobj * r
        r_tok = r
    else:
        s = np.exp((m * (lp - old)).sum(1) / safe_len[:, 0])  # [B]
        obj, dobj = np_objective(s, adv, lo, hi, c.dual_clip)
        row_weight = w.sum(1)  # Σ_t w_{i,t}
        loss = -(row_weight * obj).sum()
        grad = -(row_weight * dobj * s / safe_len[:, 0])[:, None] * m
        r_tok = np.broadcast_to(s[:, None], lp.shape)
    if c.beta > 0:
        d = ref - lp
        if c.kl_estimator == "k3":
            kl, dkl = np.exp(d) - d - 1, 1 - np.exp(d)
        elif c.kl_estimator == "k2":
            kl, dkl = 0.5 * d**2, -d
        else:
            kl, dkl = -d, np.ones_like(d)
        loss += c.beta * (w * kl).sum()
        grad = grad + c.beta * w * dkl
    a = adv[:, None]
    fracs = {
        "clip_frac_low": (m * ((a < 0) & (r_tok < lo))).sum() / n_tok,
        "clip_frac_high": (m * ((a > 0) & (r_tok > hi))).sum() / n_tok,
    }
    return loss, grad, fracs


@functools.partial(jax.jit, static_argnames=("config",))
def loss_and_grad(logp, old_logp, ref_logp, advantages, mask, config, num_sequences=None, num_tokens=None):
    """One jitted entry point, so tests with equal shapes and config share a compilation."""

    def f(lp):
        ref = ref_logp if config.beta > 0 else None
        kw = {"num_sequences": num_sequences, "num_tokens": num_tokens}
        return grpo.grpo_loss(lp, old_logp, ref, advantages, mask, config, **kw)

    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logp)
    return loss, grad, metrics


def jax_loss(batch, c, **counts):
    keys = ("logp", "old_logp", "ref_logp", "advantages", "mask")
    return loss_and_grad(*(jnp.asarray(batch[k]) for k in keys), c, **counts)


# --------------------------------------------------------------------------------------------------
# Loss and gradient against the reference, finite differences, on-policy property.


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_grad_match_float64_numpy(x64, name):
    c = CONFIGS[name]
    batch = make_batch(0, c)
    # This batch's own counts (what the defaults compute), then arbitrary "global" ones.
    n_seq, n_tok = int((batch["mask"].sum(1) > 0).sum()), int(batch["mask"].sum())
    for counts in ((n_seq, n_tok), (37, 301)):
        ref_loss, ref_grad, ref_fracs = np_grpo(batch, c, *counts)
        loss, grad, metrics = jax_loss(batch, c, num_sequences=counts[0], num_tokens=counts[1])
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-12 * np.abs(ref_grad).max())
        assert np.linalg.norm(grad - ref_grad) <= 1e-6 * np.linalg.norm(ref_grad)
        for k, v in ref_fracs.items():
            np.testing.assert_allclose(metrics[k], v, rtol=1e-12)
    # The data must reach the clipped branches, or the comparison would prove little.
    assert 0 < ref_fracs["clip_frac_low"] + ref_fracs["clip_frac_high"] < 1
    if c.dual_clip is not None:
        assert metrics["clip_frac_dual"] > 0
    # Padding positions get exactly zero gradient.
    assert np.all(np.asarray(grad)[~batch["mask"]] == 0)


def test_default_counts_are_this_batchs(x64):
    c = CONFIGS["grpo_dual_k2"]
    batch = make_batch(1, c)
    ref_loss, ref_grad, _ = np_grpo(batch, c)  # counts from this batch: 15 non-empty rows
    loss, grad, metrics = jax_loss(batch, c)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-12 * np.abs(ref_grad).max())
    assert (int(metrics["num_sequences"]), int(metrics["num_tokens"])) == (15, batch["mask"].sum())
    assert [int(x) for x in grpo.batch_counts(jnp.asarray(batch["mask"]))] == [15, batch["mask"].sum()]


@pytest.mark.parametrize("name", ["dr_grpo", "grpo_dual_k2", "gspo_token_mean_k3"])
def test_grad_matches_finite_differences(x64, name):
    c = CONFIGS[name]
    batch = make_batch(2, c)
    counts = {"num_sequences": 15, "num_tokens": int(batch["mask"].sum())}
    _, grad, _ = jax_loss(batch, c, **counts)
    rows, cols = np.nonzero(batch["mask"])
    pick = np.random.default_rng(3).choice(len(rows), 12, replace=False)
    h = 1e-6
    for i, j in zip(rows[pick], cols[pick], strict=True):
        plus, minus = ({**batch, "logp": batch["logp"].copy()} for _ in range(2))
        plus["logp"][i, j] += h
        minus["logp"][i, j] -= h
        fd = (jax_loss(plus, c, **counts)[0] - jax_loss(minus, c, **counts)[0]) / (2 * h)
        np.testing.assert_allclose(grad[i, j], fd, rtol=1e-6, atol=1e-9)
    assert np.abs(np.asarray(grad)[rows[pick], cols[pick]]).max() > 1e-4


@pytest.mark.parametrize("name", ["grpo", "gspo"])
def test_on_policy_loss_is_zero_but_gradient_is_not(x64, name):
    """μ = 1, β = 0, group-normalised advantages: loss value 0, policy gradient nonzero."""
    c = GRPOConfig.preset(name, beta=0.0)
    batch = make_batch(4, c)
    batch["mask"][5, :3] = True  # every completion has a token, so each group's Σ A_i = 0 counts fully
    rewards = np.random.default_rng(5).integers(0, 2, 16).astype(np.float64)
    rewards[:4] = [1, 0, 0, 1]
    adv, _ = jax.jit(grpo.group_advantages, static_argnums=1)(jnp.asarray(rewards), 4)
    lp, mask = jnp.asarray(batch["logp"]), jnp.asarray(batch["mask"])

    @jax.jit
    def detached_and_not(lp):
        f = lambda lp, old: grpo.grpo_loss(lp, old(lp), None, adv, mask, c)[0]
        return jax.value_and_grad(f)(lp, jax.lax.stop_gradient), jax.grad(f)(lp, lambda x: x)

    (loss, grad), grad_undetached = detached_and_not(lp)
    assert abs(float(loss)) < 1e-12
    assert np.abs(np.asarray(grad)).max() > 1e-3
    # Passing old_logp=logp (not detached) is the same thing: old_logp is a constant by contract.
    np.testing.assert_array_equal(grad, grad_undetached)
    # The gradient is the plain policy gradient −(1/N) Σ_i A_i/|o_i| Σ_t ∇logp_t.
    lengths = batch["mask"].sum(1)
    expected = -(np.asarray(adv) / lengths / 16)[:, None] * batch["mask"]
    np.testing.assert_allclose(grad, expected, rtol=1e-12)


def test_on_policy_token_mean_value_is_length_weighted(x64):
    """Documented: with token_mean the on-policy value is −Σ|o_i|A_i/N_tok, not 0."""
    c = GRPOConfig.preset("dapo")
    batch = make_batch(6, c)
    batch["old_logp"] = batch["logp"]
    loss, _, _ = jax_loss(batch, c)
    lengths = batch["mask"].sum(1)
    np.testing.assert_allclose(loss, -(lengths * batch["advantages"]).sum() / lengths.sum(), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Micro-batches and devices: a tiny shared "model" so that gradients are taken w.r.t. shared
# parameters, as in training: logits = h·w₀ + w₁ with w = [2, V] (elementwise, so it compiles fast).
# The NumPy reference chains dL/dlogp through the log-softmax: dL/dlogits = g·(onehot − p).


def np_logp(hidden, w, targets):
    logits = hidden * w[0] + w[1]
    logits = logits - logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp_all, targets[..., None], -1)[..., 0], np.exp(logp_all)


def model_batch(seed: int, c: GRPOConfig, b: int = 16, t: int = L_MAX, v: int = 24):
    rng = np.random.default_rng(seed)
    base = make_batch(seed, c, b, t)
    hidden = rng.normal(size=(b, t, v))
    w = rng.normal(size=(2, v))
    scale = 1e-4 if c.ratio_level == "sequence" else 0.3
    targets = rng.integers(0, v, (b, t))
    return {
        "w": w,
        "hidden": hidden,
        "targets": targets,
        "old_logp": np_logp(hidden, w + scale * rng.normal(size=w.shape), targets)[0],
        "ref_logp": np_logp(hidden, w + 0.2 * rng.normal(size=w.shape), targets)[0],
        "advantages": base["advantages"],
        "mask": base["mask"],
    }


def np_model_reference(mb, c):
    logp, probs = np_logp(mb["hidden"], mb["w"], mb["targets"])
    n_seq, n_tok = (mb["mask"].sum(1) > 0).sum(), mb["mask"].sum()
    loss, g, _ = np_grpo({**mb, "logp": logp}, c, n_seq, n_tok)  # g = dL/dlogp, 0 on padding
    dlogits = g[..., None] * (np.eye(probs.shape[-1])[mb["targets"]] - probs)  # [B, T, V]
    return loss, np.stack([(dlogits * mb["hidden"]).sum((0, 1)), dlogits.sum((0, 1))])


def model_loss(c, w, hidden, targets, old_logp, ref_logp, advantages, mask, num_sequences, num_tokens):
    logp = grpo.token_logprobs(hidden * w[0] + w[1], targets, mask)
    return grpo.grpo_loss(
        logp, old_logp, ref_logp, advantages, mask, c, num_sequences=num_sequences, num_tokens=num_tokens
    )


ROWS = ("hidden", "targets", "old_logp", "ref_logp", "advantages", "mask")
SUMMABLE = ("loss", "pg_loss", "clip_frac_low", "clip_frac_high", "ratio_mean", "advantage_mean", "nonfinite")


@functools.partial(jax.jit, static_argnames=("c",))
def micro_step(c, w, rows, num_sequences, num_tokens):
    return jax.value_and_grad(lambda w: model_loss(c, w, *rows, num_sequences, num_tokens), has_aux=True)(w)


def pad_rows(rows: dict[str, np.ndarray], b: int) -> list[jax.Array]:
    """Fill a micro-batch up to b all-padding rows, as a trainer with one static micro-batch shape
    would (one compilation for every k). The loss inputs of those rows are NaN, to prove them inert."""
    out = []
    for name in ROWS:
        x = rows[name]
        nan = name in ("old_logp", "ref_logp", "advantages")
        fill = np.full(x.shape[1:], np.nan) if nan else np.zeros(x.shape[1:], x.dtype)
        out.append(jnp.asarray(np.concatenate([x, np.broadcast_to(fill, (b - len(x),) + x.shape[1:])])))
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_microbatch_gradients_sum_to_full_batch(x64, name):
    c = CONFIGS[name]
    b = 16
    mb = model_batch(7, c, b)
    ref_loss, ref_grad = np_model_reference(mb, c)
    assert np.linalg.norm(ref_grad) > 0
    w = jnp.asarray(mb["w"])
    n_seq, n_tok = grpo.batch_counts(jnp.asarray(mb["mask"]))

    def accumulate(k, counts):
        loss, grad, metrics = 0.0, 0.0, dict.fromkeys(SUMMABLE, 0.0)
        for s in range(0, b, b // k):
            (l_, m_), g_ = micro_step(c, w, pad_rows({r: mb[r][s : s + b // k] for r in ROWS}, b), *counts)
            loss, grad = loss + l_, grad + g_
            metrics = {m: metrics[m] + m_[m] for m in SUMMABLE}
        return loss, np.asarray(grad), metrics

    full_metrics = accumulate(1, (n_seq, n_tok))[2]
    for k in (1, 2, 4, 8):
        loss, grad, metrics = accumulate(k, (n_seq, n_tok))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-12, err_msg=f"k={k}")
        assert np.linalg.norm(grad - ref_grad) <= 1e-6 * np.linalg.norm(ref_grad), f"k={k}"
        for m in SUMMABLE:
            np.testing.assert_allclose(metrics[m], full_metrics[m], rtol=1e-6, atol=1e-12, err_msg=m)
    if name == "grpo":  # negative control: each micro-batch normalising by its own counts drifts
        local = accumulate(4, (None, None))
        assert np.linalg.norm(local[1] - ref_grad) > 1e-3 * np.linalg.norm(ref_grad)


@functools.partial(jax.jit, static_argnames=("c", "mesh"))
def full_and_per_shard(c, mesh, w, rows, num_sequences, num_tokens):
    """(a) one full-batch value_and_grad on batch-sharded inputs; (b) each device differentiates only
    its shard's loss (global counts), then psum."""
    full = jax.value_and_grad(lambda w: model_loss(c, w, *rows, num_sequences, num_tokens)[0])(w)

    def per_shard(w, *rows):
        w = jax.lax.pcast(w, "data", to="varying")  # a per-device copy: its gradient is local
        loss, grad = jax.value_and_grad(lambda w: model_loss(c, w, *rows, num_sequences, num_tokens)[0])(w)
        return jax.lax.psum(loss, "data"), jax.lax.psum(grad, "data")

    specs = (P(),) + (P("data"),) * len(rows)
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=(P(), P()))(w, *rows)
    return full, sharded


@pytest.mark.parametrize("name", PRESETS)
def test_sharded_over_8_devices_matches_numpy(x64, name):
    c = CONFIGS[name]
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mb = model_batch(8, c)
    ref_loss, ref_grad = np_model_reference(mb, c)
    n_seq, n_tok = grpo.batch_counts(jnp.asarray(mb["mask"]))
    rows = [jax.device_put(jnp.asarray(mb[r]), NamedSharding(mesh, P("data"))) for r in ROWS]
    assert len(rows[0].sharding.device_set) == 8
    for loss, grad in full_and_per_shard(c, mesh, jnp.asarray(mb["w"]), rows, n_seq, n_tok):
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-12)
        assert np.linalg.norm(grad - ref_grad) <= 1e-6 * np.linalg.norm(ref_grad)


def test_explicit_sharding(x64):
    """grpo_loss and chunked_token_logprobs on explicitly sharded inputs (sharding-in-types)."""
    c = CONFIGS["grpo_dual_k2"]
    batch = make_batch(9, c)
    keys = ("logp", "old_logp", "ref_logp", "advantages", "mask")
    counts = grpo.batch_counts(jnp.asarray(batch["mask"]))
    ref_loss, ref_grad, _ = np_grpo(batch, c, *(int(x) for x in counts))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        placed = [jax.device_put(jnp.asarray(batch[k]), NamedSharding(mesh, P("data"))) for k in keys]
        loss, grad, _ = loss_and_grad(*placed, c, *counts)
    assert grad.sharding.spec == P("data", None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-12)
    assert np.linalg.norm(grad - ref_grad) <= 1e-6 * np.linalg.norm(ref_grad)

    # chunked_token_logprobs keeps a batch-sharded hidden state sharded, gradient included.
    rng = np.random.default_rng(9)
    hidden, unembed = rng.normal(size=(8, 7, 4)), rng.normal(size=(11, 4))
    targets = rng.integers(0, 11, (8, 7))

    def f(h, w, t):
        logp, ent = grpo.chunked_token_logprobs(h, w, t, chunk_size=3, return_entropy=True)
        return jnp.sum(logp) + jnp.sum(ent)

    grad_fn = jax.jit(jax.grad(f, argnums=(0, 1)))
    want = grad_fn(hidden, unembed, targets)
    with jax.set_mesh(mesh):
        h, t = (jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data"))) for x in (hidden, targets))
        got = grad_fn(h, unembed, t)
    assert got[0].sharding.spec == P("data", None, None)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Transforms, imports, errors, non-finite inputs.


def test_jit_grad_vmap_float32():
    c = CONFIGS["grpo_dual_k2"]
    batches = [make_batch(s, c) for s in (10, 11, 12)]
    keys = ("logp", "old_logp", "ref_logp", "advantages", "mask")
    stacked = [jnp.asarray(np.stack([b[k] for b in batches])) for k in keys]
    stacked = [x.astype(jnp.float32) if k != "mask" else x for k, x in zip(keys, stacked, strict=True)]
    assert stacked[0].dtype == jnp.float32

    def f(lp, old, ref, adv, mask):
        return grpo.grpo_loss(lp, old, ref, adv, mask, c)[0]

    vmapped = jax.jit(jax.vmap(jax.value_and_grad(f)))(*stacked)
    single = jax.jit(jax.value_and_grad(f))
    for i in range(3):
        loss, grad = single(*(x[i] for x in stacked))
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(vmapped[0][i], loss, rtol=1e-5)
        np.testing.assert_allclose(vmapped[1][i], grad, rtol=1e-5, atol=1e-7)
        ref_loss, ref_grad, _ = np_grpo(batches[i], c)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
        assert np.linalg.norm(grad - ref_grad) <= 1e-4 * np.linalg.norm(ref_grad)


def test_import_does_not_pull_heavy_frameworks():
    code = (
        "import sys, r1jax.grpo\n"
        "heavy = ('flax', 'optax', 'orbax', 'grain', 'torch', 'transformers', 'ml_collections')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _call(**overrides):
    """grpo_loss on [4, 6] inputs, traced only (jax.eval_shape): the checks run at trace time."""
    b, t = 4, 6
    args = {
        "logp": jax.ShapeDtypeStruct((b, t), jnp.float32),
        "old_logp": jax.ShapeDtypeStruct((b, t), jnp.float32),
        "ref_logp": jax.ShapeDtypeStruct((b, t), jnp.float32),
        "advantages": jax.ShapeDtypeStruct((b,), jnp.float32),
        "mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
    }
    args.update(overrides)
    config = args.pop("config", GRPOConfig.preset("grpo"))
    return jax.eval_shape(functools.partial(grpo.grpo_loss, config=config), **args)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"old_logp": jnp.zeros((4, 5))}, r"old_logp\.shape=\(4, 5\) must equal logp\.shape=\(4, 6\)"),
        ({"ref_logp": jnp.zeros((3, 6))}, r"ref_logp\.shape=\(3, 6\) must equal logp\.shape=\(4, 6\)"),
        ({"advantages": jnp.zeros((4, 6))}, r"advantages\.shape=\(4, 6\) must equal logp\.shape\[:1\]=\(4,\)"),
        ({"mask": jnp.ones((4, 7))}, r"mask\.shape=\(4, 7\) must equal logp\.shape=\(4, 6\)"),
        ({"logp": jnp.zeros((4, 6, 2))}, r"logp\.shape=\(4, 6, 2\) must be \[B, T\]"),
        ({"entropy": jnp.zeros((4,))}, r"entropy\.shape=\(4,\) must equal logp\.shape=\(4, 6\)"),
        ({"logits": jnp.zeros((4, 5, 9))}, r"logits\.shape=\(4, 5, 9\) must be \[B, T, V\]"),
        ({"old_logp": jnp.zeros((4, 6), jnp.bfloat16)}, r"old_logp\.dtype=bfloat16 must equal logp\.dtype=float32"),
        ({"advantages": jnp.zeros((4,), jnp.int32)}, r"advantages\.dtype=int32 must be a floating dtype"),
        ({"logp": jnp.zeros((4, 6), jnp.int32)}, r"logp\.dtype=int32 must be a floating dtype"),
        ({"ref_logp": None}, r"ref_logp=None but GRPOConfig\.beta=0\.001 > 0"),
        ({"config": {"beta": 0}}, r"config=.* must be a GRPOConfig"),
    ],
)
def test_shape_and_dtype_errors_name_argument_and_both_shapes(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**overrides)


def test_ref_logp_none_skips_kl_when_beta_zero():
    _, metrics = _call(ref_logp=None, config=GRPOConfig.preset("dapo"))
    assert "kl" not in metrics and "kl" in _call()[1]
    # β = 0 never reads ref_logp: even a wrongly shaped one is not looked at.
    _call(ref_logp=jax.ShapeDtypeStruct((1, 1), jnp.float32), config=GRPOConfig.preset("dapo"))
    dapo = GRPOConfig.preset("dapo")
    jaxpr = jax.make_jaxpr(lambda lp, ref: grpo.grpo_loss(lp, lp, ref, lp[:, 0], lp > 0, dapo))
    jaxpr = str(jaxpr(jnp.zeros((4, 6)), jnp.zeros((4, 6))))
    assert "exp" in jaxpr and "expm1" not in jaxpr  # no k3 term was built


def test_logprob_and_chunk_errors():
    with pytest.raises(ValueError, match=r"targets\.shape=\(2, 4\) must equal logits\.shape\[:-1\]=\(2, 3\)"):
        grpo.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"targets\.dtype=float32 must be an integer"):
        grpo.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"unembed\.shape=\(4, 5\) must be \[V, D\] with D = hidden\.shape"):
        grpo.chunked_token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((4, 5)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"chunk_size=0 must be a positive Python int"):
        grpo.chunked_token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((5, 4)), jnp.zeros((2, 3), jnp.int32), chunk_size=0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"epsilon_low": -0.1}, r"GRPOConfig\.epsilon_low=-0\.1 must be a finite number >= 0"),
        ({"beta": float("nan")}, r"GRPOConfig\.beta=nan must be a finite number >= 0"),
        ({"dual_clip": 0.5}, r"GRPOConfig\.dual_clip=0\.5 must be None or a finite number > 1"),
        ({"aggregation": "mean"}, r"GRPOConfig\.aggregation='mean' must be one of \('seq_mean_token_mean'"),
        ({"kl_estimator": "k4"}, r"GRPOConfig\.kl_estimator='k4' must be one of"),
        ({"ratio_level": "seq"}, r"GRPOConfig\.ratio_level='seq' must be one of"),
        ({"group_size": 1}, r"GRPOConfig\.group_size=1 must be an int >= 2"),
        ({"num_iterations": 0}, r"GRPOConfig\.num_iterations=0 must be an int >= 1"),
        ({"aggregation": "seq_mean_token_sum_norm"}, r"GRPOConfig\.max_completion_length=None"),
        ({"advantage_std_ddof": 2}, r"GRPOConfig\.advantage_std_ddof=2 must be 0 or 1"),
        ({"advantage_eps": -1e-4}, r"GRPOConfig\.advantage_eps=-0\.0001 must be a finite number >= 0"),
    ],
)
def test_config_validation_names_field_and_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GRPOConfig(**kwargs)


def test_presets():
    assert GRPOConfig.preset("grpo") == GRPOConfig()
    dapo = GRPOConfig.preset("dapo")
    assert (dapo.epsilon_low, dapo.epsilon_high, dapo.beta, dapo.aggregation) == (0.2, 0.28, 0.0, "token_mean")
    gspo = GRPOConfig.preset("gspo")
    assert (gspo.ratio_level, gspo.epsilon_low, gspo.epsilon_high) == ("sequence", 3e-4, 4e-4)
    with pytest.raises(ValueError, match=r"GRPOConfig\.max_completion_length=None"):
        GRPOConfig.preset("dr_grpo")
    assert GRPOConfig.preset("dr_grpo", max_completion_length=64).advantage_scale == "none"
    with pytest.raises(ValueError, match=r"preset='ppo' must be one of \('grpo', 'dapo', 'dr_grpo', 'gspo'\)"):
        GRPOConfig.preset("ppo")
    with pytest.raises(ValueError, match=r"unknown GRPOConfig field\(s\) \['epsilon'\]"):
        GRPOConfig.preset("grpo", epsilon=0.1)
    hash(GRPOConfig.preset("gspo"))  # usable as a static jit argument


def test_nonfinite_inputs(x64):
    c = CONFIGS["grpo_dual_k2"]
    batch = make_batch(13, c)
    mask = batch["mask"]
    clean_loss, clean_grad, clean_metrics = jax_loss(batch, c)
    assert clean_metrics["nonfinite"] == 0

    # Garbage at padded positions (and in an all-padding row's advantage) changes nothing.
    dirty = {k: v.copy() for k, v in batch.items()}
    for k in ("logp", "old_logp", "ref_logp"):
        dirty[k][~mask] = np.nan
    dirty["old_logp"][0, -1] = -np.inf
    dirty["advantages"][5] = np.nan  # row 5 has no tokens
    loss, grad, metrics = jax_loss(dirty, c)
    assert metrics["nonfinite"] == 0
    np.testing.assert_array_equal(loss, clean_loss)
    np.testing.assert_array_equal(grad, clean_grad)

    # Non-finite at valid positions: counted, and loss and gradient become NaN (never silently finite).
    bad = {k: v.copy() for k, v in batch.items()}
    rows, cols = np.nonzero(mask)
    bad["logp"][rows[0], cols[0]] = np.nan
    bad["ref_logp"][rows[1], cols[1]] = np.inf
    # −inf in old_logp makes r = +inf; with A > 0 the clip alone would hide it.
    i = int(np.nonzero((batch["advantages"] > 0) & (mask.sum(1) > 0))[0][0])
    bad["old_logp"][i, np.nonzero(mask[i])[0][0]] = -np.inf
    loss, grad, metrics = jax_loss(bad, c)
    assert int(metrics["nonfinite"]) == 3
    assert np.isnan(loss) and np.all(np.isnan(grad[mask]))

    only_old = {k: v.copy() for k, v in batch.items()}
    only_old["old_logp"][i, np.nonzero(mask[i])[0][0]] = -np.inf
    loss, grad, metrics = jax_loss(only_old, c)
    assert int(metrics["nonfinite"]) == 1 and np.isnan(loss)

    # A finite but overflowing ratio in a clipped branch (A > 0) or on a zero advantage must not
    # produce NaN: there the policy objective is a constant (only the KL term has a gradient).
    huge = {k: v.copy() for k, v in batch.items()}
    j = np.nonzero(mask[i])[0][0]
    huge["old_logp"][i, j] = huge["logp"][i, j] - 800.0  # r = e^800 overflows float64
    huge["advantages"][0] = 0.0
    huge["old_logp"][0, 0] = huge["logp"][0, 0] - 800.0
    loss, grad, metrics = jax_loss(huge, c)
    assert int(metrics["nonfinite"]) == 0 and np.isfinite(loss) and np.all(np.isfinite(grad))
    assert metrics["ratio_max"] == np.inf and metrics["clip_frac_high"] > clean_metrics["clip_frac_high"]

    # Entropy is checked too.
    lp = jnp.asarray(batch["logp"])
    ent = jnp.where(jnp.asarray(mask), 1.0, jnp.nan).at[rows[0], cols[0]].set(jnp.inf)
    args = (lp, lp, lp, jnp.asarray(batch["advantages"]), jnp.asarray(mask), c)
    _, metrics = jax.jit(grpo.grpo_loss, static_argnums=5)(*args, entropy=ent)
    assert int(metrics["nonfinite"]) == 1


def test_metrics_values(x64):
    c = GRPOConfig.preset("grpo", beta=0.1)
    batch = make_batch(14, c)
    m = batch["mask"]
    logits = jnp.asarray(np.random.default_rng(0).normal(size=m.shape + (7,)))
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    _, metrics = jax.jit(functools.partial(grpo.grpo_loss, config=c))(**arrays, logits=logits)
    r = np.exp(batch["logp"] - batch["old_logp"])[m]
    np.testing.assert_allclose(metrics["ratio_mean"], r.mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["ratio_min"], r.min(), rtol=1e-12)
    np.testing.assert_allclose(metrics["ratio_max"], r.max(), rtol=1e-12)
    d = (batch["ref_logp"] - batch["logp"])[m]
    np.testing.assert_allclose(metrics["kl"], (np.exp(d) - d - 1).mean(), rtol=1e-12)
    x = np.asarray(logits)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(metrics["entropy"], (-(p * np.log(p)).sum(-1))[m].mean(), rtol=1e-12)
    a = batch["advantages"][m.sum(1) > 0]
    np.testing.assert_allclose(metrics["advantage_mean"], a.mean(), rtol=1e-12)
    np.testing.assert_allclose(metrics["advantage_std"], a.std(), rtol=1e-12)
    np.testing.assert_allclose([metrics["advantage_min"], metrics["advantage_max"]], [a.min(), a.max()])
    assert int(metrics["num_tokens"]) == m.sum() and int(metrics["num_sequences"]) == 15


# --------------------------------------------------------------------------------------------------
# Advantages.


ADVANTAGES = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale", "std_ddof"))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_match_numpy(x64, scale, ddof):
    rng = np.random.default_rng(15)
    rewards = rng.normal(size=(6, 4))
    rewards[1] = 1.0  # zero-variance group
    rewards[4] = 0.1  # zero-variance group whose mean is not exactly 0.1 in floating point
    adv, info = ADVANTAGES(jnp.asarray(rewards.reshape(-1)), 4, scale=scale, std_ddof=ddof)
    centred = rewards - rewards.mean(1, keepdims=True)
    if scale == "group":
        expected = centred / (rewards.std(1, ddof=ddof, keepdims=True) + 1e-6)
    elif scale == "batch":
        expected = centred / (rewards.std(ddof=ddof) + 1e-6)
    else:
        expected = centred
    expected[[1, 4]] = 0.0
    np.testing.assert_allclose(adv, expected.reshape(-1), rtol=1e-12, atol=1e-15)
    assert np.all(np.asarray(adv).reshape(6, 4)[[1, 4]] == 0.0)
    assert int(info["zero_variance_groups"]) == 2
    np.testing.assert_allclose(info["zero_variance_fraction"], 2 / 6)
    assert int(info["nonfinite_rewards"]) == 0


def test_group_advantages_sum_to_zero_and_errors(x64):
    adv, _ = ADVANTAGES(jnp.asarray([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), 4)
    np.testing.assert_allclose(np.asarray(adv).reshape(2, 4).sum(1), 0.0, atol=1e-12)
    adv, info = ADVANTAGES(jnp.asarray([1, 0, 1, 1], jnp.int32), 2)  # integer rewards are accepted
    assert adv.dtype == jnp.float32 and int(info["zero_variance_groups"]) == 1
    _, info = ADVANTAGES(jnp.asarray([np.nan, 0.0, 1.0, 0.0]), 2)
    assert int(info["nonfinite_rewards"]) == 1
    with pytest.raises(ValueError, match=r"group_size=3 must divide rewards\.shape\[0\]=8"):
        grpo.group_advantages(jnp.zeros(8), 3)
    with pytest.raises(ValueError, match=r"rewards\.shape=\(2, 4\) must be 1-D"):
        grpo.group_advantages(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match=r"scale='std' must be one of"):
        grpo.group_advantages(jnp.zeros(8), 4, scale="std")
    with pytest.raises(ValueError, match=r"std_ddof=4 must be in \[0, 4\)"):
        grpo.group_advantages(jnp.zeros(8), 4, std_ddof=4)


# --------------------------------------------------------------------------------------------------
# Token log-probs, chunked.


def test_token_logprobs_match_numpy(x64):
    rng = np.random.default_rng(16)
    logits = rng.normal(size=(3, 5, 11)) * 4
    targets = rng.integers(0, 11, (3, 5))
    mask = rng.random((3, 5)) < 0.7
    f = jax.jit(grpo.token_logprobs, static_argnames=("temperature",))
    for temp in (1.0, 0.7):
        x = logits / temp
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        expected = np.take_along_axis(x, targets[..., None], -1)[..., 0] - lse
        got = f(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), temperature=temp)
        np.testing.assert_allclose(got, np.where(mask, expected, 0.0), rtol=1e-12)
    # bf16 logits are computed in float32.
    out = jax.eval_shape(grpo.token_logprobs, jax.ShapeDtypeStruct((2, 3, 5), jnp.bfloat16), jnp.zeros((2, 3), int))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("chunk_size", [3, 7])
def test_chunked_token_logprobs_equal_unchunked_with_gradients(x64, chunk_size):
    rng = np.random.default_rng(17)
    b, t, d, v = 3, 7, 5, 13
    hidden = jnp.asarray(rng.normal(size=(b, t, d)))
    unembed = jnp.asarray(rng.normal(size=(v, d)))
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    mask = jnp.asarray(rng.random((b, t)) < 0.8)
    weights = jnp.asarray(rng.normal(size=(b, t)))

    def full(h, w):
        logits = jnp.einsum("btd,vd->btv", h, w)
        return grpo.token_logprobs(logits, targets, mask, temperature=0.9), grpo.token_entropy(
            logits, mask, temperature=0.9
        )

    def chunked(h, w):
        return grpo.chunked_token_logprobs(
            h, w, targets, mask, chunk_size=chunk_size, temperature=0.9, return_entropy=True
        )

    def value_and_grads(fn):
        def scalar(h, w):
            logp, ent = fn(h, w)
            return jnp.sum(logp * weights) + 0.3 * jnp.sum(ent * weights), (logp, ent)

        return jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(hidden, unembed)

    (_, (lp_a, ent_a)), grads_a = jax.jit(lambda: value_and_grads(full))()
    (_, (lp_b, ent_b)), grads_b = jax.jit(lambda: value_and_grads(chunked))()
    np.testing.assert_allclose(lp_b, lp_a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent_b, ent_a, rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(lp_b)[~np.asarray(mask)] == 0)
    for x, y in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-12)


def _largest_top_level_array(fn, *args) -> int:
    """Largest intermediate outside any loop body in fn's jaxpr: what stays live across the loop."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    sizes = [int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars]
    return max(sizes)


def test_chunked_gradient_never_holds_full_logits():
    b, t, d, v, c = 2, 64, 8, 512, 8
    hidden = jnp.ones((b, t, d))
    unembed = jnp.ones((v, d))
    targets = jnp.zeros((b, t), jnp.int32)

    def chunked(h, w):
        return jnp.sum(grpo.chunked_token_logprobs(h, w, targets, chunk_size=c))

    def full(h, w):
        return jnp.sum(grpo.token_logprobs(jnp.einsum("btd,vd->btv", h, w), targets))

    grad = jax.grad(chunked, argnums=(0, 1))
    # Loop residuals would show up here as a stacked [N, B, C, V] array; remat keeps only inputs.
    assert _largest_top_level_array(grad, hidden, unembed) < b * c * v * 2
    assert _largest_top_level_array(jax.grad(full, argnums=(0, 1)), hidden, unembed) >= b * t * v


# --------------------------------------------------------------------------------------------------
# README example.


def test_readme_example_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use the loss in your codebase", 1)
    assert len(section) == 2, "README.md lacks the section '## Use the loss in your codebase'"
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match, "no ```python block under '## Use the loss in your codebase'"
    code = match.group(1)
    assert len([ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]) <= 16
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert np.isfinite(namespace["loss"])
    assert int(namespace["metrics"]["nonfinite"]) == 0
    assert np.abs(np.asarray(namespace["grad"])).max() > 0
