"""Benchmark loaders: GSM8K, MATH-500, AIME24, AMC23, the synthetic task, HF `datasets` names.

Every loader returns the same record: {"id", "question", "answer", "solution" (when the source has
one), "source", plus the source's extra fields (subject, level, url, task fields …)}. Answers are
strings a grader compares against: GSM8K's number after `####` without thousands separators,
AIME's "025" as "25", AMC's 27.0 as "27", MATH-500's LaTeX as written.

Files are read from a path; a bare name ("gsm8k", "math500", …) is looked up as
`{data_dir}/{name}[_{split}].jsonl` with `data_dir` from the argument or `$R1JAX_DATA_DIR`. A
malformed line fails with the file and line number rather than somewhere downstream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from r1jax.data import synthetic

Record = dict[str, Any]

DATA_DIR_ENV = "R1JAX_DATA_DIR"

# Known HF dataset names → (loader format, config name, default split).
HF_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "openai/gsm8k": ("gsm8k", "main", "test"),
    "HuggingFaceH4/MATH-500": ("math500", None, "test"),
    "Maxwell-Jia/AIME_2024": ("aime", None, "train"),
    "math-ai/aime24": ("aime", None, "test"),
    "math-ai/amc23": ("amc", None, "test"),
}


class RecordError(ValueError):
    """A malformed benchmark row; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; RecordError on invalid JSON or non-objects."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _field(row: dict[str, Any], names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise RecordError(f"{where}: missing field {' or '.join(map(repr, names))}; the row has {sorted(row)}")


def canonical_number(value: Any) -> str:
    """27.0 → "27", "025" → "25", "1,000" → "1000", 0.5 → "0.5"; other strings unchanged (stripped)."""
    if isinstance(value, bool):
        raise TypeError(f"answer {value!r} is a bool, not a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return repr(value)
    text = str(value).strip()
    plain = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    if re.fullmatch(r"-?\d+", plain):
        return str(int(plain))
    if re.fullmatch(r"-?\d+\.\d+", plain):
        return canonical_number(float(plain)) if float(plain) == int(float(plain)) else plain
    return text


_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def _gsm8k(row: dict[str, Any], where: str, index: int, source: str) -> Record:
    question = _field(row, ("question",), where)
    raw = _field(row, ("answer",), where)
    if "####" not in raw:
        raise RecordError(f"{where}: GSM8K answer has no '####' line: {raw[-80:]!r}")
    reasoning, final = raw.rsplit("####", 1)
    answer = canonical_number(final.strip().replace(",", ""))
    # The <<48/2=24>> calculator annotations are a data-collection artefact, not reasoning text.
    return {
        "id": str(row.get("id", f"{source}-{index}")),
        "question": question,
        "answer": answer,
        "solution": _GSM8K_CALC.sub("", reasoning).strip(),
        "source": source,
    }


def _math(row: dict[str, Any], where: str, index: int, source: str) -> Record:
    record = {
        "id": str(row.get("unique_id", row.get("id", f"{source}-{index}"))),
        "question": _field(row, ("problem", "question"), where),
        "answer": str(_field(row, ("answer",), where)).strip(),
        "source": source,
    }
    if row.get("solution") is not None:
        record["solution"] = row["solution"]
    for extra in ("subject", "level"):
        if extra in row:
            record[extra] = row[extra]
    return record


def _competition(row: dict[str, Any], where: str, index: int, source: str) -> Record:
    record = {
        "id": str(row.get("id", f"{source}-{index}")),
        "question": _field(row, ("problem", "question"), where),
        "answer": canonical_number(_field(row, ("answer",), where)),
        "source": source,
    }
    if row.get("solution") is not None:
        record["solution"] = row["solution"]
    if "url" in row:
        record["url"] = row["url"]
    return record


def _generic(row: dict[str, Any], where: str, index: int, source: str) -> Record:
    record = dict(row)
    record["question"] = _field(row, ("question", "problem", "prompt"), where)
    record["answer"] = str(_field(row, ("answer",), where)).strip()
    record["id"] = str(row.get("id", f"{source}-{index}"))
    record.setdefault("source", source)
    for alias in ("problem", "prompt"):
        if record.get(alias) == record["question"]:
            del record[alias]
    return record


FORMATS: dict[str, Callable[[dict[str, Any], str, int, str], Record]] = {
    "gsm8k": _gsm8k,
    "math500": _math,
    "math": _math,
    "aime": _competition,
    "amc": _competition,
    "jsonl": _generic,
}

# Benchmark name → (format, file stem pattern; "{split}" filled in when the name has splits).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k", "gsm8k_{split}"),
    "math500": ("math500", "math500"),
    "aime24": ("aime", "aime24"),
    "amc23": ("amc", "amc23"),
}


