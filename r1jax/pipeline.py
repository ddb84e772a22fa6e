"""Named stages run in order, each starting from the previous stage's final parameters.

    workdir/
      tokenizer/              sentencepiece model (embedded default only), cached
      <stage>/manifest.json   status, config, metrics, init checkpoint + hash, output checkpoint + hash
      <stage>/checkpoints/    Orbax steps for exact in-stage resume
      <stage>/final/          the stage's final parameters (Orbax): the next stage's initial state
      <stage>/metrics.jsonl   (+ TensorBoard events)

A stage whose manifest says "done" is skipped on a rerun; a "running" one resumes from its last
checkpoint. A stage builds on another through `<stage>/final` in this workdir (never the absolute path a
manifest recorded, so a copied or moved workdir uses its own files), checked against the parameter hash
that stage recorded (`RunContext.stage_model`); the other stage may have finished in an earlier invocation
(`--config.stages=rejection_sft,rl_all` after one that ran the first stages). Such an invocation's first
stage must name what it builds on: its default init, "previous" (the stage before it in config.stages),
names none, and is refused where the workdir holds finished stages rather than read as the initial model.
The run's resources (mesh, tokenizer, datasets, the initial model) are built once by `RunContext` and
shared by every stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from r1jax.data import benchmarks, synthetic
from r1jax.model import ModelConfig, get_preset, init_model, load_hf
from r1jax.model.build import sharded_abstract_state
from r1jax.sharding import make_mesh, process_zero_first

MANIFEST = "manifest.json"


class ConfigError(ValueError):
    """A config value that cannot work; raised before any expensive work, naming the field."""


# ------------------------------------------------------------------------------------ manifests


@dataclasses.dataclass
class StageManifest:
    name: str
    status: str = "running"  # running | done
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_source: str | None = None  # "previous", "initial", "base" or a stage name (config.<stage>.init)
    init_checkpoint: str | None = None
    init_param_hash: str | None = None
    checkpoint: str | None = None
    param_hash: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: float = 0.0
    finished: float | None = None

    @classmethod
    def read(cls, stage_dir: Path) -> StageManifest | None:
        path = stage_dir / MANIFEST
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: not a stage manifest ({e}); move it aside to rerun the stage") from e

    def write(self, stage_dir: Path) -> None:
        if jax.process_index() != 0:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=_json_value))
        tmp.replace(stage_dir / MANIFEST)  # atomic: a crash never leaves half a manifest


def stage_names(config: ConfigDict) -> list[str]:
    """`config.stages` ("pretrain, rl") as the list of stage names it runs, in order."""
    return [s.strip() for s in config.stages.split(",") if s.strip()]


def finished_stage(workdir: Path, name: str) -> StageManifest | None:
    """Stage `name`'s manifest in `workdir` if the stage finished there (by this invocation or an earlier one)."""
    manifest = StageManifest.read(workdir / name)
    return manifest if manifest is not None and manifest.status == "done" else None


def finished_stages(workdir: Path) -> dict[str, StageManifest]:
    """{name: manifest} of every stage finished in `workdir`, by this invocation or an earlier one, in the
    order they finished (the order the pipeline ran them)."""
    found = [m for path in workdir.glob(f"*/{MANIFEST}") if (m := finished_stage(workdir, path.parent.name))]
    return {m.name: m for m in sorted(found, key=lambda m: (m.finished or 0.0, m.name))}


def previous_names_none(config: ConfigDict, name: str, field: str, finished: list[str], workdir: Path) -> str:
    """Why `<name>.<field>="previous"` (the stage before `name` in config.stages) cannot stand when `name` is
    the first of config.stages and `workdir` holds `finished`, stages an earlier invocation finished (taken as
    "none", it would quietly ignore them), and what to write instead."""
    last, rest = finished[-1], ",".join(stage_names(config))
    section = config.get(name)
    settable = isinstance(section, ConfigDict) and field in section
    initial = ", or 'initial' for the run's initial model" if field == "init" else ""
    listed = f"--config.stages={last},{rest} (a finished stage is skipped)"
    choose = (f"say which: --config.{name}.{field}={last} (or another of them{initial}), or list it first: {listed}"
              if settable else f"list the one to build on first (config.{name} has no {field} field): {listed}")
    return (f"{name}.{field}='previous' (the stage before it in config.stages={config.stages!r}) names none: "
            f"{name} is the first, and {workdir} holds stages an earlier invocation finished, {finished}; {choose}")


