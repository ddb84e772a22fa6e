"""Data: templates (R1-Zero, R1 cold start, chat), tokenizers, benchmark loaders, the synthetic task,
and the grain prompt pipeline.

The pipeline (which imports grain) loads on first use: `from r1jax.data import prompt_dataset`.
"""

from r1jax.data.benchmarks import load_benchmark, load_jsonl_benchmark
from r1jax.data.templates import (
    DEFAULT_SPECIAL_TOKEN,
    R1_ZERO_PROMPT,
    TEMPLATES,
    format_cold_start,
    format_prompt,
    format_response,
    parse_cold_start,
    parse_r1_zero,
)
from r1jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_hf_tokenizer,
    train_sentencepiece,
)

_LAZY = {"prompt_dataset", "collate", "shard_records", "tokenize_prompts"}


def __getattr__(name):
    if name in _LAZY:
        from r1jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'r1jax.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_SPECIAL_TOKEN",
    "R1_ZERO_PROMPT",
    "TEMPLATES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "format_cold_start",
    "format_prompt",
    "format_response",
    "load_benchmark",
    "load_hf_tokenizer",
    "load_jsonl_benchmark",
    "parse_cold_start",
    "parse_r1_zero",
    "train_sentencepiece",
    *sorted(_LAZY),
]