def infer_format(path: str | os.PathLike) -> str:
    """The loader format implied by a file name (gsm8k*, math*, aime*, amc*), else "jsonl"."""
    stem = Path(path).name.lower()
    for prefix, fmt in (("gsm8k", "gsm8k"), ("math", "math500"), ("aime", "aime"), ("amc", "amc")):
        if stem.startswith(prefix):
            return fmt
    return "jsonl"


def load_jsonl_benchmark(
    path: str | os.PathLike, *, format: str | None = None, limit: int | None = None
) -> list[Record]:
    """Records from one JSONL file in a known `format` (see `FORMATS`; inferred from the name if None)."""
    fmt = format or infer_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} must be one of {sorted(FORMATS)}")
    convert, source = FORMATS[fmt], Path(path).stem
    records = []
    for index, (lineno, row) in enumerate(read_jsonl(path)):
        if limit is not None and len(records) >= limit:
            break
        records.append(convert(row, f"{path}:{lineno}", index, source))
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RecordError(f"{path}: duplicate id {dup!r}")
    return records


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    folder = data_dir or os.environ.get(DATA_DIR_ENV)
    if not folder:
        raise FileNotFoundError(
            f"a benchmark name needs a data folder: pass data_dir= or set ${DATA_DIR_ENV} "
            "(or pass the path of a .jsonl file)"
        )
    return Path(folder)


def load_benchmark(
    name_or_path: str | os.PathLike,
    *,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    format: str | None = None,
    synthetic_spec: synthetic.TaskSpec | None = None,
    synthetic_size: int = 500,
    seed: int = 0,
) -> list[Record]:
    """Load a benchmark as a list of common records.

    Args:
      name_or_path: a .jsonl path; a name in `BENCHMARKS` (gsm8k, math500, aime24, amc23), read from
        `data_dir`; "synthetic" (the embedded task; "synthetic:countdown" for countdown); or an HF
        `datasets` name such as "openai/gsm8k" (needs the `datasets` library and a network).
      split: "train" or "test" (GSM8K and synthetic; the others only have a test split); default
        "test", or the HF dataset's usual evaluation split.
      limit: keep the first `limit` records.
      format: loader format for a path (default: inferred from the file name).
      synthetic_spec, synthetic_size, seed: the synthetic split's problem space, size and seed.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0")
    name = str(name_or_path)
    if "/" in name and not Path(name).exists() and Path(name).suffix != ".jsonl" and name not in BENCHMARKS:
        return load_hf_dataset(name, split=split, limit=limit, format=format)
    split = split or "test"
    if name == "synthetic" or name.startswith("synthetic:"):
        spec = synthetic_spec or synthetic.TaskSpec()
        if ":" in name:
            spec = dataclasses.replace(spec, task=name.split(":", 1)[1])
        size = synthetic_size if limit is None else min(limit, synthetic_size)
        source = f"synthetic-{spec.task}-{split}"
        return [{**ex, "source": source} for ex in synthetic.generate(split, size, seed, spec)]

    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        return load_jsonl_benchmark(path, format=format, limit=limit)

    if name in BENCHMARKS:
        fmt, stem = BENCHMARKS[name]
        if "{split}" not in stem and split != "test":
            raise ValueError(f"{name} has only a test split, not split={split!r}")
        file = resolve_data_dir(data_dir) / f"{stem.format(split=split)}.jsonl"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found for benchmark {name!r} split={split!r}")
        return load_jsonl_benchmark(file, format=format or fmt, limit=limit)

    raise ValueError(
        f"unknown benchmark {name!r}: expected a .jsonl path, one of {sorted(BENCHMARKS)}, 'synthetic', "
        "or an HF datasets name such as 'openai/gsm8k'"
    )


def load_hf_dataset(
    name: str, *, split: str | None = None, limit: int | None = None, format: str | None = None
) -> list[Record]:
    """Records from an HF `datasets` name (known names in `HF_DATASETS`; others use the generic format)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading {name!r} needs the `datasets` library (pip install datasets) and a network; "
            "or pass the path of a local .jsonl file"
        ) from e
    fmt, config, default_split = HF_DATASETS.get(name, ("jsonl", None, "test"))
    fmt = format or fmt
    data = datasets.load_dataset(name, config, split=split or default_split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    convert, source = FORMATS[fmt], name.replace("/", "_")
    return [convert(dict(row), f"{name}[{i}]", i, source) for i, row in enumerate(data)]
