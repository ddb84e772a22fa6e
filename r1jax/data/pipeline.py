"""The RL trainer's prompt stream: a grain pipeline that is sharded per host, seeded and checkpointable.

    records ─► this host's shard ─► template + tokenizer ─► shuffle(seed, per epoch) ─► repeat
            ─► batch ─► IterDataset   (iterator: get_state() / set_state())

Every step is index-based (`grain.MapDataset`), so the iterator state is a single position and a
restored iterator yields exactly the batches an uninterrupted one would have: the trainer saves
`iterator.get_state()` with its Orbax checkpoint. Prompts are tokenized once, up front, for this
host's shard only (prompt sets are small next to the sampling cost; it also lets
`max_prompt_length` drop over-long prompts before batching, so batches stay full).

Sharding is strided (`records[shard_index::shard_count]`) after dropping the last
`len(records) % shard_count` records, so every host sees the same number of prompts and runs the
same number of steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from r1jax.data.templates import format_prompt, get_template
from r1jax.data.tokenizer import Tokenizer

# Keys added to every element; the record's own fields ride along unchanged.
PROMPT_KEYS = ("prompt", "prompt_ids", "prompt_length")


def shard_records(
    records: Sequence[Any], shard_index: int, shard_count: int, *, even: bool = True
) -> list[Any]:
    """This host's strided share of `records` (equal-sized shares when `even`)."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    usable = len(records) - len(records) % shard_count if even else len(records)
    return list(records[:usable][shard_index::shard_count])


def tokenize_prompts(
    records: Sequence[dict[str, Any]],
    template: str,
    tokenizer: Tokenizer,
    *,
    add_bos: bool = True,
    max_prompt_length: int | None = None,
    instruction: str | None = None,
) -> list[dict[str, Any]]:
    """Records with `prompt` (text), `prompt_ids` (int32 array) and `prompt_length` added.

    Records whose prompt exceeds `max_prompt_length` tokens are dropped.
    """
    out = []
    for i, record in enumerate(records):
        if "question" not in record:
            raise ValueError(f"record {i} has no 'question' field; it has {sorted(record)}")
        prompt = format_prompt(template, record["question"], tokenizer=tokenizer, instruction=instruction)
        ids = np.asarray(tokenizer.encode(prompt, add_bos=add_bos), dtype=np.int32)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            continue
        out.append({**record, "prompt": prompt, "prompt_ids": ids, "prompt_length": len(ids)})
    return out


def collate(elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch as a dict of lists (ragged `prompt_ids`), with `prompt_length` as an int32 array.

    Keys missing from some records are filled with None.
    """
    keys = list(dict.fromkeys(k for e in elements for k in e))
    batch = {k: [e.get(k) for e in elements] for k in keys}
    batch["prompt_length"] = np.asarray(batch["prompt_length"], dtype=np.int32)
    return batch


def prompt_dataset(
    records: Sequence[dict[str, Any]],
    template: str,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    *,
    add_bos: bool = True,
    max_prompt_length: int | None = None,
    instruction: str | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Batches of prompts for one host, as a grain `IterDataset`.

    Args:
      records: common records (`r1jax.data.benchmarks`): "question" plus any fields the rewards
        need ("answer", "numbers", "target", …), which are passed through.
      template: a `TEMPLATES` name (the chat template needs an HF tokenizer).
      tokenizer: any `Tokenizer`.
      batch_size: prompts per batch on this host.
      seed: shuffle seed; each epoch is shuffled differently, deterministically.
      shard_index, shard_count: this host's shard (`jax.process_index()`, `jax.process_count()`).
      num_epochs: passes over the shard, or None to repeat forever.
      drop_remainder: drop a final short batch (finite epochs only), keeping shapes static.

    Returns:
      An `IterDataset`; `iter(ds)` has `get_state()` / `set_state(state)`. Each element is a dict:
      "prompt" (list[str]), "prompt_ids" (list of int32 arrays), "prompt_length" (int32 [B]) and
      each record field as a list.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1 or None (forever)")
    get_template(template)  # fail on a bad name before any work
    shard = shard_records(records, shard_index, shard_count)
    elements = tokenize_prompts(
        shard,
        template,
        tokenizer,
        add_bos=add_bos,
        max_prompt_length=max_prompt_length,
        instruction=instruction,
    )
    if not elements:
        raise ValueError(
            f"shard {shard_index}/{shard_count} has no prompts ({len(records)} records, "
            f"{len(shard)} in this shard, max_prompt_length={max_prompt_length})"
        )
    if num_epochs is not None and drop_remainder and len(elements) * num_epochs < batch_size:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(elements)} prompts x {num_epochs} epochs of shard "
            f"{shard_index}/{shard_count}: no full batch"
        )
    ds = grain.MapDataset.source(elements).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    return ds.to_iter_dataset(read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))

