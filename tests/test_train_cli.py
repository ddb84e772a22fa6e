"""`python -m r1jax.train` end to end on a tiny R1-Zero run (pretrain + GRPO), in real processes.

* An uninterrupted run, and a second one that is SIGTERMed during RL (saves, exits 0), resumed, SIGKILLed
  after a later checkpoint, and resumed again, end with the same metrics.jsonl records (time-dependent
  values aside) and bit-identical final parameters.
* A finished pipeline is skipped on a rerun; RL starts from the pretraining stage's parameters.
* A garbled checkpoint step gives an error naming it, and nothing is deleted.
* Bad config values fail before any work, naming the field.

The processes share a persistent compilation cache (the first run compiles, the others load), see one
CPU device and compile with XLA's cheaper backend passes; `LAUNCHER` runs the real CLI, optionally
slowing each GRPO step so that the test can signal between steps.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

REPO = Path(__file__).resolve().parents[1]
RL_STEPS = 6
CHECKPOINT_EVERY = 4  # steps 4 and 6 are saved on schedule; any other saved step came from SIGTERM
OVERRIDES = {
    "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.intermediate_size": 64, "model.max_position_embeddings": 128,
    "tokenizer.vocab_size": 320,
    "data.template": "r1", "data.train_size": 32, "data.eval_size": 2, "data.max_prompt_length": 64,
    "pretrain.corpus_size": 100, "pretrain.steps": 2, "pretrain.batch_size": 4, "pretrain.warmup_steps": 0,
    "pretrain.max_length": 128,
    "rl.steps": RL_STEPS, "rl.prompts_per_step": 2, "rl.group_size": 2, "rl.warmup_steps": 0, "rl.beta": 0.04,
    # accuracy and format are 0 for every completion of a model this small, so GRPO would never move it;
    # the language-consistency score varies with the random text
    "rl.rewards": {"accuracy": 1.0, "language": 1.0},
    "sampling.max_new_tokens": 8,
    "eval.every": 3, "eval.k": 1, "eval.max_new_tokens": 8,
    "checkpoint.every": CHECKPOINT_EVERY, "checkpoint.keep": 3,
}
# Values that depend on the clock, not on the computation.
UNTIMED = ("time/", "tokens_per_s", "perf/")

LAUNCHER = r"""
import os, sys, time
sys.modules["torch"] = None  # tensorboardX imports torch when it can: seconds per process, unused here
delay = float(os.environ.get("R1JAX_TEST_STEP_DELAY", "0"))
if delay:
    from r1jax.trainers import rl
    _step = rl.GRPOTrainer.step
    def slow_step(self, batches):
        time.sleep(delay)
        return _step(self, batches)
    rl.GRPOTrainer.step = slow_step
