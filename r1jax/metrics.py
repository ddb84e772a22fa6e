"""Training metrics out: JSONL + TensorBoard, a console progress bar, the R1-Zero curves, MFU.

* `MetricsWriter` appends one JSON object per step to `<workdir>/metrics.jsonl` (flushed every
  line) and mirrors numeric values to TensorBoard (tensorboardX, imported only when used). Only
  process 0 writes. **Non-finite floats are written as JSON `null`**, so the file stays strict JSON
  that `jq`, `pandas.read_json(lines=True)` and browsers read (pandas turns null into NaN); the
  TensorBoard scalar keeps the real NaN/inf. On resume, records with `step > resume_step` are
  dropped first (a torn last line from a killed run too) and TensorBoard is told to purge them
  (`purge_step`), so a resumed run's JSONL is byte-for-byte the uninterrupted run's, provided the
  trainer writes a step's metrics *before* saving that step's checkpoint.
* `ProgressBar`: tqdm with ETA and a few chosen metrics; off when the stream is not a TTY or this
  is not process 0.
* `plot_curves` / `write_report`: the R1-Zero paper's two figures (held-out pass@1 and mean
  response length against step) as PNGs, drawn on a `matplotlib.figure.Figure` with the Agg canvas
  directly (no pyplot, no global backend switch), and a short markdown report that embeds them.
* `mfu`, `peak_flops_per_device`, `measure_matmul_flops`: model-FLOP utilisation against the
  advertised dense bf16 peak of known accelerators, or against a measured matmul rate on CPU.

JAX is imported inside the functions that need it, so plotting and reports work anywhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Figure label -> metric key: the R1-Zero paper's Figure 2 (pass@1) and Figure 3 (response length).
DEFAULT_SERIES = {"pass@1 (held-out)": "eval/pass1", "mean response length": "completion/length_mean"}
# Progress-bar label -> metric key.
DEFAULT_PROGRESS = {"reward": "reward/mean", "acc": "reward/accuracy", "len": "completion/length_mean"}

Scalar = float | int | bool | str | None


def _process_index() -> int:
    import jax

    return jax.process_index()


def to_scalar(name: str, value: Any) -> Scalar:
    """A metric value as a Python scalar: numpy/JAX scalars and size-1 arrays become int/float/bool."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} has shape {arr.shape}; metrics must be scalars (reduce it first)")
    item = arr.reshape(()).item()
    if isinstance(item, bool | int | float | str):
        return item
    raise TypeError(f"metric {name!r} = {value!r} ({arr.dtype}) is not a number, bool or str")


def _json_value(value: Scalar) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; an unreadable line (a torn write) is skipped with a warning."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an unreadable line (a write cut short?)", path, lineno)
    return records


def _truncate_jsonl(path: Path, resume_step: int | None) -> int:
    """Keep the lines with `step <= resume_step` (none when None), byte for byte; returns how many."""
    if not path.exists():
        return 0
    kept = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line.strip():
                    log.warning("%s:%d: dropping an unreadable line (a write cut short?)", path, lineno)
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if resume_step is not None and isinstance(step, int | float) and step <= resume_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one, never half
    return len(kept)


