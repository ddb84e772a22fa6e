"""The R1 pipeline and distillation end to end on tiny settings, in subprocesses, as a user runs them.

One module fixture runs `python -m r1jax.train --config=r1` with tiny overrides, SIGKILLs it once the
rejection-sampling SFT (stage 3) has written a checkpoint, reruns it to the end, and then runs
`--config=distill` with the R1 run as teacher. The tests read what those runs left on disk. A
persistent compilation cache shared by the subprocesses keeps the reruns from compiling again.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
R1_STAGES = ("pretrain", "cold_start", "reasoning_rl", "rejection_sft", "rl_all")
SFT3_STEPS = 40

TINY_MODEL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
# One optimizer and sampling setting for every SFT / RL stage, so that stages share compiled programs.
TINY_SFT = {"batch_size": 4, "warmup_steps": 0, "max_length": 128, "schedule": "constant", "learning_rate": 5e-4}
TINY_RL = {"prompts_per_step": 2, "group_size": 2, "warmup_steps": 0, "max_new_tokens": 12, "learning_rate": 1e-4,
           "temperature": 1.0}
TINY_COMMON = {
    **{f"model.{k}": v for k, v in TINY_MODEL.items()},
    "model.max_position_embeddings": 128, "tokenizer.vocab_size": 320,
    "pretrain.corpus_size": 200, "pretrain.steps": 4, "pretrain.batch_size": 8, "pretrain.warmup_steps": 0,
    "pretrain.max_length": 64,
    "data.train_size": 64, "data.eval_size": 2, "data.max_prompt_length": 32,
    # The test's own task (2-3 operations, values <= 99), not the demo's: on the demo's easier one the tiny
    # rl_all drew only equal-reward groups (no gradient), and "every stage trained" would not hold.
    "data.min_steps": 2, "data.max_steps": 3, "data.max_value": 99,
    "eval.k": 1, "eval.max_new_tokens": 12, "eval.general_size": 2, "eval.general_k": 1,
    "checkpoint.every": 2, "checkpoint.keep": 3,
}
TINY_R1 = {
    **TINY_COMMON,
    **{f"cold_start.{k}": v for k, v in TINY_SFT.items()},
    "cold_start.prompts": 4, "cold_start.samples_per_prompt": 2, "cold_start.min_examples": 8,
    "cold_start.max_new_tokens": 12, "cold_start.steps": 2,
    **{f"reasoning_rl.{k}": v for k, v in TINY_RL.items()}, "reasoning_rl.steps": 2,
    **{f"rejection_sft.{k}": v for k, v in TINY_SFT.items()},
    "rejection_sft.prompts": 4, "rejection_sft.samples_per_prompt": 2, "rejection_sft.max_new_tokens": 12,
    "rejection_sft.min_examples": 8, "rejection_sft.top_up_with_traces": True, "rejection_sft.steps": SFT3_STEPS,
    **{f"rl_all.{k}": v for k, v in TINY_RL.items()}, "rl_all.steps": 2,
}
TINY_DISTILL = {
    **TINY_COMMON,
    "model.hidden_size": 16, "model.intermediate_size": 32,  # the student: smaller than the teacher
    **{f"distill.teacher.model.{k}": v for k, v in TINY_MODEL.items()},
    "distill.teacher.model.max_position_embeddings": 128,
    **{f"distill.{k}": v for k, v in TINY_SFT.items()},
    "distill.prompts": 4, "distill.samples_per_prompt": 2, "distill.max_new_tokens": 12, "distill.min_examples": 8,
    "distill.top_up_with_traces": True, "distill.steps": 4,
    **{f"student_rl.{k}": v for k, v in TINY_RL.items()}, "student_rl.calibration_steps": 2, "student_rl.steps": 6,
}


def command(config: str, workdir: Path, overrides: dict) -> list[str]:
    return [sys.executable, "-m", "r1jax.train", f"--config={config}", "--workdir", str(workdir),
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def environment(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def checkpoint_steps(stage_dir: Path) -> list[int]:
    ckpt = stage_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def manifest(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "manifest.json").read_text())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1_pipeline")
    workdir, env = root / "r1", environment(root / "jax_cache")
    log = open(root / "first.log", "w")
    first = subprocess.Popen(command("r1", workdir, TINY_R1), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 900
    try:
        while not checkpoint_steps(workdir / "rejection_sft"):
            if first.poll() is not None:
                pytest.fail(f"the first run exited ({first.returncode}) before stage 3 saved a checkpoint:\n"
                            + (root / "first.log").read_text()[-3000:])
            if time.time() > deadline:
                pytest.fail("stage 3 wrote no checkpoint within 15 minutes")
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait()
        log.close()
    killed_at = checkpoint_steps(workdir / "rejection_sft")
    before = {s: (workdir / s / "manifest.json").read_bytes() for s in R1_STAGES[:3]}
    mtimes = {s: (workdir / s / "manifest.json").stat().st_mtime_ns for s in R1_STAGES[:3]}
    stage3_data = digest(workdir / "rejection_sft" / "data.jsonl")
    stage3_status = manifest(workdir, "rejection_sft")["status"]

    second = subprocess.run(command("r1", workdir, TINY_R1), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    distill_dir = root / "distill"
    distill = subprocess.run(command("distill", distill_dir, {**TINY_DISTILL, "distill.teacher.workdir": workdir}),
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert distill.returncode == 0, distill.stdout[-3000:] + distill.stderr[-3000:]
    return {"workdir": workdir, "killed_at": killed_at, "before": before, "mtimes": mtimes, "stage3_data": stage3_data,
            "stage3_status": stage3_status, "second": second.stdout, "distill_dir": distill_dir,
            "distill": distill.stdout}


@pytest.mark.slow
def test_all_four_stages_run_and_chain_by_parameter_hash(runs):
    workdir = runs["workdir"]
    m = {s: manifest(workdir, s) for s in R1_STAGES}
    assert all(x["status"] == "done" and Path(x["checkpoint"]).is_dir() for x in m.values())
    assert all(x["config"] for s, x in m.items() if s != "pretrain")  # each stage's config section is recorded
    # Each stage starts from the previous stage's final parameters ...
    for prev, cur in [("pretrain", "cold_start"), ("cold_start", "reasoning_rl"), ("rejection_sft", "rl_all")]:
        assert m[cur]["init_param_hash"] == m[prev]["param_hash"], cur
        assert m[cur]["init_checkpoint"] == m[prev]["checkpoint"] and m[cur]["init_source"] == "previous"
    # ... except rejection-sampling SFT, which retrains the base (init="base"), sampling from stage 2.
    assert m["rejection_sft"]["init_source"] == "base"
    assert m["rejection_sft"]["init_param_hash"] == m["pretrain"]["param_hash"]
    assert m["rejection_sft"]["metrics"]["data/sampled_from"] == m["reasoning_rl"]["checkpoint"]
    assert len({x["param_hash"] for x in m.values()}) == 5  # every stage trained
    for s in R1_STAGES[1:]:
        metrics = m[s]["metrics"]
        assert {"eval/pass1", "eval/format", "eval/lang_consistent", "eval/helpfulness"} <= set(metrics), s
        assert metrics["eval/template"] == "r1", s  # what `python -m r1jax.evaluate --workdir` prompts it with
    assert "| rl_all | rejection_sft |" in (workdir / "report.md").read_text()


@pytest.mark.slow
def test_kill_during_stage_3_resumes_stage_3_only(runs):
    workdir = runs["workdir"]
    assert runs["stage3_status"] == "running" and runs["killed_at"], "the kill did not land inside stage 3"
    # Stages 1-2 (and the base) were skipped, their manifests untouched, byte for byte.
    for s in R1_STAGES[:3]:
        assert f"stage {s}: done already" in runs["second"]
        assert (workdir / s / "manifest.json").read_bytes() == runs["before"][s]
        assert (workdir / s / "manifest.json").stat().st_mtime_ns == runs["mtimes"][s]
    # Stage 3 reused its rejection-sampled data and resumed training from its last checkpoint.
    assert digest(workdir / "rejection_sft" / "data.jsonl") == runs["stage3_data"]
    assert "rejection_sft: reusing" in runs["second"]
    resumed = [line for line in runs["second"].splitlines() if "rejection_sft: resuming training" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= runs["killed_at"][-1] > 0
    steps = [json.loads(line)["step"] for line in (workdir / "rejection_sft" / "metrics.jsonl").open()]
    assert steps == list(range(1, SFT3_STEPS + 1))  # resumed, not restarted, and no step logged twice
    assert manifest(workdir, "rl_all")["status"] == "done"


@pytest.mark.slow
def test_distill_trains_and_evaluates_student_and_rl_control(runs):
    d, teacher = runs["distill_dir"], runs["workdir"]
    m = {s: manifest(d, s) for s in ("pretrain", "distill", "student_rl")}
    assert m["distill"]["init_param_hash"] == m["pretrain"]["param_hash"]
    assert m["student_rl"]["init_source"] == "pretrain"  # the same student base, not the distilled one
    assert m["student_rl"]["init_param_hash"] == m["pretrain"]["param_hash"]
    dm, rm = m["distill"]["metrics"], m["student_rl"]["metrics"]
    assert dm["data/teacher"] == manifest(teacher, "rl_all")["checkpoint"]
    assert dm["data/seen"] == 4 * 2 and dm["data/examples"] >= 8
    assert 0.0 <= dm["eval/pass1"] <= 1.0 and 0.0 <= rm["eval/pass1"] <= 1.0
    assert rm["rl/budget"] == pytest.approx(dm["time/budget_s"]) and rm["rl/budget_clock"] == "wall"
    assert 2 <= rm["rl/steps"] <= 6


@pytest.mark.slow
def test_language_reward_keeps_cots_in_one_language_where_accuracy_rewards_mixing(tmp_path):
    # bench/language_mixing.py: a base whose correct traces all mix in Chinese filler words; GRPO with
    # accuracy alone vs accuracy + R1 eq. 7, same seed and settings; CoTs sampled on the RL prompts.
    bench = [sys.executable, str(REPO / "bench" / "language_mixing.py"), "--workdir", str(tmp_path / "run")]
    out = subprocess.run(bench, cwd=REPO, env=environment(tmp_path / "jax_cache"), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    base, accuracy_only, with_language = r["base"], r["accuracy_only"], r["with_language"]
    assert accuracy_only["consistent"] < base["consistent"] - 0.1  # the task tempts: accuracy alone spreads mixing
    assert with_language["consistent"] > base["consistent"] + 0.2  # eq. 7 drives it out ...
    assert with_language["consistent"] > accuracy_only["consistent"] + 0.3  # ... where accuracy alone would not
    assert with_language["word_share"] > accuracy_only["word_share"]


def test_configs_load_with_the_papers_values():
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()

    r1, distill = load("r1"), load("distill")
    assert r1.stages.split(",") == list(R1_STAGES) and r1.rejection_sft.init == "base"
    assert dict(r1.reasoning_rl.rewards) == {"accuracy": 1.0, "r1_format": 1.0, "language": 1.0}
    assert distill.student_rl.init == "pretrain" and distill.model.hidden_size < r1.model.hidden_size
    assert distill.distill.teacher.model.hidden_size == r1.model.hidden_size
    big = load("r1_qwen7b")
    rl, rl_all = big.reasoning_rl, big.rl_all
    assert (rl.learning_rate, rl.beta, rl.epsilon_low, rl.group_size, rl.temperature) == (3e-6, 0.001, 10.0, 16, 1.0)
    # R1's training step (32 questions, batch 512) is one of the 16 minibatches of a rollout of 8,192 (test_docs.py)
    assert rl.prompts_per_step * rl.group_size == 8192 and rl.num_minibatches == 16 and rl.ref_update_every == 25
    assert (rl_all.temperature, rl_all.steps * rl_all.num_minibatches) == (0.7, 1696)
    assert (big.eval.temperature, big.eval.top_p) == (0.6, 0.95) and big.rejection_sft.general_fraction == 0.25
    small = load("distill_qwen1p5b")
    assert small.stages == "distill,student_rl" and small.distill.learning_rate == 1e-4
    assert small.distill.teacher.model.hf_path == big.model.hf_path and small.model.hf_path != big.model.hf_path


def test_every_grpo_section_schedules_optimizer_updates_not_steps():
    # One function reads every GRPO section (r1zero's rl, r1's reasoning_rl / rl_all, distill's student_rl):
    # the optax schedule counts updates, μ × minibatches of them per step.
    import importlib.util

    from r1jax.sampling import SamplingConfig
    from r1jax.stages import grpo_run_config, rl_config

    spec = importlib.util.spec_from_file_location("r1_config", REPO / "configs" / "r1.py")
    r1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(r1)
    section = r1.grpo_section(steps=30, warmup_steps=3, num_iterations=2, num_minibatches=4, schedule="cosine",
                              preset="dr_grpo", max_new_tokens=40)
    cfg = grpo_run_config(section, SamplingConfig(max_new_tokens=40), seed=0)
    assert (cfg.optim.total_steps, cfg.optim.warmup_steps, cfg.num_minibatches) == (240, 24, 4)
    assert cfg.loss.num_iterations == 2 and cfg.loss.max_completion_length == 40
    assert cfg.chunk_size == 512 and cfg.dynamic_sampling is False  # left out of the section: RLConfig's defaults

    zero_spec = importlib.util.spec_from_file_location("r1zero_config", REPO / "configs" / "r1zero.py")
    r1zero = importlib.util.module_from_spec(zero_spec)
    zero_spec.loader.exec_module(r1zero)
    c = r1zero.get_config()
    c.rl.update(dict(num_iterations=2, num_minibatches=2))
    assert rl_config(c, 0, 0).optim.total_steps == 4 * c.rl.steps


def _numpy_checksums(x: np.ndarray) -> np.ndarray:
    """pipeline._checksums in NumPy (uint64 arithmetic, reduced mod 2³² by hand)."""
    bits = x.view({1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)).astype(np.uint64).reshape(-1)
    index = np.arange(bits.size, dtype=np.uint64)
    out = []
    for seed in (0x9E3779B9, 0x7F4A7C15):
        h = index ^ seed
        h = ((h ^ (h >> 16)) * 0x85EBCA6B) % 2**32
        h = ((h ^ (h >> 13)) * 0xC2B2AE35) % 2**32
        h = (h ^ (h >> 16)) | 1
        out.append(int(np.sum((bits * h) % 2**32) % 2**32))
    return np.asarray(out, np.uint32)


def test_param_hash_is_the_same_on_every_mesh_and_sees_every_element():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax.model import get_preset, init_model
    from r1jax.model.build import shard_model
    from r1jax.pipeline import _leaf_checksums, param_hash
    from r1jax.sharding import make_mesh

    model = init_model(get_preset("tiny-qwen2", num_layers=1), seed=0)
    state = nnx.state(model)
    digest = param_hash(state)
    for shape in [(2, 2, 2), (1, 8, 1)]:  # parameters split over 8 devices two ways, no gather
        sharded = nnx.state(shard_model(model, make_mesh(*shape)))
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
        assert param_hash(sharded) == digest, shape
    # the checksums equal a NumPy recomputation, for fp32 and bf16
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)][:3]
    arrays = [*leaves, leaves[0].astype(jnp.bfloat16)]
    for x in arrays:
        np.testing.assert_array_equal(np.asarray(_leaf_checksums(jnp.asarray(x)), np.uint32), _numpy_checksums(x))
    # one element one ulp away, or two elements swapped: another hash
    leaf = state["layers"][0]["mlp"]["up"]
    value = np.asarray(leaf[...])
    nudged, swapped = value.copy(), value.copy()
    nudged[3, 5] = np.nextafter(nudged[3, 5], np.float32(np.inf))
    swapped[[0, 1]] = swapped[[1, 0]]
    for changed in (nudged, swapped):
        leaf[...] = jnp.asarray(changed)
        assert param_hash(state) != digest
    leaf[...] = jnp.asarray(value)
    assert param_hash(state) == digest


# ------------------------------------------------------------------------------------ user-supplied data


def grading_rows():
    """A right answer, a wrong one (answer 0, falsy, still a gold answer) and a question with no answer."""
    return [
        {"question": "Compute 2 + 3", "answer": "5", "reasoning": "2+3=5", "summary": "The answer is \\boxed{5}."},
        {"question": "Compute 4 - 4", "answer": 0, "reasoning": "4-4=1", "summary": "The answer is \\boxed{1}."},
        {"question": "Say hello.", "reasoning": "A greeting.", "summary": "Hello!"},
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_user_cold_start_and_trace_files_drop_wrong_answers_and_keep_ungraded_rows(tmp_path):
    """A cold-start file or a distillation trace file may mix gradable and ungradable questions: rows
    without a gold answer are kept, rows graded wrong still go (one ungraded row used to switch the
    correctness filter off for the whole file)."""
    from configs import distill, r1
    from r1jax.data.templates import format_cold_start
    from r1jax.pipeline import RunContext
    from r1jax.stages_distill import distill_examples
    from r1jax.stages_r1 import cold_start_examples

    c = r1.get_config()
    c.cold_start.data_path = write_jsonl(tmp_path / "cold.jsonl", grading_rows())
    kept, stats = cold_start_examples(RunContext(c, tmp_path / "r1"), None, c.cold_start)
    assert [k["question"] for k in kept] == ["Compute 2 + 3", "Say hello."]
    assert [k["correct"] for k in kept] == [True, None] and stats["data/incorrect"] == 1

    c = distill.get_config()
    traces = [{"question": r["question"], "completion": format_cold_start(r["reasoning"], r["summary"]),
               **({"answer": r["answer"]} if "answer" in r else {})} for r in grading_rows()]
    c.distill.traces_path = write_jsonl(tmp_path / "traces.jsonl", traces)
    kept, stats = distill_examples(RunContext(c, tmp_path / "distill"), c.distill, tmp_path / "stage")
    assert stats["data/kept"] == 2 and stats["data/incorrect"] == 1  # (general examples are added after)
    assert [k["question"] for k in kept[:2]] == ["Compute 2 + 3", "Say hello."]


def test_an_hf_teacher_samples_with_its_own_tokenizer(tmp_path, monkeypatch):
    """distill_qwen1p5b's teacher is an r1_qwen7b run (tokenizer_path: Qwen2.5-7B's); the documented
    alternative, teacher.hf_path=<an R1 model>, must decode with that model's tokenizer, not Qwen's."""
    from configs import distill_qwen1p5b
    from r1jax.pipeline import RunContext
    from r1jax.stages_distill import teacher

    monkeypatch.setattr("r1jax.model.load_hf", lambda path, **_: f"model {path}")
    monkeypatch.setattr("r1jax.data.tokenizer.load_hf_tokenizer", lambda path: f"tokenizer {path}")
    config = distill_qwen1p5b.get_config()
    config.distill.teacher.hf_path = "/ckpt/DeepSeek-R1-Distill-Qwen-7B"
    assert config.distill.teacher.tokenizer_path == "/ckpt/Qwen2.5-7B"
    model, tok, source = teacher(RunContext(config, tmp_path))
    assert (model, tok) == ("model /ckpt/DeepSeek-R1-Distill-Qwen-7B", "tokenizer /ckpt/DeepSeek-R1-Distill-Qwen-7B")


# ------------------------------------------------------------------------------------ stage handoff on disk


def tiny_r1_config(**changes):
    from configs import r1

    config = r1.get_config()
    config.update_from_flattened_dict({**TINY_R1, **changes})
    return config


def bump(ctx, model, stage_dir):
    """A stand-in stage that adds 1 to every parameter: each stage's final differs from its start."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x + 1, state)), {}