def _json_value(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out, wrapping arithmetic)."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 scalars: sums over x's bit patterns, each element weighted by odd multipliers drawn
    from its index. Sums modulo 2³² are exact and order-free, so the result does not depend on how x
    is sharded and no process needs x whole; a change of any one element changes both sums."""
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
    bits = bits.astype(jnp.uint32)  # (8-byte elements: two words each, in a trailing dimension)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for dim, size in enumerate(bits.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
    weights = [_fmix32(index ^ jnp.uint32(seed)) | jnp.uint32(1) for seed in (0x9E3779B9, 0x7F4A7C15)]
    return tuple(jnp.sum(bits * w, dtype=jnp.uint32) for w in weights)


_leaf_checksums = jax.jit(_checksums)  # per leaf: one compilation per distinct shape, shared by the layers


def param_hash(params: nnx.State) -> str:
    """sha256 over every parameter's path, dtype, shape and content checksums (`_checksums`, computed
    where the parameter lives: the same hash whatever the mesh). Several processes: all must call it."""
    leaves = sorted(jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0]))
    if any(leaf.size >= 2**32 for _, leaf in leaves):
        raise ValueError("param_hash indexes elements with uint32: a parameter has ≥ 2³² elements")
    sums = [_leaf_checksums(leaf) for _, leaf in leaves]
    h = hashlib.sha256()
    for (path, leaf), pair in zip(leaves, sums, strict=True):
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        for s in pair:  # scalars, so replicated: every process holds them
            h.update(np.asarray(s.addressable_data(0)).tobytes())
    return h.hexdigest()


def save_params(params: nnx.State, path: Path) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.absolute(), params, force=True)


def restore_params(path: Path, abstract: nnx.State) -> nnx.State:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.absolute(), abstract)


def _key_path_name(path) -> str:
    """"layers.0.attn.k.value" for a parameter's key path in an nnx State and in Orbax's metadata alike."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def as_saved(path: Path, abstract: nnx.State) -> nnx.State:
    """`abstract` with each parameter at the dtype the checkpoint at `path` holds it in (Orbax's metadata): a
    restore to it reads the parameters as they were saved, where a restore to `abstract` casts them."""
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(path.absolute()).item_metadata
    saved = {_key_path_name(p): m.dtype for p, m in jax.tree_util.tree_leaves_with_path(metadata)}

    def at_saved_dtype(p, a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        if _key_path_name(p) not in saved:  # else a cast restore would fail the hash check as "changed files"
            raise ConfigError(f"{path}: holds no parameter {_key_path_name(p)} (it has {sorted(saved)[:8]}…): "
                              "not a checkpoint of this model")
        return jax.ShapeDtypeStruct(a.shape, saved[_key_path_name(p)], sharding=a.sharding)

    return jax.tree_util.tree_map_with_path(at_saved_dtype, abstract)


# ------------------------------------------------------------------------------------ run context


class RunContext:
    """Mesh, tokenizer, datasets and the initial model of one run, built lazily and once."""

    def __init__(self, config: ConfigDict, workdir: Path):
        self.config = config
        self.workdir = workdir
        self.mesh = make_mesh(**config.mesh)
        self._tokenizer = None

    @property
    def task_spec(self) -> synthetic.TaskSpec:
        d = self.config.data
        task = d.train.split(":")[1] if d.train.startswith("synthetic:") else "arithmetic"
        return synthetic.TaskSpec(task=task, min_steps=d.min_steps, max_steps=d.max_steps,
                                  max_operand=d.max_operand, max_value=d.max_value)

    def corpus_pairs(self) -> list[tuple[str, str]]:
        """The pretraining corpus as (prompt, completion) texts."""
        p = self.config.pretrain
        noise = p.get("noise_kinds", "")
        noise_kinds = tuple(k.strip() for k in noise.split(",") if k.strip()) or synthetic.NOISE_KINDS
        return synthetic.corpus_pairs(
            p.corpus_size, seed=self.config.seed, correct_fraction=p.correct_fraction, noise_kinds=noise_kinds,
            spec=self.task_spec, template=self.config.data.template,
            mix_fraction=p.get("mix_fraction", 0.0), mix_language=p.get("mix_language", "zh"))

    def corpus(self) -> list[str]:
        return [f"{prompt} {completion}" for prompt, completion in self.corpus_pairs()]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from r1jax.data.tokenizer import load_hf_tokenizer, train_sentencepiece

            c = self.config
            if c.tokenizer.path or c.model.hf_path:
                self._tokenizer = load_hf_tokenizer(c.tokenizer.path or c.model.hf_path)
            else:
                options = c.tokenizer.get("options")
                train = lambda: train_sentencepiece(self.corpus(), c.tokenizer.vocab_size, self.workdir / "tokenizer",
                                                    options=options.to_dict() if options else None)
                self._tokenizer = process_zero_first(train, "tokenizer")  # the others load what it saved
        return self._tokenizer

    def records(self, split: str) -> list[dict[str, Any]]:
        d = self.config.data
        spec = d.train if split == "train" else d.eval
        size = d.train_size if split == "train" else d.eval_size
        if spec.startswith("synthetic"):
            return synthetic.generate("train" if split == "train" else "test", size, seed=self.config.seed,
                                      spec=self.task_spec)
        return benchmarks.load_benchmark(spec, split="train" if split == "train" else None, limit=size or None,
                                         data_dir=d.data_dir or None)

    def runtime_model_fields(self) -> dict[str, Any]:
        """The model fields a run chooses (precision, remat, attention blocks), whatever the weights' source."""
        m = self.config.model
        return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, attention_block=m.attention_block)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model the config describes; `vocab_size` stands in for the tokenizer's when model.vocab_size=0."""
        m = self.config.model
        runtime = self.runtime_model_fields()
        if m.preset:
            return get_preset(m.preset, **runtime)
        return ModelConfig(
            vocab_size=m.vocab_size or vocab_size or self.tokenizer.vocab_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
            tie_word_embeddings=m.tie_word_embeddings, **runtime)

    def initial_model(self) -> nnx.Module:
        m = self.config.model
        if m.hf_path:
            return load_hf(m.hf_path, mesh=self.mesh, **self.runtime_model_fields())
        return init_model(self.model_config(), seed=self.config.seed, mesh=self.mesh)

    def model_from(self, checkpoint: Path) -> nnx.Module:
        """A model with the parameters a previous stage saved, placed by the sharding table."""
        graphdef, abstract = sharded_abstract_state(self.initial_model_config(), self.mesh)
        return nnx.merge(graphdef, restore_params(checkpoint, abstract))

    def final_dir(self, stage: str) -> Path:
        """Where stage `stage` saves its final parameters in this workdir."""
        return (self.workdir / stage / "final").absolute()

    def stage_model(self, manifest: StageManifest) -> tuple[nnx.Module, str]:
        """(model, parameter hash) of a finished stage's final parameters in this workdir, checked against the
        hash the stage recorded, whatever dtype this run holds them in. Read from `final_dir`, not from the
        absolute path its manifest recorded, which a copied or moved workdir does not hold. Several
        processes: all must call it."""
        final = self.final_dir(manifest.name)
        if not final.is_dir():
            raise ConfigError(f"{final}: stage {manifest.name} finished ({final.parent / MANIFEST}) but its final "
                              "parameters are gone; rerun that stage (move its folder aside) or restore them")
        # The recorded hash is of the parameters as the stage saved them: read them so, check them, then cast them
        # to this run's param_dtype (a distillation teacher read at bf16 from an fp32 run). Each saved parameter
        # is freed once cast, so the load peaks at the whole saved copy (fp32: twice a bf16 model's memory)
        # plus one cast parameter.
        graphdef, abstract = sharded_abstract_state(self.initial_model_config(), self.mesh)
        params = restore_params(final, as_saved(final, abstract))
        digest = param_hash(params)
        if manifest.param_hash and digest != manifest.param_hash:
            raise ConfigError(f"{final}: its parameters (hash {digest}) are not those stage {manifest.name} finished "
                              f"with ({manifest.param_hash}); rerun that stage (move its folder aside) or restore them")

        def cast(x: jax.Array, a: jax.ShapeDtypeStruct) -> jax.Array:
            if x.dtype == a.dtype:
                return x
            y = x.astype(a.dtype)
            x.delete()
            return y

        return nnx.merge(graphdef, jax.tree.map(cast, params, abstract)), digest

    def initial_model_config(self) -> ModelConfig:
        if self.config.model.hf_path:
            from r1jax.model.hf import read_config

            return read_config(self.config.model.hf_path, **self.runtime_model_fields())
        return self.model_config()


