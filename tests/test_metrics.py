"""Metrics: strict-JSON lines, resume truncation equal to an uninterrupted run, TensorBoard events
read back with an independent TFRecord reader, the progress bar, PNG curves + report, peak/MFU."""

import io
import json
import math
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import metrics as M
from r1jax.metrics import (
    MetricsWriter,
    ProgressBar,
    measure_matmul_flops,
    mfu,
    peak_flops_per_device,
    plot_curves,
    read_jsonl,
    write_report,
)


def strict_json(line: str):
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token} in {line!r}")

    return json.loads(line, parse_constant=reject)


def step_metrics(step: int) -> dict:
    return {"loss": 1.0 / step, "reward/mean": np.float32(step / 10), "completion/length_mean": 20 + 3 * step}


def test_jsonl_lines_are_strict_json_with_null_for_non_finite(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, process_index=0) as w:
        w.write(
            1,
            {
                "a": 0.5,
                "b": np.float32(0.25),
                "c": jnp.float32(2.0),
                "n": np.int64(7),
                "flag": True,
                "stage": "rl",
                "nan": float("nan"),
                "inf": np.float32(np.inf),
                "jnan": jnp.float32(jnp.nan),
                "one": np.ones((1,)),
            },
        )
        with pytest.raises(ValueError, match=r"'vec' has shape \(3,\)"):
            w.write(2, {"vec": np.ones(3)})
        with pytest.raises(ValueError, match="'step'"):
            w.write(2, {"step": 2})
        # Each line is on disk as soon as it is written (flushed), before close().
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict_json(lines[0]) == {
        "step": 1,
        "a": 0.5,
        "b": 0.25,
        "c": 2.0,
        "n": 7,
        "flag": True,
        "stage": "rl",
        "nan": None,
        "inf": None,
        "jnan": None,
        "one": 1.0,
    }
    assert list(strict_json(lines[0]))[0] == "step"