STAND_INS = dict.fromkeys(R1_STAGES, bump)


def test_config_stages_is_read_one_way():
    from ml_collections import ConfigDict

    from r1jax.pipeline import stage_names

    assert stage_names(ConfigDict({"stages": " pretrain, ,rl_all ,"})) == ["pretrain", "rl_all"]


def test_rejection_sampling_samples_from_its_own_workdirs_stage_checked_by_hash(tmp_path, monkeypatch):
    """rejection_sft's `sample_from` stage is read from this workdir (a copy sampled from the original's
    files, by the absolute path its manifest recorded) and checked against the hash that stage recorded."""
    import shutil

    from flax import nnx

    from r1jax import stages_r1
    from r1jax.pipeline import ConfigError, RunContext, StageManifest, param_hash, run_pipeline, save_params

    config = tiny_r1_config(stages="pretrain,cold_start,reasoning_rl")
    original, copy = tmp_path / "original", tmp_path / "copy"
    run_pipeline(config, original, STAND_INS)
    shutil.copytree(original, copy)
    final = original / "reasoning_rl" / "final"
    changed, _ = bump(None, RunContext(config, original).model_from(final), None)
    shutil.rmtree(final)
    save_params(nnx.state(changed), final)  # the original's files change: the copy must not see it

    class Sampled(Exception):
        pass

    def sample_graded(ctx, graphdef, params, *args, **kwargs):
        raise Sampled(param_hash(params))

    monkeypatch.setattr(stages_r1, "sample_graded", sample_graded)
    config = tiny_r1_config(stages="pretrain,cold_start,reasoning_rl,rejection_sft")

    def sampled_hash(workdir):
        with pytest.raises(Sampled) as sampled:
            stages_r1.rejection_sft(RunContext(config, workdir), None, workdir / "rejection_sft")
        return sampled.value.args[0]

    assert sampled_hash(copy) == StageManifest.read(copy / "reasoning_rl").param_hash
    shutil.rmtree(copy / "reasoning_rl" / "final")
    shutil.copytree(final, copy / "reasoning_rl" / "final")
    with pytest.raises(ConfigError, match=r"copy/reasoning_rl/final: its parameters \(hash \w+\) are not those "
                                          r"stage reasoning_rl finished with"):
        sampled_hash(copy)


