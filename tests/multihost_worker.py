"""One process of tests/test_multihost.py's 2-process runs: 4 CPU devices each, one (2, 2, 2) mesh over
all 8 (process 0 holds the mesh's data row 0, process 1 row 1), and this process's half of the work.

    python tests/multihost_worker.py sample|grpo|sft|sft_bad_pair|evaluate|checkpoint PROCESS_ID PORT OUT.npz
"""

import os
import sys

import numpy as np

# Process 0's prompts all fit 16 slots, process 1 has a 20-token one: both must pad to 32.
PROMPTS = [[1, 17, 33, 5, 90], [1, 44, 8, 61, 23, 70, 12, 9, 101, 3, 52], [1, 77, 2], [1] + list(range(40, 52)),
           [1, 5, 6], [1] + list(range(60, 79)), [1, 99, 98, 97, 96, 95], [1, 12]]
GROUP = 4
SEED = 7
STEPS = 3


def sampling_config():
    from r1jax.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, eos_ids=(2,))


def model(mesh=None):
    from flax import nnx

    from r1jax.model import get_preset, init_model

    return nnx.split(init_model(get_preset("tiny-qwen2"), seed=0, mesh=mesh))


def sample(process_id: int, mesh) -> dict[str, np.ndarray]:
    import jax

    from r1jax.sampling import sample_groups

    graphdef, state = model(mesh)
    half = len(PROMPTS) // 2
    out = sample_groups(graphdef, state, PROMPTS[half * process_id: half * (process_id + 1)], GROUP,
                        jax.random.key(SEED), sampling_config(), mesh=mesh)
    return {f: np.asarray(getattr(out, f)) for f in ("tokens", "mask", "lengths", "logprobs", "policy_logprobs",
                                                      "prompt_tokens")}