def test_resumed_jsonl_equals_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    with MetricsWriter(full, tensorboard=False, process_index=0) as w:
        for step in range(1, 7):
            w.write(step, step_metrics(step))
    # The interrupted run got to step 5 and died mid-line; its last checkpoint was step 3.
    w = MetricsWriter(cut, tensorboard=False, process_index=0)
    for step in range(1, 6):
        w.write(step, step_metrics(step))
    w._file.write('{"step": 6, "loss": 0.1')
    w._file.flush()
    with MetricsWriter(cut, tensorboard=False, resume_step=3, process_index=0) as w2:
        assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [1, 2, 3]
        for step in range(4, 7):
            w2.write(step, step_metrics(step))
    assert (cut / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    # A fresh run (nothing to resume) starts the file afresh.
    with MetricsWriter(cut, tensorboard=False, process_index=0) as w3:
        w3.write(1, {"loss": 2.0})
    assert [r["step"] for r in read_jsonl(cut / "metrics.jsonl")] == [1]


def test_only_process_zero_writes(tmp_path):
    with MetricsWriter(tmp_path / "w", process_index=1) as w:
        w.write(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists()


def read_tfrecords(path: Path) -> list[bytes]:
    """TFRecord framing: u64 length, u32 crc, payload, u32 crc (CRCs not checked here)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    from tensorboardX.proto.event_pb2 import Event

    with MetricsWriter(tmp_path, jsonl=False, process_index=0) as w:
        for step in (1, 2):
            w.write(step, {"loss": 1.0 / step, "stage": "rl", "bad": float("nan")})
    with MetricsWriter(tmp_path, jsonl=False, resume_step=1, process_index=0) as w:
        w.write(2, {"loss": 0.75})
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 2  # the restart did not overwrite the first run's file
    events = [Event.FromString(r) for f in files for r in read_tfrecords(f)]
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert [s for s in scalars if s[1] == "loss"] == [(1, "loss", 1.0), (2, "loss", 0.5), (2, "loss", 0.75)]
    assert any(t == "bad" and math.isnan(x) for _, t, x in scalars)  # TB keeps the real NaN
    assert not any(t == "stage" for _, t, _ in scalars)  # strings are JSONL-only
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [0, 2]  # fresh run purges everything; the resume purges step >= 2


def test_progress_bar_shows_chosen_metrics_and_is_off_without_tty(monkeypatch):
    out = io.StringIO()
    with ProgressBar(10, initial=2, disable=False, file=out, mininterval=0) as bar:
        bar.update(3, {"reward/mean": jnp.float32(0.5), "completion/length_mean": 123.0, "loss": 9.0})
        bar.update(5, {"reward/mean": 0.75})
        assert bar._bar.n == 5
    text = out.getvalue()
    assert "3/10" in text and "reward=0.5" in text and "len=123" in text
    assert "5/10" in text and "reward=0.75, len=123" in text  # len keeps its last value
    assert "loss" not in text
    assert ProgressBar(10, file=io.StringIO()).disabled  # not a TTY

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not ProgressBar(10, file=Tty()).disabled
    monkeypatch.setattr(M, "_process_index", lambda: 1)
    assert ProgressBar(10, file=Tty()).disabled


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_curves_and_report(tmp_path):
    records = []
    for step in range(0, 31, 2):
        r = {"step": step, "completion/length_mean": 40.0 + 5 * step}
        if step % 10 == 0:
            r["eval/pass1"] = 0.1 + 0.02 * step
        records.append(r)
    records[3]["completion/length_mean"] = None  # a non-finite value written as null
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pyplot_loaded = "matplotlib.pyplot" in sys.modules

    figs = plot_curves(jsonl, tmp_path / "report", series={**M.DEFAULT_SERIES, "never logged": "eval/missing"})
    assert [p.name for p in figs] == ["eval_pass1.png", "completion_length_mean.png"]
    for p in figs:
        assert png_size(p) == (768, 480)
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # no pyplot, no global backend change
    # The plotted data matter: different values give a different image.
    other = plot_curves(
        [{**r, "eval/pass1": 0.9} for r in records if "eval/pass1" in r], tmp_path / "other", series={"p": "eval/pass1"}
    )
    assert other[0].read_bytes() != figs[0].read_bytes()

    summary = {"pass@1 base": 0.125, "pass@1 final": 0.6875, "steps": 30, "wall minutes": np.float64(12.25)}
    report = write_report(tmp_path / "report", summary, dict(zip(M.DEFAULT_SERIES, figs, strict=True)))
    text = report.read_text()
    assert report == tmp_path / "report" / "report.md"
    assert "![pass@1 (held-out)](eval_pass1.png)" in text
    assert "![mean response length](completion_length_mean.png)" in text
    for row in ("| pass@1 base | 0.125 |", "| pass@1 final | 0.6875 |", "| steps | 30 |", "| wall minutes | 12.25 |"):
        assert row in text
    plain = write_report(tmp_path / "report", summary, figs, filename="b.md").read_text()
    assert "![completion_length_mean](completion_length_mean.png)" in plain


def test_peak_flops_table_and_mfu():
    kinds = {
        "TPU v4": 275e12,
        "TPU v4 lite": None,
        "TPU v5 lite": 197e12,
        "TPU v5e": 197e12,
        "TPU v5": 459e12,
        "TPU v5p": 459e12,
        "TPU v6 lite": 918e12,
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "cpu": None,
        "NVIDIA GeForce RTX 4090": None,
    }
    for kind, peak in kinds.items():
        assert peak_flops_per_device(SimpleNamespace(device_kind=kind)) == peak, kind
    assert peak_flops_per_device() is None  # the test devices are CPUs
    assert mfu(4e12, 2.0, 4e12) == 0.5
    with pytest.raises(ValueError, match="step_seconds > 0"):
        mfu(1e12, 0.0, 1e12)


def test_measure_matmul_flops_is_a_plausible_rate():
    rate = measure_matmul_flops(256, repeats=2)
    assert 1e7 < rate < 1e14  # from a slow shared core to far beyond any CPU: catches unit slips
    # Timing the same matmul independently gives the same order of magnitude.
    f = jax.jit(jnp.matmul)
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    t = min(_timed(f, a) for _ in range(3))
    assert 0.02 < rate / (2 * 256**3 / t) < 50


def _timed(f, a) -> float:
    start = time.perf_counter()
    f(a, a).block_until_ready()
    return time.perf_counter() - start