def test_a_later_invocation_builds_on_the_stages_an_earlier_one_finished(tmp_path):
    """`--config.stages=rejection_sft,rl_all` after a run of the first stages: `sample_from` may name a stage
    finished in the workdir, and `init="base"` starts from its finished pretrain stage (not a random
    model); a stage neither in the list nor finished there is refused before any work, naming the field."""
    from r1jax.pipeline import ConfigError, StageManifest, run_pipeline
    from r1jax.stages import validate_config

    workdir, fresh = tmp_path / "w", tmp_path / "fresh"
    run_pipeline(tiny_r1_config(stages="pretrain,cold_start,reasoning_rl"), workdir, STAND_INS,
                 validate=validate_config)
    later = tiny_r1_config(stages="rejection_sft,rl_all", **{"rejection_sft.sample_from": "reasoning_rl"})
    manifests = run_pipeline(later, workdir, STAND_INS, validate=validate_config)
    sft, pretrain = manifests["rejection_sft"], StageManifest.read(workdir / "pretrain")
    assert (sft.init_source, sft.init_param_hash) == ("base", pretrain.param_hash)
    assert sft.init_checkpoint == str((workdir / "pretrain" / "final").absolute())
    assert manifests["rl_all"].init_param_hash == sft.param_hash

    StageManifest("reasoning_rl").write(fresh / "reasoning_rl")  # started, not finished
    with pytest.raises(ConfigError, match=r"config.rejection_sft: rejection_sft.sample_from='reasoning_rl'; "
                                          r"accepted: 'previous' or a stage before it"):
        run_pipeline(later, fresh, STAND_INS, validate=validate_config)
    assert sorted(p.name for p in fresh.iterdir()) == ["reasoning_rl"]


