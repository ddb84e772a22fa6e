"""Checkpointer: exact round trips (typed and raw PRNG keys, optax state, JSON items), resharding
onto a 2x2x2 mesh in a fresh process, keep-K, a save killed half-way, corrupt steps, the
non-finite protocol, and SIGTERM → save → exit 0 in a real subprocess and across two JAX processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from r1jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    NonFiniteError,
    PreemptionHandler,
    check_finite,
)

REPO = Path(__file__).resolve().parents[1]

# A train state built the same way here and in the subprocesses: params, optax adam state after
# two updates, step, a typed key and a raw uint32 key.
STATE_SRC = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax

    def make_state(scale=1.0):
        params = {
            "embed": jnp.arange(128, dtype=jnp.float32).reshape(16, 8) * scale / 7.0,
            "mlp": {"w": jnp.sin(jnp.arange(256, dtype=jnp.float32)).reshape(8, 32), "b": jnp.ones(32) * scale},
        }
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)
        for i in range(2):
            grads = jax.tree.map(lambda p: jnp.cos(p * (i + 1)), params)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        key = jax.random.split(jax.random.key(3))[1]
        return {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "key": key,
                "raw_key": jax.random.PRNGKey(5)}
    """
)
_ns: dict = {}
exec(STATE_SRC, _ns)  # noqa: S102 - the same source the subprocesses run
make_state = jax.jit(_ns["make_state"])  # one compile instead of dozens of eager optax ops


def _bits(x) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def assert_bit_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


def abstract_on(state, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def run_py(code: str, *, timeout: float = 120, **popen) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 90) -> list[str]:
    lines, start = [], time.monotonic()
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"no {prefix!r} line from the subprocess; got {lines}\n{proc.stderr.read()[-3000:]}")


# -- round trips and rotation -------------------------------------------------------------------


def test_save_every_keep_and_exact_round_trip(tmp_path):
    dev0 = SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(tmp_path / "ck", save_every=2, keep=2)
    states = {}
    for step in range(1, 7):
        states[step] = make_state(scale=float(step))
        saved = ckpt.save(
            step,
            states[step],
            data_state={"next_index": np.int64(step * 4), "epoch": 0},
            extra={"seed": 0, "loss": jnp.float32(0.5 * step), "lr": np.float32(1e-3), "tags": ("a", "b")},
        )
        assert saved == (step % 2 == 0)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["4", "6"]

    state, data, extra = ckpt.restore(abstract_state=abstract_on(states[6], dev0))
    assert_bit_equal(state, states[6])
    assert jax.dtypes.issubdtype(state["key"].dtype, jax.dtypes.prng_key)  # typed key comes back typed
    assert state["raw_key"].dtype == jnp.uint32
    assert data == {"next_index": 24, "epoch": 0}
    assert extra == {"seed": 0, "loss": 3.0, "lr": pytest.approx(1e-3), "tags": ["a", "b"]}

    state4, data4, _ = ckpt.restore(4, abstract_state=states[4])  # concrete arrays work as abstract_state
    assert_bit_equal(state4, states[4])
    assert data4["next_index"] == 16
    # A preemption right after resuming asks for a step that exists: nothing is rewritten.
    assert ckpt.save(6, states[1], force=True) is False
    ckpt.close()
    assert_bit_equal(
        Checkpointer(tmp_path / "ck", save_every=2, keep=2).restore(6, abstract_state=states[6])[0], states[6]
    )


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    """`--workdir runs/x` (the CLI's default is relative): Orbax itself wants absolute paths."""
    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer("runs/ck", save_every=1, keep=1)
    state = make_state(scale=2.0)
    assert ckpt.save(1, state, data_state={"i": 0}) and ckpt.directory == tmp_path / "runs" / "ck"
    ckpt.wait()
    assert_bit_equal(ckpt.restore(abstract_state=state)[0], state)
    ckpt.close()
    assert (tmp_path / "runs" / "ck" / "1").is_dir()


def test_restore_errors_name_the_problem(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", save_every=1, keep=3, async_save=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
        ckpt.restore(abstract_state=make_state())
    state = make_state()
    with pytest.raises(TypeError, match=r"extra\.config.*not JSON"):
        ckpt.save(1, state, extra={"config": object()})
    assert ckpt.all_steps() == [] and list((tmp_path / "ck").iterdir()) == []  # nothing half-written
    ckpt.save(1, state)
    with pytest.raises(CheckpointError, match=r"no checkpoint step 5 .*available steps: \[1\]"):
        ckpt.restore(5, abstract_state=state)
    bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match=r"abstract_state\['embed'\]|abstract_state\['key'\]|\.sharding"):
        ckpt.restore(1, abstract_state=bare)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpointer(tmp_path / "file", save_every=1, keep=1)


