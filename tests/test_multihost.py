"""Several hosts, simulated by 2 local processes of 4 CPU devices each (gloo collectives), against one
process of 8 devices doing the same global work."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker as worker  # noqa: E402
from test_trainer import initial_params  # noqa: E402

from r1jax.checkpoint import Checkpointer, CheckpointError  # noqa: E402
from r1jax.sampling import sample_groups  # noqa: E402
from r1jax.sharding import make_mesh  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(mode: str, tmp_path: Path, timeout: float = 600) -> list[dict[str, np.ndarray]]:
    """The worker's `mode` on processes 0 and 1; when one fails, the other (left waiting in a collective)
    is killed rather than waited for."""
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, worker.__file__, mode, str(i), str(port),
                                           str(tmp_path / f"{i}.npz")], env=env, cwd=REPO, stdout=out,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log.read_text()[-3000:]
    return [dict(np.load(tmp_path / f"{i}.npz")) for i in range(2)]


def test_sampling_on_two_processes_equals_one_process(tmp_path):
    """Each process samples its own prompts on a mesh over both processes' devices and gets back its
    own rows: together they equal one process sampling all the prompts (same key, same global rows)."""
    parts = run_two_processes("sample", tmp_path)
    graphdef, state = worker.model()
    ref = sample_groups(graphdef, state, worker.PROMPTS, worker.GROUP, jax.random.key(worker.SEED),
                        worker.sampling_config())
    for field in ("tokens", "mask", "lengths", "prompt_tokens"):
        got = np.concatenate([p[field] for p in parts])
        np.testing.assert_array_equal(got, np.asarray(getattr(ref, field)), err_msg=field)
    for field in ("logprobs", "policy_logprobs"):
        got = np.concatenate([p[field] for p in parts])
        np.testing.assert_allclose(got, np.asarray(getattr(ref, field)), atol=1e-5, rtol=0, err_msg=field)
    assert parts[0]["prompt_tokens"].shape == (16, 32)  # padded to process 1's longest prompt
    assert np.any(np.asarray(ref.mask).sum(1) < 12) and np.any(np.asarray(ref.mask).sum(1) == 12)


def test_evaluation_on_two_processes_equals_one_process(tmp_path):
    """Every process passes all the held-out prompts; each samples its share of every batch on the shared
    mesh (the last prompt repeated where a batch does not split evenly) and all get every completion
    back: per-problem lengths and scores, and pass@1, equal one process evaluating alone."""
    parts = run_two_processes("evaluate", tmp_path)
    summary, per_problem = worker.evaluation()
    lengths = np.asarray([r["lengths"] for r in per_problem])
    scores = np.asarray([r["scores"] for r in per_problem])
    for part in parts:
        np.testing.assert_array_equal(part["lengths"], lengths)
        np.testing.assert_array_equal(part["scores"], scores)
        assert float(part["pass1"]) == summary["pass@1"]
    assert len(set(lengths.ravel().tolist())) > 2 and 0 < summary["pass@1"] < 1  # the comparison has content


def assert_same_training(parts, trainer, history, metric_names):
    """Both processes hold the one-process run's parameters and metrics, and training moved them."""
    expected = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.params))]
    for part in parts:
        for i, x in enumerate(expected):
            np.testing.assert_allclose(part[f"param{i}"], x, atol=1e-5, rtol=1e-5, err_msg=f"parameter {i}")
        metrics = {k.removeprefix("metric/"): v for k, v in part.items() if k.startswith("metric/")}
        assert set(metric_names) <= set(metrics)
        for k, v in metrics.items():
            np.testing.assert_allclose(v, [m[k] for m in history], rtol=1e-5, atol=1e-6, err_msg=k)
    initial = jax.tree.leaves(initial_params()[1])
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(expected, initial, strict=True)) > 1e-4


@pytest.mark.slow  # three trainers compile (~70 s on 2 cores)
def test_grpo_steps_on_two_processes_equal_one_process(tmp_path):
    """test_trainer's GRPO run (β > 0, μ = 2, 2 minibatches of 2 micro-batches, advantages scaled by the
    batch's std) for 3 steps, each process sampling and scoring half of every step's prompts: the
    parameters and the step metrics (rewards, lengths, KL, clip fractions, …, all of the global batch)
    equal one process doing all of it on the same (2, 2, 2) mesh."""
    parts = run_two_processes("grpo", tmp_path)
    assert_same_training(parts, *worker.grpo_run(make_mesh(2, 2, 2)),
                         ("reward/mean", "train/kl", "completion/length_mean", "groups/zero_std_fraction"))


@pytest.mark.slow
def test_sft_steps_on_two_processes_equal_one_process(tmp_path):
    """3 SFT steps (2 micro-batches), each process loading half of every step's pairs, its own shorter
    than the other's: both pad to the same shapes, and the run equals one process's."""
    parts = run_two_processes("sft", tmp_path)
    assert_same_training(parts, *worker.sft_run(make_mesh(2, 2, 2)), ("train/loss", "train/tokens", "batch_shape"))


def test_sft_pair_too_long_on_one_process_stops_every_process(tmp_path):
    """A prompt longer than sft.max_length in process 1's share of a step: both processes raise at that
    step, process 1 naming the pair and process 0 naming process 1 (rather than waiting for ever in the
    update's collectives)."""
    parts = run_two_processes("sft_bad_pair", tmp_path, timeout=120)
    assert [int(p["done"]) for p in parts] == [2, 2]
    assert "process 1's SFT batch" in str(parts[0]["error"])
    assert "pair 0: a prompt of 20 tokens" in str(parts[1]["error"]) and "sft.max_length=16" in str(parts[1]["error"])


def test_checkpoint_keeps_every_process_data_state(tmp_path):
    """Each host reads its own data shard, so a multi-host checkpoint keeps every process's iterator
    state (Orbax writes JSON from process 0 only) and each gets its own back; one process cannot
    resume it."""
    parts = run_two_processes("checkpoint", tmp_path)
    assert [int(p["calls"]) for p in parts] == [10, 11]
    for part in parts:
        np.testing.assert_array_equal(part["x"], np.arange(32, dtype=np.float32).reshape(8, 4))
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=2)
    with pytest.raises(CheckpointError, match=r"data iterator state of 2 process\(es\), and this run has 1"):
        ckpt.restore(abstract_state={"x": jnp.zeros((8, 4), jnp.float32)})
    ckpt.close()