def test_the_first_stage_of_a_later_invocation_says_which_finished_stage_it_builds_on(tmp_path):
    """`--config.stages=rl_all` after a run of the first four stages: rl_all's init="previous" (the stage before
    it in config.stages) names none, and it started silently from a random model. Refused before any work,
    naming the field and the stages it could build on; named (init=...) or listed first (a finished stage is
    skipped), it starts from that stage. A fresh workdir, and a rerun of a killed run with the same list, go
    on as before; a stage that would resume as the first of another list is refused too."""
    import shutil

    from r1jax.pipeline import ConfigError, StageManifest, run_pipeline
    from r1jax.stages import validate_config

    workdir, copy = tmp_path / "w", tmp_path / "copy"
    run_pipeline(tiny_r1_config(stages="pretrain,cold_start,reasoning_rl,rejection_sft"), workdir, STAND_INS,
                 validate=validate_config)
    shutil.copytree(workdir, copy)
    recorded = (workdir / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"config.rl_all.init='previous' .*\['pretrain', 'cold_start', "
                                          r"'reasoning_rl', 'rejection_sft'\].*--config.rl_all.init=rejection_sft.*"
                                          r"--config.stages=rejection_sft,rl_all"):
        run_pipeline(tiny_r1_config(stages="rl_all"), workdir, STAND_INS, validate=validate_config)
    assert not (workdir / "rl_all").exists() and (workdir / "config.json").read_bytes() == recorded
    sft = StageManifest.read(workdir / "rejection_sft")
    named = run_pipeline(tiny_r1_config(stages="rl_all", **{"rl_all.init": "rejection_sft"}), workdir, STAND_INS,
                         validate=validate_config)["rl_all"]
    listed = run_pipeline(tiny_r1_config(stages="rejection_sft,rl_all"), copy, STAND_INS,
                          validate=validate_config)["rl_all"]
    assert named.init_param_hash == listed.init_param_hash == sft.param_hash
    assert named.init_checkpoint == str((workdir / "rejection_sft" / "final").absolute())

    fresh = run_pipeline(tiny_r1_config(stages="cold_start"), tmp_path / "fresh", STAND_INS)["cold_start"]
    assert (fresh.init_source, fresh.init_checkpoint) == ("previous", "random-init")

    class Killed(Exception):
        pass

    def killed(ctx, model, stage_dir):
        raise Killed

    killed_run, stages = tmp_path / "killed", "pretrain,cold_start"
    with pytest.raises(Killed):
        run_pipeline(tiny_r1_config(stages=stages), killed_run, {**STAND_INS, "cold_start": killed})
    with pytest.raises(ConfigError, match=r"config.cold_start.init='previous' .*\['pretrain'\]"):
        run_pipeline(tiny_r1_config(stages="cold_start"), killed_run, STAND_INS)  # it would resume, from nothing
    resumed = run_pipeline(tiny_r1_config(stages=stages), killed_run, STAND_INS)["cold_start"]
    assert resumed.init_param_hash == StageManifest.read(killed_run / "pretrain").param_hash