# Orbax leaves un-awaited read coroutines behind when a restore fails; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_steps_give_clear_errors_and_delete_nothing(tmp_path):
    root = tmp_path / "ck"
    ckpt = Checkpointer(root, save_every=1, keep=5, async_save=False)
    state = make_state()
    for step in (1, 2, 3):
        ckpt.save(step, make_state(scale=step), data_state={"i": step})
    ckpt.close()
    # 3: array data removed; 2: the data-iterator JSON garbled; 9: a folder Orbax did not write.
    for d in (root / "3" / "state").iterdir():
        if d.is_dir() and d.name != "array_metadatas":
            shutil.rmtree(d)
    (root / "2" / "data" / "metadata").write_text("{garbled")
    (root / "9").mkdir()
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    ckpt = Checkpointer(root, save_every=1, keep=5)
    assert ckpt.latest_step() == 9
    with pytest.raises(CheckpointError) as e9:
        ckpt.restore(abstract_state=state)
    msg = str(e9.value)
    assert f"step 9 in {root}" in msg and "not a complete Orbax checkpoint" in msg
    assert f"To resume from step 3, move {root / '9'} out of {root}" in msg and "Nothing was deleted" in msg
    with pytest.raises(CheckpointError, match=rf"step 3 in {root} cannot be restored: .*To resume from step 2"):
        ckpt.restore(3, abstract_state=state)
    with pytest.raises(CheckpointError, match=rf"step 2 in {root} cannot be restored: JSONDecodeError"):
        ckpt.restore(2, abstract_state=state)
    wrong = {**state, "params": {**state["params"], "embed": jnp.zeros((4, 8))}}  # a changed config
    with pytest.raises(CheckpointError, match="step 1 .*abstract_state may not match"):
        ckpt.restore(1, abstract_state=wrong)
    assert_bit_equal(ckpt.restore(1, abstract_state=state)[0], make_state(scale=1))  # the good one still loads
    ckpt.close()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


# -- non-finite guard -------------------------------------------------------------------------------


def test_check_finite_names_step_and_metrics():
    check_finite(3, {"loss": jnp.float32(1.0), "n": 5, "flag": True, "stage": "rl", "v": np.ones(3)})
    with pytest.raises(NonFiniteError) as e:
        check_finite(12, {"loss": jnp.float32(jnp.nan), "grad_norm": np.inf, "ok": 1.0, "v": np.array([1, np.nan])})
    assert e.value.step == 12 and sorted(e.value.bad) == ["grad_norm", "loss", "v"]
    assert "step 12" in str(e.value) and "grad_norm=inf" in str(e.value) and "1/2 non-finite" in str(e.value)


def test_non_finite_step_never_replaces_last_good_checkpoint(tmp_path):
    """The trainer's protocol (check, then save) with keep=1, where one bad save would lose the good step."""
    ckpt = Checkpointer(tmp_path / "ck", save_every=2, keep=1)
    good = None

    def loop(losses):
        nonlocal good
        for step, loss in enumerate(losses, start=1):
            state = make_state(scale=loss)
            metrics = {"loss": jnp.float32(loss)}
            check_finite(step, metrics)
            if ckpt.save(step, state, extra={"loss": metrics["loss"]}):
                good = state

    with pytest.raises(NonFiniteError, match="step 4"):
        loop([1.0, 2.0, 3.0, float("nan")])
    assert ckpt.latest_step() == 2
    state, _, extra = ckpt.restore(abstract_state=good)
    assert_bit_equal(state, good)
    assert extra == {"loss": 2.0}
    ckpt.close()


# -- a save killed half-way -------------------------------------------------------------------------


