"""One process of tests/test_multihost.py's 2-process run: 4 CPU devices each, one (2, 2, 2) mesh over
all 8, and this process's 4 prompts sampled on it.

    python tests/multihost_sampling.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

import numpy as np

# Process 0's prompts all fit 16 slots, process 1 has a 20-token one: both must pad to 32.
PROMPTS = [[1, 17, 33, 5, 90], [1, 44, 8, 61, 23, 70, 12, 9, 101, 3, 52], [1, 77, 2], [1] + list(range(40, 52)),
           [1, 5, 6], [1] + list(range(60, 79)), [1, 99, 98, 97, 96, 95], [1, 12]]
GROUP = 4
SEED = 7


def sampling_config():
    from r1jax.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, eos_ids=(2,))


def model(mesh=None):
    from flax import nnx

    from r1jax.model import get_preset, init_model

    return nnx.split(init_model(get_preset("tiny-qwen2"), seed=0, mesh=mesh))


def main(process_id: int, port: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from r1jax.sampling import sample_groups
    from r1jax.sharding import make_mesh

    mesh = make_mesh(2, 2, 2)  # data × fsdp carry the rows: process 0 holds data row 0, process 1 row 1
    assert {d.process_index for d in mesh.devices[process_id].flat} == {process_id}
    graphdef, state = model(mesh)
    result = sample_groups(graphdef, state, PROMPTS[4 * process_id: 4 * process_id + 4], GROUP,
                           jax.random.key(SEED), sampling_config(), mesh=mesh)
    np.savez(out, **{f: np.asarray(getattr(result, f)) for f in ("tokens", "mask", "lengths", "logprobs",
                                                                  "policy_logprobs", "prompt_tokens")})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