def grpo_run(mesh, process_id: int = 0, processes: int = 1):
    """test_trainer's GRPO set-up on `mesh`, STEPS steps, this process taking its share of each
    step's prompts: (trainer, metrics per step)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import PromptStream, grpo_trainer, initial_params, rl_config

    from r1jax.grpo import GRPOConfig

    # advantages scaled by the std of the whole batch: every process's rewards, not its own
    loss = GRPOConfig(group_size=4, beta=0.04, num_iterations=2, advantage_scale="batch")
    trainer = grpo_trainer(initial_params(), rl_config(loss=loss), mesh=mesh)
    stream = PromptStream(trainer.config.prompts_per_step)

    def share():
        batch = stream()
        n = len(batch["prompt"]) // processes
        return {k: v[n * process_id: n * (process_id + 1)] for k, v in batch.items()}

    return trainer, [trainer.step(share) for _ in range(STEPS)]


def sft_run(mesh, process_id: int = 0, processes: int = 1):
    """SFT on test_trainer's model, STEPS steps of 8 pairs of varied lengths (process 1's are the
    longest, so process 0 must pad to them), this process taking its share of each step's pairs:
    (trainer, metrics per step with the global batch's [rows, prompt slots, completion slots])."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import initial_params, model_from

    from r1jax.trainers.optim import OptimConfig
    from r1jax.trainers.sft import SFTConfig, SFTTrainer

    config = SFTConfig(steps=STEPS, batch_size=8, optim=OptimConfig(learning_rate=1e-2), micro_batches=2)
    trainer = SFTTrainer(config, model_from(initial_params(), mesh), pad_id=0, mesh=mesh)
    rng = np.random.default_rng(0)

    def share():
        pairs = [([1, *rng.integers(3, 12, 2 + i)], rng.integers(3, 12, 3 + 2 * i).tolist()) for i in range(8)]
        n = len(pairs) // processes
        return pairs[n * process_id: n * (process_id + 1)]

    shapes, update = [], trainer._update

    def recording_update(params, opt_state, batch):  # the global shapes this process's program ran on
        shapes.append((*batch["prompt_tokens"].shape, batch["tokens"].shape[1]))
        return update(params, opt_state, batch)

    trainer._update = recording_update
    history = [trainer.step(share) for _ in range(STEPS)]
    return trainer, [{**m, "batch_shape": np.asarray(shape)} for m, shape in zip(history, shapes, strict=True)]


def evaluation(mesh=None):
    """`evaluate_model` of test_trainer's model on 7 prompts in batches of 4 (the second batch does not
    split evenly over 2 processes), GROUP samples each, graded on the completions' lengths: (summary,
    per-problem results). Every process passes all the prompts."""
    import jax
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import CharTokenizer, initial_params, model_from

    from r1jax.evaluate import evaluate_model

    graphdef, state = nnx.split(model_from(initial_params(), mesh))
    records = [{"id": i, "question": q, "answer": ""} for i, q in enumerate(["abc", "d", "efghi", "ba", "ccc", "hg",
                                                                              "abcdefgh"])]
    return evaluate_model(graphdef, state, records, CharTokenizer(), template="plain", k=GROUP,
                          sampling=sampling_config().replace(top_k=0, top_p=1.0), key=jax.random.key(SEED),
                          grader=lambda completions, record: [float(len(c) % 3 == 0) for c in completions],
                          mesh=mesh, prompts_per_batch=4)


def evaluate(process_id: int, mesh) -> dict[str, np.ndarray]:
    summary, per_problem = evaluation(mesh)
    return {"lengths": np.asarray([r["lengths"] for r in per_problem]),
            "scores": np.asarray([r["scores"] for r in per_problem]), "pass1": np.asarray(summary["pass@1"])}


def grpo(process_id: int, mesh) -> dict[str, np.ndarray]:
    import jax

    return trained(*grpo_run(mesh, process_id, jax.process_count()))


def sft(process_id: int, mesh) -> dict[str, np.ndarray]:
    import jax

    return trained(*sft_run(mesh, process_id, jax.process_count()))


def sft_bad_pair(process_id: int, mesh) -> dict[str, np.ndarray]:
    """Two good SFT steps, then a step where only process 1 holds a prompt longer than max_length: the
    step's error as each process saw it, and how many steps each completed."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trainer import initial_params, model_from

    from r1jax.trainers.optim import OptimConfig
    from r1jax.trainers.sft import SFTConfig, SFTTrainer

    config = SFTConfig(steps=STEPS, batch_size=4, optim=OptimConfig(learning_rate=1e-2), max_length=16)
    trainer = SFTTrainer(config, model_from(initial_params(), mesh), pad_id=0, mesh=mesh)
    done = 0
    try:
        for step in range(STEPS):
            prompt = [1] * (20 if step == 2 and process_id == 1 else 3)
            trainer.step(lambda prompt=prompt: [(prompt, [5, 6, 7]), ([1, 4], [8, 9])])
            done += 1
    except ValueError as e:
        return {"done": np.asarray(done), "error": np.asarray(str(e))}
    return {"done": np.asarray(done), "error": np.asarray("")}


def checkpoint(process_id: int, mesh, directory: str) -> dict[str, np.ndarray]:
    """Save a row-sharded array with this process's own data-iterator state, restore both."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from r1jax.checkpoint import Checkpointer

    value = np.arange(32, dtype=np.float32).reshape(8, 4)
    x = jax.make_array_from_callback(value.shape, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))),
                                     lambda index: value[index])
    own = {"calls": 10 + process_id, "shard": "p" * (1 + process_id)}  # states of different lengths
    ckpt = Checkpointer(directory, save_every=1, keep=2)
    ckpt.save(1, {"x": x}, data_state=own)
    ckpt.close()
    ckpt = Checkpointer(directory, save_every=1, keep=2)
    state, data, _ = ckpt.restore(abstract_state={"x": x})
    ckpt.close()
    assert data == own, (data, own)
    return {"x": np.asarray(multihost_utils.process_allgather(state["x"], tiled=True)), "calls": data["calls"]}


def trained(trainer, history) -> dict[str, np.ndarray]:
    """The trained parameters (gathered whole) and the untimed metrics of every step, as arrays."""
    import jax
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(trainer.params, tiled=True)  # every parameter whole, on each process
    out = {f"param{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
    timed = ("time/", "perf/", "tokens_per_s")
    out.update({f"metric/{k}": np.asarray([m[k] for m in history]) for k in history[0] if not k.startswith(timed)})
    return out


def main(mode: str, process_id: int, port: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from r1jax.sharding import make_mesh

    mesh = make_mesh(2, 2, 2)  # data × fsdp carry the rows
    assert {d.process_index for d in mesh.devices[process_id].flat} == {process_id}
    if mode == "checkpoint":
        result = checkpoint(process_id, mesh, os.path.join(os.path.dirname(out), "checkpoints"))
    else:
        result = {"sample": sample, "grpo": grpo, "sft": sft, "sft_bad_pair": sft_bad_pair,
                  "evaluate": evaluate}[mode](process_id, mesh)
    np.savez(out, **result)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