def test_save_killed_mid_write_is_never_latest(tmp_path):
    root = tmp_path / "ck"
    code = textwrap.dedent(
        f"""
        import asyncio
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from r1jax.checkpoint import Checkpointer
        ckpt = Checkpointer({str(root)!r}, save_every=1, keep=3)
        ckpt.save(1, {{"w": jnp.full(256, 1.0)}}, data_state={{"i": 1}}); ckpt.wait()

        async def stuck(self):  # the arrays are written; hang before the commit (rename)
            print("BLOCKED", flush=True)
            await asyncio.sleep(600)

        atomicity.AtomicRenameTemporaryPath.finalize = stuck
        ckpt.save(2, {{"w": jnp.full(256, 2.0)}}, data_state={{"i": 2}})
        ckpt.wait()
        """
    )
    proc = run_py(code)
    try:
        read_until(proc, "BLOCKED")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    tmp = [p for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert [p.name for p in root.iterdir() if p.name.isdigit()] == ["1"]
    assert len(tmp) == 1 and tmp[0].name.startswith("2.") and any(p.is_file() for p in tmp[0].rglob("*"))

    ckpt = Checkpointer(root, save_every=1, keep=3)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    state, data, _ = ckpt.restore(abstract_state={"w": jnp.zeros(256)})
    np.testing.assert_array_equal(state["w"], np.full(256, 1.0, np.float32))
    assert data == {"i": 1}
    assert ckpt.save(2, {"w": jnp.full(256, 2.0)})  # the interrupted step can be written again
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2] and not [p for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    ckpt.close()


# -- exact resume onto another mesh, in a fresh process -----------------------------------------


def test_exact_resume_on_2x2x2_mesh_in_fresh_process(tmp_path):
    import grain

    mesh8 = jax.make_mesh((8,), ("fsdp",))
    state = make_state()
    # Written from an 8-way fsdp layout; read back on (data, fsdp, tensor) = (2, 2, 2).
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh8, P("fsdp") if x.ndim == 2 else P())), state)
    ds = (
        grain.MapDataset.range(40)
        .shuffle(seed=1)
        .batch(4)
        .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
    )
    it = iter(ds)
    for _ in range(3):
        next(it)
    data_state = it.get_state()
    expected_batches = [next(it).tolist() for _ in range(2)]
    ckpt = Checkpointer(tmp_path / "ck", save_every=100, keep=2)
    ckpt.save(7, state, data_state=data_state, extra={"rng": jax.random.key(9), "config": {"lr": 1e-2}}, force=True)
    ckpt.close()

    out = tmp_path / "restored"
    code = STATE_SRC + textwrap.dedent(
        f"""
        import json, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from r1jax.checkpoint import Checkpointer
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))

        def spec(x):
            if x.ndim == 2:
                return P("fsdp", "tensor")
            if x.ndim == 1 and x.dtype == jnp.float32:
                return P(("data", "tensor"))
            return P()

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))),
                                jax.eval_shape(make_state))
        state, data_state, extra = Checkpointer({str(tmp_path / "ck")!r}, save_every=100, keep=2).restore(
            abstract_state=abstract)
        leaves, _ = jax.tree_util.tree_flatten_with_path(state)
        report = {{"data_state": data_state, "extra": extra, "leaves": {{}}}}
        arrays = {{}}
        for path, x in leaves:
            name = jax.tree_util.keystr(path)
            typed = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            report["leaves"][name] = {{
                "sharding_ok": x.sharding == NamedSharding(mesh, spec(x)),
                "shard_shapes": sorted({{tuple(s.data.shape) for s in x.addressable_shards}}),
                "n_shards": len(x.addressable_shards), "typed_key": bool(typed)}}
            arrays[name] = np.asarray(jax.random.key_data(x) if typed else x)
        np.savez({str(out)!r} + ".npz", **arrays)
        open({str(out)!r} + ".json", "w").write(json.dumps(report))
        print("DONE", flush=True)
        """
    )
    proc = run_py(code)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "DONE" in stdout, stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    arrays = np.load(f"{out}.npz")

    expected = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert set(report["leaves"]) == set(expected)
    for name, x in expected.items():
        info = report["leaves"][name]
        assert info["sharding_ok"] and info["n_shards"] == 8, (name, info)
        np.testing.assert_array_equal(np.ascontiguousarray(arrays[name]).view(np.uint8), _bits(x), err_msg=name)
    assert report["leaves"]["['params']['embed']"]["shard_shapes"] == [[8, 4]]  # (16, 8) over fsdp x tensor
    assert report["leaves"]["['params']['mlp']['b']"]["shard_shapes"] == [[8]]  # (32,) over data x tensor
    assert report["leaves"]["['key']"]["typed_key"] and not report["leaves"]["['raw_key']"]["typed_key"]
    assert report["extra"] == {"rng": jax.random.key_data(jax.random.key(9)).tolist(), "config": {"lr": 1e-2}}

    resumed = iter(ds)
    resumed.set_state(report["data_state"])
    assert [next(resumed).tolist() for _ in range(2)] == expected_batches


# -- preemption ---------------------------------------------------------------------------------


def test_preemption_handler_flag_and_restore_handlers():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionHandler() as preempt:
        assert not preempt.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
        assert preempt.should_stop(1) and preempt.signal_received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts a stuck run
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int


def test_multihost_defers_to_jax_preemption_sync_point(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda s: calls.append(s) or s == 5)
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler(multihost=True) as preempt:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's preemption notifier keeps SIGTERM
        assert [preempt.should_stop(s) for s in (3, 4, 5)] == [False, False, True] and calls == [3, 4, 5]
        with pytest.raises(ValueError, match="needs the step"):
            preempt.should_stop()