from r1jax.train import run
run()
"""


def cli_args(workdir, **extra):
    values = {**OVERRIDES, **extra}
    return ["--config=r1zero", f"--workdir={workdir}",
            *(f"--config.{k}={v!r}" if isinstance(v, dict) else f"--config.{k}={v}" for k, v in values.items())]


def override_config(**extra) -> ConfigDict:
    from configs.r1zero import get_config

    config = get_config()
    values = {**OVERRIDES, **extra}
    config.rl.rewards = ConfigDict(values.pop("rl.rewards"))
    config.update_from_flattened_dict(values)
    return config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ)
    # one device; cheaper code generation (the runs are compared with each other, not timed)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def start(env, workdir, delay=0.0, flags=(), **extra):
    log = open(Path(workdir).parent / f"{Path(workdir).name}.{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cli_args(workdir, **extra), *flags], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**env, "R1JAX_TEST_STEP_DELAY": str(delay)})
    proc.log = log
    return proc


def finish(proc, timeout=300) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.seek(0)
    return proc.log.read()


def wait_for(proc, condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{finish(proc)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{finish(proc)[-3000:]}")
        time.sleep(0.02)


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def timeless(rows):
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in rows]


def steps_with(path, key):
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if key in row:
            out.append(row["step"])
    return out


def saved_steps(stage_dir):
    directory = Path(stage_dir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def load_params(path):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute())


def flat(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("cli") / "reference"
    proc = start(env, workdir)
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    return workdir


@pytest.mark.slow
def test_metrics_manifests_and_stage_handoff(reference):
    rows = records(reference / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(RL_STEPS + 1))
    step = rows[1]
    for key in ("reward/mean", "reward/std", "reward/accuracy", "reward/accuracy_std", "reward/language",
                "completion/length_mean", "completion/length_max", "completion/truncated",
                "groups/zero_std_fraction", "train/kl", "train/clip_frac_low", "train/clip_frac_high",
                "train/entropy", "train/grad_norm", "train/lr",
                "time/generate", "time/reward", "time/reference", "time/update", "tokens_per_s",
                "perf/flops_per_s"):
        assert key in step, (key, sorted(step))
    assert "perf/mfu" not in step  # no known peak on CPU
    assert step["perf/flops_per_s"] > 0 and step["time/reference"] > 0
    assert {r["step"] for r in rows if "eval/pass1" in r} == {0, 3, 6}

    pre = json.loads((reference / "pretrain" / "manifest.json").read_text())
    rl = json.loads((reference / "rl" / "manifest.json").read_text())
    assert pre["status"] == rl["status"] == "done"
    assert rl["init_param_hash"] == pre["param_hash"] != rl["param_hash"]
    assert rl["init_checkpoint"] == pre["checkpoint"]
    assert saved_steps(reference / "rl") == [4, 6]


@pytest.mark.slow
def test_rerun_of_a_finished_pipeline_skips_every_stage(reference, capsys):
    from r1jax.pipeline import run_pipeline
    from r1jax.stages import STAGES, validate_config

    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    manifests = run_pipeline(override_config(), reference, STAGES, validate=validate_config)
    out = capsys.readouterr().out
    assert "stage pretrain: done already" in out and "stage rl: done already" in out
    assert all(m.status == "done" for m in manifests.values())
    after = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    changed = [str(p.relative_to(reference)) for p in after if before.get(p) != after[p]]
    assert changed in ([], ["config.json"]), changed  # the run's config snapshot is rewritten, nothing else


@pytest.mark.slow
def test_sigterm_saves_and_sigkill_resumes_to_the_same_run(reference, env, tmp_path):
    workdir = tmp_path / "interrupted"
    workdir.mkdir()
    shutil.copytree(reference / "tokenizer", workdir / "tokenizer")  # the cached sentencepiece model
    metrics = workdir / "rl" / "metrics.jsonl"

    # 1. SIGTERM once RL step 2 is logged: the step in progress is saved (off the every-4 schedule), exit 0.
    proc = start(env, workdir, delay=0.5)
    wait_for(proc, lambda: 2 in steps_with(metrics, "reward/mean"), "RL step 2")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    stopped = saved_steps(workdir / "rl")
    assert len(stopped) == 1 and 2 <= stopped[0] < CHECKPOINT_EVERY, (stopped, out[-3000:])
    stopped = stopped[0]
    assert steps_with(metrics, "reward/mean") == list(range(1, stopped + 1))
    logged = metrics.read_text()

    # 2. Resume; SIGKILL once step 4 is checkpointed (mid-way through step 5).
    proc = start(env, workdir, delay=0.5)
    wait_for(proc, lambda: CHECKPOINT_EVERY in saved_steps(workdir / "rl"), f"checkpoint {CHECKPOINT_EVERY}")
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    # it resumed from the SIGTERM checkpoint: the records up to there are kept byte for byte (clock values
    # included), not recomputed
    assert metrics.read_text().startswith(logged)

    # 3. A corrupt copy of the killed run: the error names the step, nothing is deleted.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(workdir, corrupt)
    step_dir = corrupt / "rl" / "checkpoints" / str(CHECKPOINT_EVERY)
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    files = listing(corrupt)
    proc = start(env, corrupt)
    out = finish(proc)
    assert proc.returncode != 0
    assert f"checkpoint step {CHECKPOINT_EVERY} in {corrupt / 'rl' / 'checkpoints'} cannot be restored" in out, \
        out[-3000:]
    assert f"To resume from step {stopped}" in out and "Nothing was deleted" in out
    # (the rl manifest is rewritten: the copy's rl stage starts from the copy's own pretrain/final)
    rewritten = ("rl/metrics", "rl/tensorboard", "rl/manifest.json")
    assert [f for f in listing(corrupt) if not f[0].startswith(rewritten)] == \
        [f for f in files if not f[0].startswith(rewritten)]
    manifest = json.loads((corrupt / "rl" / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["init_checkpoint"] == str(corrupt / "pretrain" / "final")

    # 4. Resume to the end: everything as in the uninterrupted run.
    proc = start(env, workdir)
    out = finish(proc)
    assert proc.returncode == 0, out[-5000:]
    for stage in ("pretrain", "rl"):
        assert timeless(records(workdir / stage / "metrics.jsonl")) == \
            timeless(records(reference / stage / "metrics.jsonl")), stage
    ours, theirs = flat(load_params(workdir / "rl" / "final")), flat(load_params(reference / "rl" / "final"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    manifest = json.loads((workdir / "rl" / "manifest.json").read_text())
    assert manifest["param_hash"] == json.loads((reference / "rl" / "manifest.json").read_text())["param_hash"]


@pytest.mark.slow
def test_two_processes_run_the_pipeline_as_one_job(env, tmp_path):
    """Several hosts, as 2 local processes of 2 CPU devices each (`--coordinator_address`, `--num_processes`,
    `--process_id`) sharing one workdir: one job on a 4-device mesh, each process loading its share of
    every batch. Process 0 alone writes the run's files (each step's metrics once, the report); every
    evaluation covers all held-out problems, sampled half by each process; both exit 0, and a rerun of
    both skips every stage."""
    from test_multihost import free_port

    workdir = tmp_path / "two"
    two_devices = {**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2"}

    def run_both():
        port = free_port()
        procs = [start(two_devices, workdir, flags=(f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                                    f"--process_id={i}")) for i in range(2)]
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)  # when one fails, the other (left waiting in a collective) is killed, not waited for
        outs = [finish(p, timeout=0) for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-5000:]
        return outs

    outs = run_both()
    for i, out in enumerate(outs):
        assert f"[r1jax] process {i} of 2: 2 of 4 devices" in out, out[-3000:]
    assert "[r1jax] report:" in outs[0] and "[r1jax] report:" not in outs[1]
    rows = records(workdir / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(RL_STEPS + 1))
    assert {r["step"] for r in rows if "eval/pass1" in r} == {0, 3, 6}
    assert outs[0].count(f"({OVERRIDES['data.eval_size']} problems × k=1)") == 3
    pre = json.loads((workdir / "pretrain" / "manifest.json").read_text())
    rl = json.loads((workdir / "rl" / "manifest.json").read_text())
    assert pre["status"] == rl["status"] == "done" and rl["init_param_hash"] == pre["param_hash"]
    assert (workdir / "rl" / "report.md").exists() and saved_steps(workdir / "rl") == [4, 6]

    for out in run_both():
        assert "stage pretrain: done already" in out and "stage rl: done already" in out


# ------------------------------------------------------------------------------------ bad configs


def run_cli(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "r1jax.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("--config.rl.betaa=0.1", "--config.rl.betaa: config.rl has no field 'betaa' (did you mean --config.rl.beta?)"),
    ("--config.rll.beta=0.1", "the config has no field 'rll' (did you mean --config.rl?)"),
])
def test_cli_names_an_unknown_field(env, tmp_path, override, message):
    result = run_cli(env, "--config=r1zero", f"--workdir={tmp_path / 'w'}", override)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_cli_names_an_unknown_config(env, tmp_path):
    result = run_cli(env, "--config=nonexistent", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 1
    assert "--config=nonexistent: no such config; known: [" in result.stderr and "'r1zero'" in result.stderr


def test_a_config_name_is_not_shadowed_by_a_folder_of_that_name(tmp_path, monkeypatch):
    """`--config=r1zero --workdir r1zero`: on the rerun the folder r1zero exists, and is not the config."""
    from r1jax.train import resolve_config_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r1zero").mkdir()
    assert resolve_config_path("r1zero").endswith("configs/r1zero.py")
    (tmp_path / "mine.py").write_text("def get_config(): ...")
    assert resolve_config_path("mine.py:arg") == "mine.py:arg"


def test_cli_reports_a_bad_value_before_any_work(env, tmp_path):
    result = run_cli(env, "--config=r1zero", f"--workdir={tmp_path / 'w'}", "--config.rl.group_size=1")
    assert result.returncode == 1
    assert "[r1jax] bad config: config.rl: GRPOConfig.group_size=1 must be an int >= 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("changes, message", [
    ({"rl.group_size": 1}, "config.rl: GRPOConfig.group_size=1 must be an int >= 2"),
    ({"rl.prompts_per_step": 3, "rl.group_size": 2, "rl.num_minibatches": 2},  # 6 rows, but not whole groups
     "config.rl: rl.num_minibatches=2 must divide rl.prompts_per_step=3 (a minibatch holds whole groups)"),
    ({"rl.num_minibatches": 0}, "config.rl: rl.num_minibatches=0 must be >= 1"),
    ({"rl.micro_batches": 3}, "rl.micro_batches=3 must divide the minibatch of 4 completions"),
    ({"rl.preset": "foo"}, "config.rl: preset='foo' must be one of"),
    ({"rl.epsilon_high": -1.0}, "config.rl: GRPOConfig.epsilon_high=-1.0 must be a finite number >= 0"),
    ({"rl.advantage_scale": "groups"}, "config.rl: GRPOConfig.advantage_scale='groups' must be one of"),
    ({"sampling.max_new_tokens": 300}, "config.rl: sampling.max_new_tokens=300 leaves no room for a prompt under "
                                       "the model's max_position_embeddings=128"),
    ({"eval.max_new_tokens": 256}, "config.eval: eval.max_new_tokens=256 leaves no room"),
    ({"rl.old_logprobs": "policy"}, "config.rl: rl.old_logprobs='policy' must be 'trainer' or 'sampler'"),
    ({"rl.schedule": "linear"}, "config.rl: optim.schedule='linear'"),
    ({"rl.rewards": {"acuracy": 1.0}}, "config.rl: unknown reward 'acuracy'"),
    ({"pretrain.micro_batches": 3}, "config.pretrain: sft.micro_batches=3 must divide sft.batch_size=4"),
    ({"sampling.temperature": 0.0}, "config.rl: sampling.temperature=0.0 must be a finite number > 0"),
    ({"eval.top_p": 0.0}, "config.eval: sampling.top_p=0.0 must be in (0, 1]"),
    ({"model.num_heads": 3}, "config.model: "),
    ({"data.template": "nope"}, "config.data: "),
    ({"checkpoint.every": 0}, "config.checkpoint: checkpoint.every=0 must be an int >= 1"),
    ({"mesh.fsdp": 3}, "config.mesh: mesh shape (1, 3, 1)"),
    ({"stages": "pretrain,foo"}, "config.stages='pretrain,foo': unknown stage(s) ['foo']"),
])
def test_bad_values_fail_before_any_work(tmp_path, monkeypatch, changes, message):
    from r1jax.pipeline import ConfigError, run_pipeline
    from r1jax.stages import STAGES, validate_config

    def no_work(*args, **kwargs):
        raise AssertionError("validation came too late: the run started building things")

    monkeypatch.setattr("r1jax.pipeline.RunContext.tokenizer", property(no_work))
    monkeypatch.setattr("r1jax.pipeline.init_model", no_work)
    config = override_config(**changes)
    with pytest.raises(ConfigError) as raised:
        run_pipeline(config, tmp_path / "w", STAGES, validate=validate_config)
    assert message in str(raised.value)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("config_name, changes, message", [
    ("r1", {"reasoning_rl.steps": -5}, "config.reasoning_rl: optim.total_steps=-5 must be >= 0"),
    ("r1", {"cold_start.batch_size": 0}, "config.cold_start: sft.steps=96 must be >= 0 and sft.batch_size=0 >= 1"),
    ("r1", {"rejection_sft.general_fraction": 1.5}, "rejection_sft.general_fraction=1.5 must lie in [0, 1)"),
    ("r1", {"rl_all.general_fraction": -0.5}, "rl_all.general_fraction=-0.5 must lie in [0, 1)"),
    ("r1", {"rejection_sft.init": "bsae"}, "config.rejection_sft: rejection_sft.init='bsae'; accepted:"),
    ("r1", {"rejection_sft.sample_from": "reasoning_lr"}, "rejection_sft.sample_from='reasoning_lr'; accepted:"),
    ("r1", {"reasoning_rl.temperature": -1.0}, "config.reasoning_rl: sampling.temperature=-1.0"),
    ("r1", {"cold_start.filters.require_format": "xml"}, "config.cold_start: filters.require_format='xml'"),
    ("r1", {"rl_all.rewards.acuracy": 1.0}, "config.rl_all: reward 'acuracy' in a rule-reward table"),
    ("r1", {"rl_all.preference.helpfulness_model": "nope"}, "config.rl_all: unknown preference model 'nope'"),
    ("r1", {"eval.k": 0}, "config.eval: eval.k=0 must be >= 1"),
    ("r1", {"data.train_size": -4}, "config.data: data.train_size=-4 must be an int >= 1"),
    ("r1", {"pretrain.correct_fraction": 1.5}, "config.pretrain: pretrain.correct_fraction=1.5 must lie in [0, 1]"),
    ("distill", {"distill.steps": -2}, "config.distill: optim.total_steps=-2 must be >= 0"),
    ("distill", {"student_rl.budget_clock": "gpu"}, "config.student_rl: student_rl.budget_clock='gpu'"),
    ("distill", {"student_rl.budget_from": "distil"}, "config.student_rl: student_rl.budget_from='distil' must name"),
    ("distill", {"student_rl.template": "nope"}, "config.student_rl: template='nope' is not registered"),
    ("r1zero", {"model.hf_path": "/ckpt/Qwen2.5-1.5B"}, "the pretrain stage trains the embedded synthetic corpus"),
    # each stage's own sampling leaves room for a prompt (it failed at that stage's first sampling)
    ("r1", {"cold_start.max_new_tokens": 128}, "config.cold_start: cold_start.max_new_tokens=128 leaves no room for a "
                                               "prompt under the model's max_position_embeddings=128"),
    ("r1", {"reasoning_rl.max_new_tokens": 200}, "config.reasoning_rl: reasoning_rl.max_new_tokens=200 leaves no room"),
    ("r1", {"rejection_sft.max_new_tokens": 1000}, "config.rejection_sft: rejection_sft.max_new_tokens=1000 leaves no "
                                                   "room for a prompt under the model's max_position_embeddings=128"),
    ("r1", {"rl_all.max_new_tokens": 128}, "config.rl_all: rl_all.max_new_tokens=128 leaves no room"),
    ("distill", {"student_rl.max_new_tokens": 128}, "config.student_rl: student_rl.max_new_tokens=128 leaves no room"),
    ("distill", {"distill.max_new_tokens": 300}, "config.distill: distill.max_new_tokens=300 leaves no room for a "
                                                 "prompt under the teacher's max_position_embeddings=128"),
])
def test_r1_and_distillation_sections_are_checked_before_any_stage_runs(config_name, changes, message):
    """Every stage's own section, not only R1-Zero's: a bad value in the fourth stage fails before the first
    trains (it used to surface hours later, or hang: general_fraction 1.5 asked for 10^11 general items)."""
    import importlib

    from r1jax.pipeline import ConfigError, stage_names
    from r1jax.stages import validate_config

    config = importlib.import_module(f"configs.{config_name}").get_config()
    for key, value in changes.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    with pytest.raises(ConfigError) as raised:
        validate_config(config, stage_names(config))
    assert message in str(raised.value)


@pytest.mark.parametrize("config_name, preset", [("r1", ""), ("distill", ""), ("r1zero", ""),
                                                 ("r1_qwen7b", "qwen2.5-7b"), ("distill_qwen1p5b", "qwen2.5-1.5b")])
def test_every_shipped_config_passes_its_checks(config_name, preset):
    """The shipped configs pass (the scale-up ones with the preset of the HF model they name, absent here)."""
    import importlib

    from r1jax.pipeline import stage_names
    from r1jax.stages import validate_config

    config = importlib.import_module(f"configs.{config_name}").get_config()
    if preset:
        config.model.hf_path, config.model.preset = "", preset
    validate_config(config, stage_names(config))


class BuildingModel(Exception):
    """Raised where a run that passed its checks would build its model."""


@pytest.fixture
def started_workdir(tmp_path, monkeypatch):
    """A workdir whose pretrain stage has started with `override_config()`; a run that gets past its checks
    raises BuildingModel instead of building the model."""
    from r1jax.pipeline import StageManifest

    def building(*args, **kwargs):
        raise BuildingModel

    monkeypatch.setattr("r1jax.pipeline.init_model", building)
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(override_config().to_json_best_effort())
    StageManifest("pretrain").write(workdir / "pretrain")
    return workdir


def test_a_started_workdir_refuses_other_run_settings_and_keeps_its_config(started_workdir):
    """Rerunning into a workdir whose stages have started, with another corpus, tokenizer, data or model,
    would mix two runs (a finished run's tokenizer was retrained under its model by the next command that
    rebuilt it): refused, naming the fields, config.json left as it was. How a model computes (remat) is
    free."""
    from r1jax.pipeline import ConfigError, run_pipeline
    from r1jax.stages import STAGES, validate_config

    workdir = started_workdir
    recorded = (workdir / "config.json").read_bytes()
    changed = override_config(**{"pretrain.corpus_size": 120, "model.hidden_size": 48})
    with pytest.raises(ConfigError, match=r"holds a run started with other settings \(model.hidden_size: 32 -> 48; "
                                          r"pretrain.corpus_size: 100 -> 120\)"):
        run_pipeline(changed, workdir, STAGES, validate=validate_config)
    assert (workdir / "config.json").read_bytes() == recorded
    with pytest.raises(BuildingModel):  # past the check: building the model
        run_pipeline(override_config(**{"model.remat": "full"}), workdir, STAGES, validate=validate_config)


def test_a_started_workdir_lets_evaluation_settings_change_but_not_its_training_data(started_workdir):
    """The held-out set (data.eval, data.eval_size) only changes what is measured: free in a started
    workdir. The training data is not, and a run of later stages is checked against the stages an
    earlier invocation started, not only its own."""
    from r1jax.pipeline import ConfigError, run_pipeline
    from r1jax.stages import STAGES, validate_config

    workdir = started_workdir
    with pytest.raises(BuildingModel):
        run_pipeline(override_config(**{"data.eval_size": 4, "data.eval": "/data/held_out.jsonl"}), workdir, STAGES,
                     validate=validate_config)
    assert json.loads((workdir / "config.json").read_text())["data"]["eval_size"] == 4
    with pytest.raises(ConfigError, match=r"other settings \(data.train_size: 32 -> 40\)"):
        run_pipeline(override_config(**{"data.train_size": 40}), workdir, STAGES, validate=validate_config)
    with pytest.raises(ConfigError, match=r"other settings \(model.hidden_size: 32 -> 48\)"):
        run_pipeline(override_config(**{"model.hidden_size": 48, "stages": "rl"}), workdir, STAGES,
                     validate=validate_config)


def test_no_process_reads_half_of_the_config_json_another_writes(started_workdir, monkeypatch):
    """Every process compares the workdir's config.json with its config while process 0 rewrites it: the
    file is replaced whole, so a slower process reads the old one or the new one, never a torn one."""
    from r1jax.pipeline import run_pipeline
    from r1jax.stages import STAGES, validate_config

    workdir = started_workdir
    write_text, torn = Path.write_text, []

    def slow_write(self, data, *args, **kwargs):  # writes half, lets another process read, then the rest
        if self.parent == workdir:
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            try:
                json.loads((workdir / "config.json").read_text())
            except json.JSONDecodeError:
                torn.append(self.name)
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", slow_write)
    with pytest.raises(BuildingModel):
        run_pipeline(override_config(**{"model.remat": "full"}), workdir, STAGES, validate=validate_config)
    assert not torn
    assert json.loads((workdir / "config.json").read_text())["model"]["remat"] == "full"


def test_a_copied_workdir_chains_its_own_stages_and_checks_their_hashes(tmp_path):
    """Stages hand on the parameters in their own workdir, not the absolute path a manifest recorded (a
    copy went on from the original's files), and a stage's `final` that no longer matches its recorded
    hash is refused."""
    import shutil

    import jax
    from flax import nnx

    from r1jax.pipeline import ConfigError, RunContext, StageManifest, run_pipeline, save_params

    def bump(ctx, model, stage_dir):  # a stand-in stage that changes every parameter
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x + 1, state)), {}

    stages = {"pretrain": bump, "rl": bump}
    original, copy = tmp_path / "original", tmp_path / "copy"
    run_pipeline(override_config(), original, stages)
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "rl")
    pretrain = StageManifest.read(copy / "pretrain")
    final = original / "pretrain" / "final"
    changed, _ = bump(None, RunContext(override_config(), original).model_from(final), None)
    shutil.rmtree(final)
    save_params(nnx.state(changed), final)  # the original's files change: the copy must not see it
    rl = run_pipeline(override_config(), copy, stages)["rl"]
    assert rl.init_checkpoint == str((copy / "pretrain" / "final").absolute())
    assert rl.init_param_hash == pretrain.param_hash
    shutil.rmtree(copy / "rl")
    shutil.rmtree(copy / "pretrain" / "final")
    shutil.copytree(original / "pretrain" / "final", copy / "pretrain" / "final")
    with pytest.raises(ConfigError, match=r"pretrain/final: its parameters \(hash \w+\) are not those stage pretrain"):
        run_pipeline(override_config(), copy, stages)


def test_an_rl_stage_run_alone_after_pretraining_is_told_to_list_the_pretrain_stage(tmp_path):
    """`--config.stages=rl` in a workdir whose pretrain stage finished started RL from a random model.
    r1zero's `rl` section has no `init` field to set: the refusal says to list pretrain first (it is
    skipped, and rl builds on it)."""
    import jax
    from flax import nnx

    from r1jax.pipeline import ConfigError, run_pipeline

    def bump(ctx, model, stage_dir):  # a stand-in stage that changes every parameter
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x + 1, state)), {}

    stages = {"pretrain": bump, "rl": bump}
    pretrain = run_pipeline(override_config(stages="pretrain"), tmp_path, stages)["pretrain"]
    with pytest.raises(ConfigError, match=r"config.rl.init='previous' .*\['pretrain'\]; list the one to build "
                                          r"on first \(config.rl has no init field\): --config.stages=pretrain,rl"
                       ) as refused:
        run_pipeline(override_config(stages="rl"), tmp_path, stages)
    assert "--config.rl.init=" not in str(refused.value) and not (tmp_path / "rl").exists()
    assert run_pipeline(override_config(), tmp_path, stages)["rl"].init_param_hash == pretrain.param_hash


def test_a_preset_chosen_in_the_config_keeps_its_clip_and_kl_unless_the_config_sets_them():
    from configs.r1zero import get_config
    from r1jax.grpo import PRESETS, GRPOConfig
    from r1jax.stages import grpo_config

    rl = get_config().rl
    fixed = dict(group_size=rl.group_size, num_iterations=rl.num_iterations)
    for preset in PRESETS:  # e.g. dapo: ε 0.2 / 0.28 and β 0, not r1zero's grpo values
        rl.preset = preset
        budget = {"max_completion_length": 32} if preset == "dr_grpo" else {}
        assert grpo_config(rl, 32) == GRPOConfig.preset(preset, **fixed, **budget), preset
    rl.preset, rl.beta = "dapo", 0.01  # a field the config sets overrides the preset's
    assert grpo_config(rl, 32) == GRPOConfig.preset("dapo", beta=0.01, **fixed)
    rl.advantage_scale, rl.advantage_std_ddof, rl.advantage_eps = "batch", 1, 1e-4  # TRL's advantages
    assert grpo_config(rl, 32) == GRPOConfig.preset("dapo", beta=0.01, advantage_scale="batch", advantage_std_ddof=1,
                                                    advantage_eps=1e-4, **fixed)


HUGE_PAGES_PROBE = r"""
import ctypes, os
print("started", os.getpid(), flush=True)
from r1jax.hugepages import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # served by mmap: the kind of block XLA:CPU's temporaries are
block = libc.malloc(size)
ctypes.memset(block, 1, size)
with open("/proc/self/smaps_rollup") as f:
    huge = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