def test_rejection_sampling_first_in_a_later_invocation_names_the_stage_it_samples_from(tmp_path):
    """`--config.stages=rejection_sft,rl_all` after a run of the first stages: sample_from="previous" (the
    stage before it in config.stages) names none, as init="previous" does; the refusal names the field and
    the finished stages and says what to write. Listed first, the stage to sample from is skipped and named
    by "previous"; a rejection_sft that finished samples no more, and a rerun of its list passes."""
    from r1jax.pipeline import ConfigError, StageManifest
    from r1jax.stages import validate_config

    for t, stage in enumerate(("pretrain", "cold_start", "reasoning_rl"), 1):
        StageManifest(stage, status="done", finished=float(t)).write(tmp_path / stage)
    later = tiny_r1_config(stages="rejection_sft,rl_all")
    with pytest.raises(ConfigError, match=r"config.rejection_sft: rejection_sft.sample_from='previous' .*"
                                          r"\['pretrain', 'cold_start', 'reasoning_rl'\]; say which: "
                                          r"--config.rejection_sft.sample_from=reasoning_rl .*"
                                          r"--config.stages=reasoning_rl,rejection_sft,rl_all"):
        validate_config(later, ["rejection_sft", "rl_all"], tmp_path)
    validate_config(later, ["reasoning_rl", "rejection_sft", "rl_all"], tmp_path)
    StageManifest("rejection_sft", status="done", finished=4.0).write(tmp_path / "rejection_sft")
    validate_config(later, ["rejection_sft", "rl_all"], tmp_path)
    with pytest.raises(ConfigError, match=r"rejection_sft.sample_from='previous'; accepted: 'previous' or a stage "
                                          r"before it .*: \[\] \('previous' names none"):
        validate_config(later, ["rejection_sft", "rl_all"], tmp_path / "fresh")  # nothing to sample from


