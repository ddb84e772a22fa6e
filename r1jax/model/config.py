"""Model configuration for the Llama 3 / Qwen2 / Qwen2.5 family, presets, and HF config mapping.

One dataclass covers the family: the members differ only in q/k/v bias (Qwen2), tied
embeddings, RoPE theta and Llama-3 RoPE scaling. `from_hf_config` / `to_hf_config` convert
to and from a `config.json` dict (both the `rope_scaling`/`rope_theta` spelling of older
checkpoints and the `rope_parameters` spelling of transformers ≥ 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots")
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (the `llama3` rope type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: Llama3RopeScaling | None = None
    qkv_bias: bool = False
    out_bias: bool = False  # o_proj bias: Llama's attention_bias=true sets both, Qwen2 has none
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; log-softmax is always fp32
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs only)
    # More queries than this in one call (training, scoring, long prefills): blockwise attention with
    # [block, block] score tiles instead of all [t, s] scores at once (model/attention.py); 0: never.
    attention_block: int = 256
    architecture: str = "llama"  # "llama" | "qwen2" (q/k/v bias required): the HF class on export

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                    "set model.head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.attention_block < 0:
            raise ValueError(f"model.attention_block={self.attention_block} must be ≥ 0 (0: one-shot attention)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; accepted: {REMAT_POLICIES}")
        if self.architecture not in HF_ARCHITECTURES.values():
            raise ValueError(f"model.architecture={self.architecture!r}; accepted: {sorted(HF_ARCHITECTURES.values())}")
        if self.architecture == "qwen2" and not self.qkv_bias:
            raise ValueError("model.architecture='qwen2' always has q/k/v bias: set model.qkv_bias=True")
        if self.architecture == "qwen2" and self.out_bias:
            raise ValueError("model.architecture='qwen2' has no o_proj bias: set model.out_bias=False")
        if self.architecture == "llama" and self.qkv_bias != self.out_bias:
            raise ValueError("model.architecture='llama' has q/k/v and o_proj biases together (attention_bias): "
                             f"got qkv_bias={self.qkv_bias}, out_bias={self.out_bias}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not a dtype") from e
        if isinstance(self.rope_scaling, dict):  # an asdict round trip, or HF's spelling with its type
            fields = {k: v for k, v in self.rope_scaling.items() if k not in ("rope_type", "type")}
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "llama3"))
            if kind != "llama3":
                raise ValueError(f"model.rope_scaling type {kind!r} is not supported (accepted: llama3, or None)")
            try:
                object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**fields))
            except TypeError as e:
                raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: {e}") from e

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        d, h, g, k, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * h * k * 2 + d * g * k * 2 + (h * k + 2 * g * k if self.qkv_bias else 0) + d * self.out_bias
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    def flops_per_token(self, context: int, *, head: bool = True) -> float:
        """Forward FLOPs per token: 2 × matmul params + attention over `context` keys; `head=False`
        leaves out the LM head (2 × vocab × hidden), for a token whose logits are not computed."""
        d, h, k = self.hidden_size, self.num_heads, self.head_dim
        matmul_params = self.num_params - self.vocab_size * d * (0 if self.tie_word_embeddings else 1)
        matmul_params -= (2 * self.num_layers + 1) * d  # norms do no matmul
        matmul_params -= 0 if head else self.vocab_size * d
        attention = 2 * 2 * self.num_layers * h * k * context  # q·k and p·v
        return 2.0 * matmul_params + attention


# ------------------------------------------------------------------------------------ presets

_QWEN25 = dict(qkv_bias=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6, architecture="qwen2")

PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-0.5b": ModelConfig(151936, 896, 24, 14, 2, 4864, tie_word_embeddings=True,
                                max_position_embeddings=32768, **_QWEN25),
    # As the base models' config.json: 0.5B allows 32,768 positions, 1.5B and 7B 131,072.
    "qwen2.5-1.5b": ModelConfig(151936, 1536, 28, 12, 2, 8960, tie_word_embeddings=True,
                                max_position_embeddings=131072, **_QWEN25),
    "qwen2.5-7b": ModelConfig(152064, 3584, 28, 28, 4, 18944, max_position_embeddings=131072, **_QWEN25),
    "llama-3.1-8b": ModelConfig(128256, 4096, 32, 32, 8, 14336, rope_theta=500_000.0, rms_norm_eps=1e-5,
                                rope_scaling=Llama3RopeScaling(), max_position_embeddings=131072,
                                architecture="llama"),
    # The peer-benchmark model of shared/bench/WORKLOAD.md (≈ 3.18M parameters).
    "bench-qwen2-3m": ModelConfig(128, 256, 4, 4, 2, 768, qkv_bias=True, tie_word_embeddings=True,
                                  max_position_embeddings=512, architecture="qwen2"),
    "tiny-qwen2": ModelConfig(128, 64, 2, 4, 2, 128, qkv_bias=True, tie_word_embeddings=True,
                              max_position_embeddings=256, architecture="qwen2"),
    "tiny-llama": ModelConfig(128, 64, 2, 4, 1, 128, rope_theta=500_000.0, max_position_embeddings=256,
                              rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 32), architecture="llama"),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# ------------------------------------------------------------------------------------ HF mapping


def from_hf_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a HF `config.json` dict; unsupported features raise, naming the field."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None and model_type in HF_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        raise ValueError(
            f"unsupported architecture: architectures={archs}, model_type={model_type!r}; "
            f"supported: {sorted(HF_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true is not supported")
    # Qwen2 slides the window over layers max_window_layers and up only: none when it counts them all
    if hf.get("use_sliding_window") and (hf.get("max_window_layers") or 0) < hf.get("num_hidden_layers", 0):
        raise ValueError(f"config.json use_sliding_window=true with max_window_layers={hf.get('max_window_layers')} "
                         f"< num_hidden_layers={hf.get('num_hidden_layers')} is not supported")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
        raise ValueError(f"config.json layer_types={hf['layer_types']}: only full_attention layers are supported")
    # As transformers reads it: an (older) rope_scaling replaces rope_parameters whole, not key by key; merged,
    # a rope_scaling {"type": "yarn"} under rope_parameters {"rope_type": "default"} read as plain RoPE.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = next((t for t in (rope.get("rope_theta"), hf.get("rope_theta")) if t is not None), 10_000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = Llama3RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        scaling = None
    else:
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (accepted: default, llama3)")
    qkv_bias = True if arch == "qwen2" else bool(hf.get("attention_bias", False))
    out_bias = arch == "llama" and qkv_bias
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        intermediate_size=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        architecture=arch,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(cfg: ModelConfig, **extra) -> dict[str, Any]:
    """A `config.json` dict that transformers loads as the matching architecture."""
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {"rope_theta": cfg.rope_theta, "rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    hf = {
        "architectures": [k for k, v in HF_ARCHITECTURES.items() if v == cfg.architecture],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both spellings, so that older and newer transformers read the same RoPE.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else {"rope_type": "llama3",
                                                               **dataclasses.asdict(cfg.rope_scaling)},
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.architecture == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    hf.update(extra)
    return hf