class MetricsWriter:
    """Per-step metrics to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

    Args:
      workdir: a local directory (created if missing).
      tensorboard, jsonl: which outputs to write.
      resume_step: the step of the checkpoint this run resumed from. Records with a larger step
        are removed from the JSONL (and purged from TensorBoard's view); None means a fresh run,
        which starts the JSONL afresh.
      process_index: defaults to `jax.process_index()`; only process 0 writes anything.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        jsonl: bool = True,
        resume_step: int | None = None,
        process_index: int | None = None,
    ):
        self.workdir = Path(workdir)
        self.active = (_process_index() if process_index is None else process_index) == 0
        self.path = self.workdir / METRICS_FILE
        self._file: TextIO | None = None
        self._tb = None
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            kept = _truncate_jsonl(self.path, resume_step)
            if resume_step is not None:
                log.info("%s: kept %d records up to step %d", self.path, kept, resume_step)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter  # imports torch when present: only pay when asked

            purge = 0 if resume_step is None else resume_step + 1
            # tensorboardX names files by the second; a unique suffix keeps a quick restart from
            # truncating the previous writer's file.
            suffix = f".{uuid.uuid4().hex[:8]}"
            self._tb = SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30, filename_suffix=suffix
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` of `step`: floats, ints, bools, strings, numpy or JAX scalars."""
        if not self.active:
            return
        if any(type(v).__module__.startswith("jax") for v in metrics.values()):
            import jax

            metrics = jax.device_get(dict(metrics))  # one transfer for all of them
        values = {}
        for name, value in metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"metric names must be str, got {name!r}")
            if name == "step":
                raise ValueError("'step' is the write() argument, not a metric name")
            values[name] = to_scalar(name, value)
        if self._file is not None:
            record = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, bool | int | float):
                    self._tb.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _format_metric(value: Any) -> str:
    value = to_scalar("", value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """A tqdm bar over training steps with ETA and a few metrics (`show`: label -> metric key).

    `disable=None` turns it off when `file` (default stderr) is not a TTY or this is not process 0,
    so logs of batch jobs stay clean. A metric keeps its last shown value until it is updated, so
    metrics logged at different intervals (eval every N steps) stay visible.
    """

    def __init__(
        self,
        total_steps: int,
        initial: int = 0,
        *,
        show: Mapping[str, str] | None = None,
        disable: bool | None = None,
        file: TextIO | None = None,
        desc: str = "train",
        mininterval: float = 0.1,
    ):
        from tqdm import tqdm

        file = sys.stderr if file is None else file
        if disable is None:
            isatty = getattr(file, "isatty", None)
            disable = not (callable(isatty) and isatty()) or _process_index() != 0
        self.show = dict(DEFAULT_PROGRESS if show is None else show)
        self.disabled = disable
        self._postfix: dict[str, str] = {}
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            disable=disable,
            file=file,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=mininterval,
        )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move the bar to `step` (absolute) and show the chosen metrics present in `metrics`."""
        if self.disabled:
            return
        if metrics:
            self._postfix.update(
                {label: _format_metric(metrics[key]) for label, key in self.show.items() if key in metrics}
            )
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- curves and report ------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "metric"


def _series_points(records: Sequence[Mapping[str, Any]], x: str, key: str) -> tuple[list[float], list[float]]:
    by_x: dict[float, float] = {}
    for r in records:
        xv, yv = r.get(x), r.get(key)
        if isinstance(xv, bool) or isinstance(yv, bool) or not isinstance(xv, int | float):
            continue
        if isinstance(yv, int | float) and math.isfinite(yv):
            by_x[xv] = yv  # a repeated x (an untruncated resume) keeps the later value
    xs = sorted(by_x)
    return xs, [by_x[v] for v in xs]


def plot_curves(
    source: str | os.PathLike | Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    x: str = "step",
    series: Mapping[str, str] = DEFAULT_SERIES,
) -> list[Path]:
    """One PNG per series (label -> metric key) of the metric against `x`; returns the paths written.

    `source` is a metrics JSONL path or the records themselves. Records without the key, or with a
    null/non-finite value, are left out; a series with no points is skipped (with a warning) and
    not returned.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_jsonl(source) if isinstance(source, str | os.PathLike) else list(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, key in series.items():
        xs, ys = _series_points(records, x, key)
        if not xs:
            log.warning("plot_curves: no finite %r values against %r; skipping %r", key, x, label)
            continue
        fig = Figure(figsize=(6.4, 4.0), dpi=120, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, linewidth=1.5)
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs {x}")
        ax.grid(True, alpha=0.3)
        path = out / f"{_slug(key)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return _format_value(value.item())
    return str(value)


def write_report(
    out_dir: str | os.PathLike,
    summary: Mapping[str, Any],
    figures: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    *,
    title: str = "R1-Zero run report",
    filename: str = "report.md",
) -> Path:
    """A markdown report in `out_dir`: a table of `summary` and the figures (label -> PNG, or PNGs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = figures.items() if isinstance(figures, Mapping) else ((Path(p).stem, p) for p in figures)
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_format_value(v)} |" for k, v in summary.items()]
    lines += ["", "## Figures", ""]
    for label, fig in items:
        fig = Path(fig)
        try:
            ref = fig.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            ref = fig.resolve().as_posix()
        lines += [f"![{label}]({ref})", ""]
    path = out / filename
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- FLOPs ----------------------------------------------------------------------------------------

# Advertised dense bf16 peak FLOP/s per chip, by `device_kind` (lower case; JAX reports v5e/v6e as
# "lite" and v5p as "TPU v5").
_PEAK_BF16_EXACT = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# GPUs report long names ("NVIDIA H100 80GB HBM3"); first substring match wins.
_PEAK_BF16_GPU = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of `device` (default `jax.devices()[0]`), or None if unknown (e.g. CPU)."""
    if device is None:
        import jax

        device = jax.devices()[0]
    kind = str(getattr(device, "device_kind", device)).strip().lower()
    if kind in _PEAK_BF16_EXACT:
        return _PEAK_BF16_EXACT[kind]
    for pattern, peak in _PEAK_BF16_GPU:
        if pattern in kind:
            return peak
    return None


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model-FLOP utilisation: achieved FLOP/s over `peak_flops` (the peak of ALL devices used)."""
    if step_seconds <= 0 or peak_flops <= 0 or flops_per_step < 0:
        raise ValueError(
            f"mfu needs flops_per_step >= 0, step_seconds > 0, peak_flops > 0; got "
            f"{flops_per_step}, {step_seconds}, {peak_flops}"
        )
    return flops_per_step / step_seconds / peak_flops


def measure_matmul_flops(n: int = 1024, dtype: Any = None, *, repeats: int = 3) -> float:
    """FLOP/s of a jitted n x n @ n x n matmul on the default device (best of `repeats`).

    A roofline for machines without a known peak: on CPU, `flops / seconds / measure_matmul_flops()`
    says how close a step runs to what this machine's matmul reaches. Costs a compile and
    `repeats + 1` matmuls: under a second at n=1024 in float32 on a 2-core CPU.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    rng = np.random.default_rng(0)  # host-side inputs: no PRNG kernels to compile
    a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile + warm
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


__all__ = [
    "DEFAULT_PROGRESS",
    "DEFAULT_SERIES",
    "METRICS_FILE",
    "MetricsWriter",
    "ProgressBar",
    "measure_matmul_flops",
    "mfu",
    "peak_flops_per_device",
    "plot_curves",
    "read_jsonl",
    "to_scalar",
    "write_report",
]