def test_the_report_lists_the_stages_earlier_invocations_finished_then_this_ones(tmp_path):
    """report.md after `--config.stages=rejection_sft,rl_all` in a workdir where the first stages finished:
    those stages in the order they ran, then this invocation's (it listed this invocation's only)."""
    from r1jax.pipeline import RunContext, StageManifest
    from r1jax.stages_r1 import write_pipeline_report

    for t, stage in enumerate(("pretrain", "cold_start", "reasoning_rl"), 1):
        StageManifest(stage, status="done", finished=float(t), metrics={"eval/pass1": t / 10}).write(tmp_path / stage)
    ctx = RunContext(tiny_r1_config(stages="rejection_sft,rl_all"), tmp_path)

    def rows(current):
        lines = write_pipeline_report(ctx, current).read_text().splitlines()[4:]
        return [(line.split("|")[1].strip(), line.split("|")[3].strip()) for line in lines]

    assert rows({"rejection_sft": {"eval/pass1": 0.4}}) == [
        ("pretrain", "0.100"), ("cold_start", "0.200"), ("reasoning_rl", "0.300"), ("rejection_sft", "0.400")]
    StageManifest("rejection_sft", status="done", finished=4.0, metrics={"eval/pass1": 0.4}).write(
        tmp_path / "rejection_sft")
    assert [name for name, _ in rows({"rl_all": {"eval/pass1": 0.5}})] == [
        "pretrain", "cold_start", "reasoning_rl", "rejection_sft", "rl_all"]


