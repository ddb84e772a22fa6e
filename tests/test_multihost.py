"""Several hosts, simulated by 2 local processes of 4 CPU devices each (gloo collectives)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import multihost_sampling as worker  # noqa: E402

from r1jax.sampling import sample_groups  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sampling_on_two_processes_equals_one_process(tmp_path):
    """Each process samples its own prompts on a mesh over both processes' devices and gets back its
    own rows: together they equal one process sampling all the prompts (same key, same global rows)."""
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(i), str(port), str(tmp_path / f"{i}.npz")], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    parts = [np.load(tmp_path / f"{i}.npz") for i in range(2)]

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
