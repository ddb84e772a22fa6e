"""The grain prompt pipeline: exact resumption, disjoint covering shards, seeded shuffling."""

import itertools
import json

import numpy as np
import pytest

from r1jax.data import synthetic
from r1jax.data.pipeline import prompt_dataset, shard_records
from r1jax.data.templates import format_prompt
from r1jax.data.tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sentencepiece(synthetic.corpus(300, seed=0), 320, tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def records():
    return synthetic.generate("train", 24, seed=0)


def _ids(batches):
    return [b["id"] for b in batches]


def test_batch_contents(tok, records):
    batch = next(iter(prompt_dataset(records, "r1_zero", tok, batch_size=4, seed=0)))
    assert set(batch) >= {"id", "question", "answer", "numbers", "target", "steps", "prompt", "prompt_ids"}
    assert batch["prompt_length"].dtype == np.int32 and batch["prompt_length"].shape == (4,)
    by_id = {r["id"]: r for r in records}
    for i, rid in enumerate(batch["id"]):
        assert batch["answer"][i] == by_id[rid]["answer"] and batch["numbers"][i] == by_id[rid]["numbers"]
        assert batch["prompt"][i] == format_prompt("r1_zero", by_id[rid]["question"])
        ids = batch["prompt_ids"][i]
        assert ids.dtype == np.int32 and len(ids) == batch["prompt_length"][i] and ids[0] == tok.bos_id
        assert tok.decode(ids) == batch["prompt"][i]


@pytest.mark.parametrize("num_epochs", [None, 2])
def test_restored_iterator_continues_exactly(tok, records, num_epochs):
    ds = prompt_dataset(records, "r1_zero", tok, batch_size=5, seed=7, num_epochs=num_epochs)
    reference = _ids(iter(ds) if num_epochs else itertools.islice(iter(ds), 12))
    assert len(reference) == (9 if num_epochs else 12)  # 2 epochs x 24 prompts // 5, batches span epochs

    it = iter(ds)
    for _ in range(3):  # mid-epoch: 15 of 24 prompts seen
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    resumed = iter(prompt_dataset(records, "r1_zero", tok, batch_size=5, seed=7, num_epochs=num_epochs))
    resumed.set_state(state)
    rest = _ids(resumed if num_epochs else itertools.islice(resumed, 9))
    assert rest == reference[3:]


def test_seeded_shuffle_and_epochs(tok, records):
    def epoch_orders(seed):
        batches = _ids(prompt_dataset(records, "plain", tok, batch_size=4, seed=seed, num_epochs=2))
        flat = [i for b in batches for i in b]
        return flat[:24], flat[24:]

    first, second = epoch_orders(0)
    assert sorted(first) == sorted(second) == sorted(r["id"] for r in records)
    assert first != second  # reshuffled per epoch
    assert epoch_orders(0) == (first, second) and epoch_orders(1)[0] != first


@pytest.mark.parametrize("count", [1, 3, 4])
def test_shards_are_disjoint_and_cover(tok, records, count):
    seen = []
    for index in range(count):
        ds = prompt_dataset(
            records, "r1_zero", tok, batch_size=2, seed=0, shard_index=index, shard_count=count, num_epochs=1
        )
        shard = [i for b in _ids(ds) for i in b]
        assert len(shard) == 24 // count
        seen.append(set(shard))
    assert set().union(*seen) == {r["id"] for r in records}
    assert sum(map(len, seen)) == 24


def test_uneven_shards_are_equalised():
    shards = [shard_records(list(range(10)), i, 3) for i in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert shard_records(list(range(10)), 0, 3, even=False) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="shard_index"):
        shard_records([1], 3, 3)


def test_max_prompt_length_and_errors(tok, records):
    lengths = [len(tok.encode(format_prompt("r1_zero", r["question"]), add_bos=True)) for r in records]
    cut = sorted(lengths)[12]
    ds = prompt_dataset(records, "r1_zero", tok, batch_size=2, num_epochs=1, max_prompt_length=cut)
    kept = [n for b in ds for n in b["prompt_length"]]
    assert len(kept) == sum(n <= cut for n in lengths) // 2 * 2 and max(kept) <= cut
    with pytest.raises(ValueError, match="no full batch"):
        prompt_dataset(records, "r1_zero", tok, batch_size=100, num_epochs=1)
    with pytest.raises(ValueError, match="not registered"):
        prompt_dataset(records, "nope", tok, batch_size=2)