def test_student_rl_may_take_its_budget_and_base_from_stages_finished_earlier(tmp_path):
    from configs import distill
    from r1jax.pipeline import ConfigError, StageManifest
    from r1jax.stages import validate_config

    config = distill.get_config()
    config.stages = "student_rl"
    with pytest.raises(ConfigError, match=r"config.student_rl: student_rl.init='pretrain'"):
        validate_config(config, ["student_rl"], tmp_path)
    StageManifest("pretrain", status="done").write(tmp_path / "pretrain")
    StageManifest("distill", status="done").write(tmp_path / "distill")
    with pytest.raises(ConfigError, match=r"config.student_rl: student_rl.budget_from='distill'"):
        validate_config(config, ["student_rl"], tmp_path)  # finished, but it measured no budget
    StageManifest("distill", status="done", metrics={"time/budget_s": 3.0, "time/budget_cpu_s": 2.0}).write(
        tmp_path / "distill")
    validate_config(config, ["student_rl"], tmp_path)


def test_a_teacher_run_is_read_from_its_workdir_where_it_is_now_checked_by_hash(tmp_path):
    """distill.teacher.workdir names an R1 run: its stage's parameters are read there (a moved run's manifest
    records the old absolute path) and checked against the hash the stage recorded."""
    import shutil

    from flax import nnx

    from configs import distill
    from r1jax.pipeline import ConfigError, RunContext, StageManifest, param_hash, run_pipeline
    from r1jax.stages_distill import teacher

    run_pipeline(tiny_r1_config(stages="pretrain,cold_start"), tmp_path / "r1", STAND_INS)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "r1", moved)
    config = distill.get_config()
    config.update_from_flattened_dict({**TINY_DISTILL, "distill.teacher.workdir": str(moved),
                                       "distill.teacher.stage": "cold_start"})
    model, _, source = teacher(RunContext(config, tmp_path / "student"))
    assert source == str((moved / "cold_start" / "final").absolute())
    assert param_hash(nnx.state(model)) == StageManifest.read(moved / "cold_start").param_hash
    shutil.rmtree(moved / "cold_start" / "final")
    shutil.copytree(moved / "pretrain" / "final", moved / "cold_start" / "final")
    with pytest.raises(ConfigError, match=r"moved/cold_start/final: its parameters \(hash \w+\) are not those stage "
                                          r"cold_start finished with"):
        teacher(RunContext(config, tmp_path / "student"))