def test_sigterm_saves_and_exits_zero(tmp_path):
    root = tmp_path / "ck"
    code = textwrap.dedent(
        f"""
        import sys, time
        import jax, jax.numpy as jnp
        from r1jax.checkpoint import Checkpointer, PreemptionHandler, check_finite
        ckpt = Checkpointer({str(root)!r}, save_every=1000, keep=2)
        update = jax.jit(lambda s: {{"w": s["w"] + 1.0, "step": s["step"] + 1}})
        state = {{"w": jnp.zeros(4), "step": jnp.int32(0)}}
        with PreemptionHandler() as preempt:
            for step in range(1, 10_000):
                state = update(state)
                check_finite(step, {{"w": state["w"]}})
                ckpt.save(step, state, data_state={{"pos": step}})
                print("step", step, flush=True)
                if preempt.should_stop(step):
                    ckpt.save(step, state, data_state={{"pos": step}}, force=True)
                    ckpt.close()
                    print("saved", step, flush=True)
                    sys.exit(0)
                time.sleep(0.02)
        sys.exit(3)
        """
    )
    proc = run_py(code)
    read_until(proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    saved = int(stdout.strip().splitlines()[-1].split()[-1])
    assert saved >= 3

    ckpt = Checkpointer(root, save_every=1000, keep=2)
    assert ckpt.all_steps() == [saved]
    dev0 = SingleDeviceSharding(jax.devices()[0])
    abstract = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=dev0),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=dev0),
    }
    state, data, _ = ckpt.restore(abstract_state=abstract)
    np.testing.assert_array_equal(state["w"], np.full(4, float(saved), np.float32))
    assert int(state["step"]) == saved and data == {"pos": saved}
    ckpt.close()


def test_multihost_sigterm_stops_every_host_at_the_same_step(tmp_path):
    """Two JAX processes (jax.distributed on CPU): SIGTERM to one; both save the same step, exit 0."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    root = tmp_path / "ck"
    code = textwrap.dedent(
        f"""
        import sys, time
        import jax
        pid = int(sys.argv[1])
        jax.distributed.initialize("localhost:{port}", num_processes=2, process_id=pid)
        import numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from r1jax.checkpoint import Checkpointer, PreemptionHandler
        sharding = NamedSharding(jax.make_mesh((2,), ("data",)), P("data"))
        ckpt = Checkpointer({str(root)!r}, save_every=1000, keep=2)
        with PreemptionHandler() as preempt:
            assert preempt.multihost
            for step in range(1, 100_000):
                w = jax.make_array_from_callback((4,), sharding, lambda i: np.full(4, step, np.float32)[i])
                ckpt.save(step, {{"w": w}})
                print("step", step, flush=True)
                if preempt.should_stop(step):
                    ckpt.save(step, {{"w": w}}, force=True)
                    ckpt.close()
                    print("saved", step, flush=True)
                    jax.distributed.shutdown()
                    sys.exit(0)
                time.sleep(0.05)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device per process
    logs = [open(tmp_path / f"err{i}.txt", "w") for i in range(2)]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=logs[i]
        )
        for i in range(2)
    ]
    try:
        read_until(procs[0], "step 3")
        procs[0].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    errs = [(tmp_path / f"err{i}.txt").read_text()[-2000:] for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errs
    saved = {int(out.strip().splitlines()[-1].split()[-1]) for out in outs}
    assert len(saved) == 1, outs  # both hosts stopped at the same step
    (step,) = saved
    ckpt = Checkpointer(root, save_every=1000, keep=2)
    assert ckpt.all_steps() == [step]
    dev0 = SingleDeviceSharding(jax.devices()[0])
    state, _, _ = ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=dev0)})
    np.testing.assert_array_equal(state["w"], np.full(4, step, np.float32))
    ckpt.close()


def test_reading_a_stage_at_its_saved_dtypes_names_a_parameter_the_checkpoint_lacks(tmp_path):
    """`as_saved` (how a stage's final is read before its hash check) refuses a checkpoint of another model,
    naming the missing parameter, rather than restoring it cast and calling the files changed."""
    from flax import nnx

    from r1jax.model import get_preset, init_model
    from r1jax.model.build import sharded_abstract_state
    from r1jax.pipeline import ConfigError, as_saved, save_params
    from r1jax.sharding import make_mesh

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    one_layer = get_preset("tiny-qwen2").replace(num_layers=1)
    save_params(nnx.state(init_model(one_layer, seed=0)), tmp_path / "final")
    _, same = sharded_abstract_state(one_layer, mesh)
    assert jax.tree.leaves(as_saved(tmp_path / "final", same))  # its own model reads back
    _, two = sharded_abstract_state(one_layer.replace(num_layers=2), mesh)
    with pytest.raises(ConfigError, match=r"holds no parameter layers\.1\..*not a checkpoint of this model"):
        as_saved(tmp_path / "final", two)
