"""The Llama 3 / Qwen2 / Qwen2.5 transformer (Flax NNX), its configs, and HF checkpoints."""

from r1jax.model.build import abstract_model, init_model, logical_axes, shard_model, state_shardings
from r1jax.model.config import PRESETS, Llama3RopeScaling, ModelConfig, from_hf_config, get_preset, to_hf_config
from r1jax.model.hf import load_hf, save_hf
from r1jax.model.transformer import KVCache, Transformer, init_cache

__all__ = [
    "PRESETS",
    "KVCache",
    "Llama3RopeScaling",
    "ModelConfig",
    "Transformer",
    "abstract_model",
    "from_hf_config",
    "get_preset",
    "init_cache",
    "init_model",
    "load_hf",
    "logical_axes",
    "save_hf",
    "shard_model",
    "state_shardings",
    "to_hf_config",
]