# ------------------------------------------------------------------------------------ running stages

StageFn = Callable[[RunContext, nnx.Module, Path], tuple[nnx.Module, dict[str, Any]]]


def run_pipeline(config: ConfigDict, workdir: str | Path, stages: dict[str, StageFn],
                 validate: Callable[[ConfigDict, list[str], Path], None] | None = None) -> dict[str, StageManifest]:
    """Run `config.stages` in order; returns each stage's manifest.

    `validate(config, stage_names, workdir)` runs first, so a bad value fails before the tokenizer, the
    data or the model is built (`r1jax.stages.validate_config`). A stage may build on stages an earlier
    invocation finished in `workdir` (`init`, `sample_from`, `budget_from`); the first stage must then say
    which (`_check_first_stage_start`).
    """
    workdir = Path(workdir)
    names = stage_names(config)
    unknown = [n for n in names if n not in stages]
    if not names or unknown:
        raise ConfigError(f"config.stages={config.stages!r}: unknown stage(s) {unknown}; known: {sorted(stages)}")
    if validate is not None:
        validate(config, names, workdir)
    # Any stage started here, by this invocation's list or an earlier one's, fixes the run's settings.
    if (workdir / "config.json").exists() and any(workdir.glob(f"*/{MANIFEST}")):
        _check_same_run(json.loads((workdir / "config.json").read_text()), json.loads(config.to_json_best_effort()),
                        workdir)
    _check_first_stage_start(config, names[0], workdir)
    ctx = RunContext(config, workdir)
    if jax.process_index() == 0:  # what `python -m r1jax.evaluate --workdir` rebuilds the run from
        workdir.mkdir(parents=True, exist_ok=True)
        # Replaced whole: the other processes may be reading it in `_check_same_run` meanwhile.
        tmp = workdir / f".config.json.{os.getpid()}.tmp"
        tmp.write_text(config.to_json_best_effort(indent=2))
        tmp.replace(workdir / "config.json")
    previous: StageManifest | None = None
    manifests = {}
    for name in names:
        stage_dir = workdir / name
        manifest = StageManifest.read(stage_dir)
        if manifest is not None and manifest.status == "done":
            print(f"[r1jax] stage {name}: done already ({stage_dir / MANIFEST}), skipping", flush=True)
            manifests[name] = previous = manifest
            continue
        source, init = _init_source(config, name, manifests, previous, workdir)
        if init is None:
            model = ctx.initial_model()
            init_hash = param_hash(nnx.state(model))
        else:
            model, init_hash = ctx.stage_model(init)
        if manifest is None:
            manifest = StageManifest(name=name, config=_stage_config(config, name), started=time.time())
        manifest.init_source = source
        manifest.init_checkpoint = str(ctx.final_dir(init.name)) if init else (config.model.hf_path or "random-init")
        manifest.init_param_hash = init_hash
        manifest.write(stage_dir)
        print(f"[r1jax] stage {name}: starting from {manifest.init_checkpoint}", flush=True)
        model, metrics = stages[name](ctx, model, stage_dir)
        final = stage_dir / "final"
        params = nnx.state(model)
        save_params(params, final)
        manifest.checkpoint, manifest.param_hash = str(final.absolute()), param_hash(params)
        manifest.metrics, manifest.status, manifest.finished = metrics, "done", time.time()
        manifest.write(stage_dir)
        manifests[name] = previous = manifest
    return manifests


