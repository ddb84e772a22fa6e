"""`python -m r1jax.train --config=NAME [--config.rl.beta=0.0 …] [--workdir DIR]`.

NAME is a file of the `configs` package (`configs/NAME.py` with `get_config()`), found whether
r1jax is installed or used from a checkout, or a path to such a file. Overrides use
ml_collections' `--config.a.b=value` syntax; an unknown field fails before any work, naming it.

Several hosts (a TPU pod slice): start the same command on every host with `--distributed`, which
calls `jax.distributed.initialize()` before anything else touches JAX (on TPU, GKE or SLURM it finds
the coordinator itself; elsewhere give `--coordinator_address`, `--num_processes` and
`--process_id`, which imply `--distributed`). The workdir must then be one folder that every host
sees (a shared file system): process 0 writes the tokenizer, manifests, metrics and reports, and
every process reads them back and writes its shards of the checkpoints.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from r1jax.hugepages import reexec_with_huge_pages

FLAGS = flags.FLAGS


def resolve_config_path(name: str) -> str:
    """`configs/NAME.py` of the installed or checked-out package, or NAME itself if it is a file."""
    path, _, override = name.partition(":")
    if os.path.isfile(path):  # (a folder of that name, such as `--workdir r1zero`, is not a config)
        return name
    spec = importlib.util.find_spec("configs")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots.append(Path(__file__).resolve().parents[1] / "configs")
    for root in roots:
        candidate = root / f"{path}.py"
        if candidate.exists():
            return str(candidate) + (f":{override}" if override else "")
    known = sorted({p.stem for root in roots if root.is_dir() for p in root.glob("*.py") if p.stem != "__init__"})
    raise SystemExit(f"--config={name}: no such config; known: {known}")


def _rewrite_config_arg(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config=") and i > 0:
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        out.append(arg)
    return out


def default_workdir(config: ConfigDict) -> str:
    return os.path.join("runs", config.get("name", "run"))


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """`jax.distributed.initialize` with what was given (None: JAX's cluster auto-detection); CPU
    processes exchange their collectives over gloo."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    print(f"[r1jax] process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
          f"{jax.device_count()} devices", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
        logging.set_verbosity(logging.WARNING)
    from r1jax.pipeline import ConfigError, run_pipeline
    from r1jax.stages import STAGES, validate_config
    from r1jax.stages_distill import DISTILL_STAGES
    from r1jax.stages_r1 import R1_STAGES

    if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    print(f"[r1jax] config {config.get('name')}: workdir {workdir}", flush=True)
    try:
        manifests = run_pipeline(config, workdir, {**STAGES, **R1_STAGES, **DISTILL_STAGES},
                                 validate=validate_config)
    except ConfigError as e:
        raise SystemExit(f"[r1jax] bad config: {e}") from None
    for name, m in manifests.items():
        print(f"[r1jax] stage {name}: {m.status}, parameters {m.checkpoint}", flush=True)


def _unknown_field(argv: list[str]) -> str | None:
    """The first `--config.a.b` override that names no field of the config, described; None if all exist."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_r1jax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*([arg] if arg else []))
    for a in argv:
        if not a.startswith("--config."):
            continue
        name = a[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in name.split("."):
            if not isinstance(node, ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                close = difflib.get_close_matches(part, known, n=1)
                where = "config." + ".".join(walked) if walked else "the config"
                hint = f" (did you mean --config.{'.'.join([*walked, close[0]])}?)" if close else ""
                return f"--config.{name}: {where} has no field {part!r}{hint}; its fields: {known}"
            node, walked = node[part], [*walked, part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError):  # ml_collections' error for an override of a missing field
        message = _unknown_field(argv)
        if message is None:
            raise
        raise SystemExit(f"[r1jax] bad config: {message}") from None


def run() -> None:
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py (or NAME) with get_config()", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and reports go (default runs/NAME)")
    flags.DEFINE_bool("distributed", False, "several hosts: call jax.distributed.initialize() first")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed)")
    flags.DEFINE_integer("num_processes", None, "how many processes take part (implies --distributed)")
    flags.DEFINE_integer("process_id", None, "this process's index, 0 … num_processes - 1 (implies --distributed)")
    flags.mark_flag_as_required("config")
    app.run(main, argv=_rewrite_config_arg(sys.argv), flags_parser=_parse_flags)


if __name__ == "__main__":
    reexec_with_huge_pages()  # with R1JAX_HUGE_PAGES=1 (r1jax/hugepages.py)
    run()