def test_a_teacher_read_at_another_param_dtype_is_checked_against_the_parameters_its_run_saved(tmp_path):
    """teacher.model.param_dtype=bfloat16 (to save memory) over an fp32 R1 run: the hash its stage recorded is
    of the fp32 parameters, so they are checked as saved and then cast (the bf16 copy was refused as changed
    files); a final that is not the stage's is still refused."""
    import shutil

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import distill
    from r1jax.pipeline import ConfigError, RunContext, run_pipeline
    from r1jax.stages_distill import teacher

    r1_config = tiny_r1_config(stages="pretrain,cold_start")
    run_pipeline(r1_config, tmp_path / "r1", STAND_INS)
    config = distill.get_config()
    config.update_from_flattened_dict({**TINY_DISTILL, "distill.teacher.workdir": str(tmp_path / "r1"),
                                       "distill.teacher.stage": "cold_start",
                                       "distill.teacher.model.param_dtype": "bfloat16"})
    model, _, _ = teacher(RunContext(config, tmp_path / "student"))
    saved = nnx.state(RunContext(r1_config, tmp_path / "r1").model_from(tmp_path / "r1" / "cold_start" / "final"))
    for x, y in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(saved), strict=True):
        assert x.dtype == jnp.bfloat16 and y.dtype == jnp.float32 and x.sharding.is_equivalent_to(y.sharding, x.ndim)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jnp.bfloat16)))
    shutil.rmtree(tmp_path / "r1" / "cold_start" / "final")
    shutil.copytree(tmp_path / "r1" / "pretrain" / "final", tmp_path / "r1" / "cold_start" / "final")
    with pytest.raises(ConfigError, match=r"r1/cold_start/final: its parameters \(hash \w+\) are not those stage "
                                          r"cold_start finished with"):
        teacher(RunContext(config, tmp_path / "student"))


def test_the_teachers_samples_leave_room_under_the_teachers_positions_not_the_students(tmp_path):
    """distill.max_new_tokens is the teacher's sampling budget: checked against the teacher's positions (its
    model section, or its HF folder's config.json), before any stage runs; not checked where no teacher
    samples (traces_path) or where its config.json is not there to read (the distill stage loads it)."""
    from configs import distill
    from r1jax.model import get_preset, to_hf_config
    from r1jax.pipeline import ConfigError, stage_names
    from r1jax.stages import validate_config

    config = distill.get_config()
    config.model.max_position_embeddings = 64  # the student's
    config.distill.teacher.model.max_position_embeddings = 256
    config.distill.max_new_tokens = 100
    validate_config(config, stage_names(config))
    config.distill.teacher.model.max_position_embeddings = 100
    refused = r"config.distill: distill.max_new_tokens=100 leaves no room for a prompt under the teacher's " \
              r"max_position_embeddings=100"
    with pytest.raises(ConfigError, match=refused):
        validate_config(config, stage_names(config))
    config.distill.traces_path = str(tmp_path / "traces.jsonl")
    validate_config(config, stage_names(config))

    config.distill.traces_path, config.distill.teacher.hf_path = "", str(tmp_path / "teacher")
    validate_config(config, stage_names(config))  # no config.json (yet): the distill stage reads the folder
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(to_hf_config(get_preset(
        "tiny-qwen2", max_position_embeddings=100))))
    with pytest.raises(ConfigError, match=refused):
        validate_config(config, stage_names(config))


def test_an_sft_stage_builds_its_data_once_and_reuses_it_on_a_rerun(tmp_path, capsys):
    from r1jax.stages_r1 import cached_examples

    built = []

    def build():
        built.append(1)
        return [{"question": "q", "completion": "c"}], {"data/seen": 2}

    stage_dir = tmp_path / "rejection_sft"
    stage_dir.mkdir()
    first = cached_examples(stage_dir, build)
    again = cached_examples(stage_dir, build)
    assert first == again == ([{"question": "q", "completion": "c"}], {"data/seen": 2, "data/examples": 1})
    assert built == [1] and "rejection_sft: reusing 1 examples from" in capsys.readouterr().out


def test_a_benchmark_named_for_training_is_read_from_its_train_split(tmp_path):
    """`--config.data.train=gsm8k` trains on GSM8K's train split (it read the test split, which
    `data.eval=gsm8k` evaluates on); a benchmark with only a test split cannot be trained on."""
    from r1jax.pipeline import RunContext

    for split in ("train", "test"):
        row = {"question": f"a {split} question", "answer": "#### 4"}
        (tmp_path / f"gsm8k_{split}.jsonl").write_text(json.dumps(row) + "\n")
    config = tiny_r1_config(**{"data.train": "gsm8k", "data.eval": "gsm8k", "data.data_dir": str(tmp_path),
                               "data.train_size": 0, "data.eval_size": 0})
    ctx = RunContext(config, tmp_path / "run")
    assert [r["question"] for r in ctx.records("train")] == ["a train question"]
    assert [r["question"] for r in ctx.records("eval")] == ["a test question"]
    config.data.train = "math500"
    with pytest.raises(ValueError, match="math500 has only a test split, not split='train'"):
        ctx.records("train")