# What every stage of a run builds on: changed in a workdir whose stages have started, the run would mix
# two tokenizers, corpora or architectures. Free: model fields that only choose how to compute, and the
# held-out set (`RunContext.records("eval")`, read by evaluations alone), which changes what is measured,
# not what is trained. (data.data_dir is not free: a benchmark named in data.train is read from it.)
_RUN_SECTIONS = ("seed", "model", "tokenizer", "data", "pretrain")
_FREE_FIELDS = ("model.remat", "model.attention_block", "model.dtype", "data.eval", "data.eval_size")


def _check_same_run(before: dict[str, Any], now: dict[str, Any], workdir: Path) -> None:
    """ConfigError naming the fields of `_RUN_SECTIONS` that differ from the workdir's recorded config."""
    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}.{key}").items()}

    old = {k: v for s in _RUN_SECTIONS for k, v in flat(before.get(s), s).items()}
    new = {k: v for s in _RUN_SECTIONS for k, v in flat(now.get(s), s).items()}
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new})
               if old.get(k) != new.get(k) and k not in _FREE_FIELDS]
    if changed:
        raise ConfigError(f"{workdir} holds a run started with other settings ({'; '.join(changed[:8])}"
                          f"{'; …' if len(changed) > 8 else ''}): its stages would mix both. Use another --workdir, "
                          f"or the settings in {workdir / 'config.json'}")


