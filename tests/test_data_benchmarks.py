"""Benchmark loaders on the shared real files (skipped when absent) and on malformed files."""

import json
import os
from pathlib import Path

import pytest

from r1jax.data.benchmarks import RecordError, canonical_number, load_benchmark

DATA_DIR = Path(os.environ.get("R1JAX_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA_DIR / "math500.jsonl").exists(), reason=f"no data in {DATA_DIR}")


@needs_data
@pytest.mark.parametrize(
    "name, split, rows, first_answers",
    [
        ("gsm8k", "test", 1319, ["18", "3", "70000"]),
        ("gsm8k", "train", 7473, ["72", "10", "5"]),
        ("math500", None, 500, ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]),
        ("aime24", None, 30, ["204", "113", "371"]),
        ("amc23", None, 40, ["27", "36", "45"]),
    ],
)
def test_real_files(name, split, rows, first_answers):
    records = load_benchmark(name, split=split, data_dir=DATA_DIR)
    assert len(records) == rows and [r["answer"] for r in records[:3]] == first_answers
    assert len({r["id"] for r in records}) == rows
    for r in records:
        assert r["question"].strip() and r["answer"] and isinstance(r["answer"], str)
    if name == "gsm8k":
        assert all("####" not in r["solution"] and "<<" not in r["solution"] for r in records)
        assert all("," not in r["answer"] for r in records)
    if name == "aime24":
        assert records[7]["answer"] == "25"  # "025" in the file
    if name == "amc23":
        assert "." not in "".join(r["answer"] for r in records)  # 27.0 → "27"
        assert records[15]["answer"] == "-1"
    if name == "math500":
        assert records[0]["id"] == "test/precalculus/807.json" and "\\boxed" in records[0]["solution"]
    assert load_benchmark(DATA_DIR / f"{name}{'_' + split if split else ''}.jsonl", limit=5) == records[:5]


def test_gsm8k_thousands_and_data_dir_env(tmp_path, monkeypatch):
    row = {"question": "q", "answer": "a <<2*3=6>>6\n#### 1,234"}
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps(row) + "\n\n")
    monkeypatch.setenv("R1JAX_DATA_DIR", str(tmp_path))
    [record] = load_benchmark("gsm8k")
    assert record == {
        "id": "gsm8k_test-0",
        "question": "q",
        "answer": "1234",
        "solution": "a 6",
        "source": "gsm8k_test",
    }


@pytest.mark.parametrize(
    "value, text",
    [(27.0, "27"), ("025", "25"), ("1,000", "1000"), (0.5, "0.5"), ("-3.0", "-3"), ("x+1", "x+1")],
)
def test_canonical_number(value, text):
    assert canonical_number(value) == text


def test_malformed_files_name_file_and_line(tmp_path):
    bad = tmp_path / "math500.jsonl"
    bad.write_text('{"problem": "p", "answer": "1"}\n{"problem": "p2", "answer": \n')
    with pytest.raises(RecordError, match=r"math500.jsonl:2: invalid JSON"):
        load_benchmark(bad)
    bad.write_text('{"problem": "p", "answer": "1"}\n{"problem": "p2"}\n')
    with pytest.raises(RecordError, match=r"math500.jsonl:2: missing field 'answer'"):
        load_benchmark(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(RecordError, match=r":1: expected a JSON object"):
        load_benchmark(bad)
    gsm = tmp_path / "gsm8k_x.jsonl"
    gsm.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(RecordError, match=r"gsm8k_x.jsonl:1: GSM8K answer has no '####'"):
        load_benchmark(gsm)


def test_names_synthetic_and_errors(tmp_path):
    test = load_benchmark("synthetic", split="test", limit=20)
    assert (
        len(test) == 20
        and test[0]["task"] == "arithmetic"
        and test[0]["source"] == "synthetic-arithmetic-test"
    )
    assert load_benchmark("synthetic:countdown", split="train", limit=3)[0]["task"] == "countdown"
    generic = tmp_path / "mine.jsonl"
    generic.write_text('{"prompt": "p", "answer": 3, "extra": 1}\n')
    assert load_benchmark(generic) == [
        {"question": "p", "answer": "3", "extra": 1, "id": "mine-0", "source": "mine"}
    ]
    with pytest.raises(ValueError, match="only a test split"):
        load_benchmark("math500", split="train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="amc23.jsonl"):
        load_benchmark("amc23", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the `datasets` library"):
            load_benchmark("openai/gsm8k")