print("tunables", os.environ.get("GLIBC_TUNABLES"), "huge_kib", huge, flush=True)
"""


def _probe(**env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "R1JAX_HUGE_PAGES")}
    result = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], cwd=REPO, capture_output=True, text=True,
                            env={**base, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    started = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("started")]
    *_, tunables, _, huge = result.stdout.splitlines()[-1].split()
    return started, tunables, int(huge)


def test_the_cli_reexecutes_itself_with_huge_pages_for_xla_buffers_when_asked():
    from r1jax.hugepages import glibc_version, transparent_huge_pages_mode

    if (glibc_version() or (0, 0)) < (2, 35) or transparent_huge_pages_mode() not in ("always", "madvise"):
        pytest.skip("needs glibc ≥ 2.35 (Linux) and transparent huge pages")
    started, tunables, huge = _probe(R1JAX_HUGE_PAGES="1", GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert len(started) == 2 and started[0] == started[1]  # the same process, its program run again
    assert tunables == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # the user's tunables kept
    assert huge >= 32 << 10  # the 64 MiB block (mostly) on 2 MiB pages
    started, tunables, huge = _probe()  # not asked for
    assert len(started) == 1 and tunables == "None"
    if transparent_huge_pages_mode() == "madvise":  # nothing asked for huge pages
        assert huge < 8 << 10


@pytest.mark.parametrize("environ, glibc, thp, accelerator, expected", [
    ({}, (2, 36), "madvise", False, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "always", False,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"JAX_PLATFORMS": "cpu"}, (2, 39), "madvise", True, "glibc.malloc.hugetlb=1"),  # CPU asked for
    ({}, (2, 36), "madvise", True, None),  # JAX will take the TPU / GPU
    ({"JAX_PLATFORMS": "tpu"}, (2, 36), "madvise", False, None),
    ({"JAX_PLATFORMS": "cuda,cpu"}, (2, 36), "madvise", True, None),  # CPU only as the fallback
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", False, None),  # the user's choice stands
    ({"R1JAX_HUGE_PAGES": "0"}, (2, 36), "madvise", False, None),  # not asked for (nor when unset, below)
    ({}, (2, 34), "madvise", False, None),  # no hugetlb tunable before glibc 2.35
    ({}, None, "madvise", False, None),  # another C library
    ({}, (2, 36), "never", False, None),
    ({}, (2, 36), None, False, None),
])
def test_when_huge_pages_apply(environ, glibc, thp, accelerator, expected):
    from r1jax.hugepages import huge_pages_environment

    asked = {"PATH": "/bin", "R1JAX_HUGE_PAGES": "1", **environ}
    env = huge_pages_environment(asked, glibc, thp, accelerator)
    if expected is None:
        assert env is None
    else:
        assert env == {**asked, "GLIBC_TUNABLES": expected}
        assert huge_pages_environment({k: v for k, v in asked.items() if k != "R1JAX_HUGE_PAGES"}, glibc, thp,
                                      accelerator) is None  # off unless asked for
