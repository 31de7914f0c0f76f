"""Run outputs: TensorBoard events, results.json / metrics.csv (atomic), and console tables.

Tags follow ``specs/metrics.md`` §10: ``eval/<set>/<metric>`` at step = session index,
``train/<name>`` at the global optimiser step, hparams written once into the run's own event file.
Values are stored ×100 (percent); NaN values are never written to TensorBoard.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from openworld.cache import atomic_write_bytes


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(_jsonable(obj), indent=2) + "\n").encode())


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> null (the spec's 'undefined'), tuples -> lists, numpy/torch scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_metrics_csv(path: Path, sessions: Sequence[dict]) -> None:
    """One row per (session, eval set, metric): long format, easy to pivot."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["session", "eval_set", "metric", "value"])
    for rec in sessions:
        for eval_set, metrics in rec.get("metrics", {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    w.writerow(
                        [rec["index"], eval_set, name, "" if value is None or value != value else f"{value:.6f}"]
                    )
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def hparam_value(v: Any) -> bool | int | float | str:
    if v is None:
        return "None"
    if isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


def truncate_events(run_dir: Path, session_start: int, train_step: int) -> int:
    """Rewrite a run directory's TensorBoard events as they stood at the last checkpoint, for
    ``--resume``: ``train/*`` summaries (indexed by optimiser step) up to ``train_step``, every other
    summary (indexed by session) before ``session_start``. Returns the number of summaries kept.

    (TensorBoard's ``purge_step`` drops every tag at or above one step, so it would erase the training
    curves, whose steps are far larger than session indices.)
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        return 0
    kept: list = []
    for f in files:
        for raw in RawEventFileLoader(str(f)).Load():
            ev = event_pb2.Event.FromString(raw)
            if not ev.HasField("summary"):
                continue  # file_version, and purge markers of older resumes: resolved here
            is_train = all(v.tag.startswith("train/") for v in ev.summary.value)
            if (ev.step <= train_step) if is_train else (ev.step < session_start):
                kept.append(ev)
    writer = EventFileWriter(str(run_dir), filename_suffix=".resumed")
    for ev in kept:
        writer.add_event(ev)
    writer.close()
    for f in files:  # the new file has a fresh name (time, pid, counter): only the old ones go
        f.unlink()
    # TensorBoard reads a directory's event files in name order, and the resumed run's writer may get
    # the same second and a counter that sorts before ours ("…10" < "…9.resumed"): name the kept
    # events one second before the oldest original file, so they are always read first.
    written = Path(writer._file_name)
    stamps = [int(f.name.split(".")[3]) for f in files if f.name.split(".")[3].isdigit()]
    first = min(stamps) - 1 if stamps else int(written.name.split(".")[3]) - 1
    written.rename(run_dir / f"events.out.tfevents.{first:010d}.resumed")
    return len(kept)


class TensorBoardLogger:
    """A SummaryWriter on the run directory, created on first use (tensorboard imports lazily)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.purge_step = purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.purge_step)
        return self._writer

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.enabled and value is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if not self.enabled:
            return
        import numpy as np

        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if arr.size:
            self.writer.add_histogram(tag, arr, step)

    def image(self, tag: str, img_hwc, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, img_hwc, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def hparams(self, hp: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """§10.3: one hparams summary in this run's own event file (not ``add_hparams``)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        exp, ssi, sei = hparams({k: hparam_value(v) for k, v in hp.items()}, metrics)
        fw = self.writer.file_writer
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def format_value(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [title] if title else []
    out += [fmt(cells[0]), line] + [fmt(r) for r in cells[1:]]
    return "\n".join(out)