def _check_first_stage_start(config: ConfigDict, name: str, workdir: Path) -> None:
    """ConfigError if stage `name`, the first of config.stages, would start or resume with init="previous"
    (so from the initial model) in a workdir where other stages finished: a later invocation
    (`--config.stages=rl_all` after the first four stages) must say which it builds on. A fresh workdir, or a
    first stage done already (a rerun of the same list), passes."""
    finished = finished_stages(workdir)
    if _init_setting(config, name) == "previous" and name not in finished and finished:
        raise ConfigError("config." + previous_names_none(config, name, "init", list(finished), workdir))


def _init_source(config: ConfigDict, name: str, done: dict[str, StageManifest], previous: StageManifest | None,
                 workdir: Path) -> tuple[str, StageManifest | None]:
    """Where stage `name` starts (`config.<name>.init`): "previous" (default: the stage before it in
    config.stages), "initial" (the run's initial model), "base" (the `pretrain` stage's output if the run
    has one, else the initial model, as R1's rejection-sampling SFT retrains the base) or an earlier
    stage's name. `done`: this invocation's finished stages; a stage an earlier invocation finished in
    `workdir` counts too. None: initial."""
    source = _init_setting(config, name)
    if source in ("previous", "initial"):
        return source, previous if source == "previous" else None
    stage = "pretrain" if source == "base" else source
    manifest = done.get(stage) or finished_stage(workdir, stage)
    if manifest is None and source != "base":
        raise ValueError(f"config.{name}.init={source!r}: no earlier stage {stage!r} in "
                         f"config.stages={config.stages!r} nor finished in {workdir}; accepted: 'previous', "
                         "'initial', 'base' or an earlier stage's name")
    return source, manifest


def _init_setting(config: ConfigDict, name: str) -> str:
    """`config.<name>.init`; "previous" where the stage has no section or its section no such field."""
    section = config.get(name)
    return section.get("init", "previous") if isinstance(section, ConfigDict) else "previous"


def _stage_config(config: ConfigDict, name: str) -> dict[str, Any]:
    section = config.get(name)
    return section.to_dict() if isinstance(section, ConfigDict) else {}
