"""HF checkpoints in and out: a local folder of `config.json` + `*.safetensors`, without torch.

Loading reads each tensor once per host (safetensors, memory-mapped), converts it to our
einsum-friendly layout and builds the global array with `jax.make_array_from_callback`, so each
device receives only its shard. Saving writes `config.json`, safetensors shards and (when there
is more than one shard) `model.safetensors.index.json`, which `transformers` loads as is; the new
files are written aside and moved in only once all are complete, so an export that fails while writing
leaves an earlier one as it was (the moves themselves are renames, one file at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from r1jax.model.build import abstract_model, state_shardings
from r1jax.model.config import ModelConfig, from_hf_config, to_hf_config
from r1jax.model.transformer import Transformer
from r1jax.sharding import DEFAULT_RULES, ShardingRules

INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
# Fields of `to_hf_config` that extra_config may change: a length limit, and the dtype (which `save_hf` sets from
# the weights it writes). The others describe the weights, so a different value would misdescribe them.
_UNCHECKED_FIELDS = frozenset({"max_position_embeddings", "torch_dtype"})
_STAGING_PREFIX = ".save_hf-"  # the folder inside the export where `save_hf` writes before moving files in
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the names `save_hf` (and transformers) write

Convert = Callable[[np.ndarray], np.ndarray]


def _tensor_map(cfg: ModelConfig) -> Iterator[tuple[tuple, str, tuple[int, ...], Convert, Convert]]:
    """(our state path, HF name, HF shape, HF → ours, ours → HF) for every parameter."""
    d, h, g, k, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    same: Convert = lambda w: w
    transpose: Convert = lambda w: w.T
    yield ("embed",), "model.embed_tokens.weight", (v, d), same, same
    for i in range(cfg.num_layers):
        p, hp = ("layers", i), f"model.layers.{i}."
        yield (*p, "attn_norm", "scale"), hp + "input_layernorm.weight", (d,), same, same
        yield (*p, "mlp_norm", "scale"), hp + "post_attention_layernorm.weight", (d,), same, same
        for name, n in (("q", h), ("k", g), ("v", g)):
            # HF [n·k, d] ↔ ours [d, n, k]
            yield ((*p, "attn", name), f"{hp}self_attn.{name}_proj.weight", (n * k, d),
                   lambda w, n=n: w.T.reshape(d, n, k), lambda w, n=n: w.reshape(d, n * k).T)
            if cfg.qkv_bias:
                yield ((*p, "attn", f"{name}_bias"), f"{hp}self_attn.{name}_proj.bias", (n * k,),
                       lambda w, n=n: w.reshape(n, k), lambda w: w.reshape(-1))
        # HF [d, h·k] ↔ ours [h, k, d]
        yield ((*p, "attn", "o"), hp + "self_attn.o_proj.weight", (d, h * k),
               lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T)
        if cfg.out_bias:
            yield (*p, "attn", "o_bias"), hp + "self_attn.o_proj.bias", (d,), same, same
        yield (*p, "mlp", "gate"), hp + "mlp.gate_proj.weight", (f, d), transpose, transpose
        yield (*p, "mlp", "up"), hp + "mlp.up_proj.weight", (f, d), transpose, transpose
        yield (*p, "mlp", "down"), hp + "mlp.down_proj.weight", (d, f), transpose, transpose
    yield ("final_norm", "scale"), "model.norm.weight", (d,), same, same
    if not cfg.tie_word_embeddings:
        yield ("lm_head",), "lm_head.weight", (v, d), transpose, transpose


def _get(state: nnx.State, path: tuple) -> nnx.Variable:
    node = state
    for key in path:
        node = node[key]
    return node


def _tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name → the safetensors file that holds it."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files (and no {INDEX_FILE})")
    names = {}
    for f in files:
        with _open_safetensors(f) as st:
            names.update({n: f for n in st.keys()})
    return names


def _open_safetensors(file: Path):
    """`safe_open(file)`; a truncated or corrupt file is a ValueError that names it."""
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError, not an OSError
        raise ValueError(f"{file}: not a readable safetensors file ({e}); download or export it again") from e


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    config = Path(path) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{config} does not exist: an HF checkpoint folder needs config.json")
    try:
        return from_hf_config(json.loads(config.read_text()), **overrides)
    except (KeyError, TypeError, json.JSONDecodeError) as e:  # TypeError: a field of the wrong type, or null
        raise ValueError(f"{config}: cannot read model config ({type(e).__name__}: {e})") from e


def load_hf(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    **config_overrides,
) -> Transformer:
    """A `Transformer` with the weights of a local HF folder, placed as the sharding table says.

    `config_overrides` (e.g. `dtype="bfloat16"`, `remat="full"`) change run-time fields only.
    """
    folder = Path(path)
    cfg = read_config(folder, **config_overrides)
    files = _tensor_files(folder)
    graphdef, state = abstract_model(cfg)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    handles: dict[Path, object] = {}
    try:
        for path_, name, hf_shape, to_ours, _ in _tensor_map(cfg):
            var = _get(state, path_)
            if name not in files:
                raise KeyError(f"{folder}: tensor {name!r} is missing from the checkpoint")
            if files[name] not in handles:
                handles[files[name]] = _open_safetensors(files[name]).__enter__()
            raw = handles[files[name]].get_tensor(name)
            if tuple(raw.shape) != hf_shape:
                raise ValueError(
                    f"{files[name]}: tensor {name!r} has shape {tuple(raw.shape)}, but "
                    f"{folder / 'config.json'} implies shape {hf_shape}"
                )
            value = to_ours(raw).astype(var.dtype)
            if shardings is None:
                array = jnp.asarray(value)
            else:
                sharding = _get(shardings, path_)
                array = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
            var.set_value(array)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return nnx.merge(graphdef, state)


def _host_array(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _owner_alive(staging_name: str) -> bool:
    """Whether the export that made staging folder `.save_hf-PID@HOST-…` may still be running: its process
    lives on this host, or the folder is another host's (left alone: this one cannot tell)."""
    pid, _, host = staging_name[len(_STAGING_PREFIX):].rsplit("-", 1)[0].partition("@")
    if not pid.isdigit():
        return False  # not a name save_hf gives
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
    extra_config: dict | None = None,
    tokenizer=None,
) -> Path:
    """Write `model` as an HF folder (config.json + safetensors); only process 0 writes.

    `tokenizer` (anything with `bos_id`, `eos_id`, `pad_id`): its special ids go into config.json and a
    generation_config.json, so that `generate` in transformers stops at its EOS. `extra_config` is added to
    config.json; its `bos_token_id` / `eos_token_id` / `pad_token_id` win over the tokenizer's, in both files
    (Llama 3 Instruct stops at a list of EOS ids where its tokenizer names one). A field that describes the
    weights (`tie_word_embeddings`, sizes, RoPE…) must agree with the model: a ValueError names it.

    The files this function writes (weights, index, config.json, generation_config.json) are written aside
    and moved in only once all are complete: an export that fails leaves the earlier one as it was. Those of
    an earlier export that this one does not rewrite (a single weight file after shards or the reverse, a
    generation_config.json when no tokenizer is given) are then removed, as they would shadow the new ones;
    other files in the folder (a tokenizer's) are left alone.
    """
    cfg: ModelConfig = model.cfg
    folder = Path(path)
    state = nnx.state(model)
    dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    extra = dict(extra_config or {})
    own = to_hf_config(cfg)
    for key, value in extra.items():
        if key in own and key not in _UNCHECKED_FIELDS and value != own[key]:
            raise ValueError(
                f"extra_config[{key!r}]={value!r}, but the model's weights have {key}={own[key]!r}: config.json "
                "would describe other weights than those written; leave it out or change the model")
    special = {} if tokenizer is None else {key: extra.get(key, value) for key, value in (
        ("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id), ("pad_token_id", tokenizer.pad_id))}
    hf = to_hf_config(cfg, **{**special, **extra})
    hf["torch_dtype"] = str(dtype)
    try:  # fields of its own (a sliding window, layer_types) must still read back as this model
        written = from_hf_config(hf, max_position_embeddings=own["max_position_embeddings"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"extra_config makes config.json describe another model than the weights: {e}") from e
    weights = from_hf_config(own)
    differ = {f.name: getattr(written, f.name) for f in dataclasses.fields(written)
              if getattr(written, f.name) != getattr(weights, f.name)}
    if differ:
        raise ValueError(f"extra_config makes config.json describe another model than the weights: {differ}")
    # On every process and before the weights are gathered: a value JSON cannot write fails here, not halfway.
    config_text = json.dumps(hf, indent=2)
    tensors = {name: np.ascontiguousarray(to_hf(_host_array(_get(state, p)[...])).astype(dtype))
               for p, name, _, _, to_hf in _tensor_map(cfg)}
    if jax.process_index() != 0:
        return folder
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    texts: dict[str, str] = {}
    if len(shards) == 1:
        weight_files = {"model.safetensors": shards[0]}
    else:
        weight_files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
        weight_map = {name: fname for fname, shard in weight_files.items() for name in shard}
        total = sum(t.nbytes for t in tensors.values())
        texts[INDEX_FILE] = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    texts["config.json"] = config_text
    if special:
        texts[GENERATION_FILE] = json.dumps(special, indent=2)
    folder.mkdir(parents=True, exist_ok=True)
    ours = {f for f in folder.glob("model*.safetensors") if _WEIGHT_FILE.fullmatch(f.name)}
    ours |= {folder / INDEX_FILE, folder / GENERATION_FILE}
    for left in folder.glob(f"{_STAGING_PREFIX}*"):  # an export killed before it could clean up
        if not _owner_alive(left.name):
            shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}-",
                                    dir=folder))  # same filesystem: os.replace renames
    try:
        for fname, shard in weight_files.items():
            save_file(shard, staging / fname, metadata={"format": "pt"})
        for fname, text in texts.items():
            (staging / fname).write_text(text)
        for fname in (*weight_files, *texts):  # weights, index, then config.json
            os.replace(staging / fname, folder / fname)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for f in ours - {folder / fname for fname in (*weight_files, *texts)}:
        f.unlink(missing_ok=True)
    return folder
