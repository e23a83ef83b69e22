"""Training logs: a CSV file, TensorBoard event files, and a PNG of the curves.

The TensorBoard event files are written by ``tensorboardX`` (the optional extra
``biounet[tensorboard]``; it needs protobuf, not TensorFlow) and read as usual with
``tensorboard --logdir RUNDIR``. Without it, training still writes the CSV and the curves.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class CsvLog:
    """Append rows of named values to ``path``; the header is the union of keys seen first.

    On resume the rows beyond ``keep_until_step`` are dropped, so that a run killed after its
    last checkpoint and resumed logs every step exactly once. The file is appended to; it is
    replaced (atomically, :func:`biounet.io.atomic_write`) only when rows must go or its
    header differs, so a crash never loses the rows logged so far.
    """

    def __init__(self, path: Path, fields: Sequence[str], *, keep_until_step: int | None = None) -> None:
        from biounet.io._files import atomic_write

        self.path, self.fields = Path(path), list(fields)
        old, header, whole = [], None, False
        if keep_until_step is not None and self.path.is_file():
            with self.path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                old, header = list(reader), reader.fieldnames
            with self.path.open("rb") as handle:
                whole = handle.seek(0, os.SEEK_END) == 0 or (handle.seek(-1, os.SEEK_END) >= 0
                                                           and handle.read(1) == b"\n")  # fmt: skip
        rows = [r for r in old if _step(r) is not None and _step(r) <= keep_until_step] if old else []
        if header == self.fields and rows == old and whole:
            return  # resumed where the log ends, after a whole line: append
        with atomic_write(self.path) as tmp, tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields)
            writer.writeheader()
            writer.writerows({k: r.get(k) or "" for k in self.fields} for r in rows)

    def write(self, row: Mapping[str, float | int | str]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow({k: _fmt(row.get(k, "")) for k in self.fields})

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        with Path(path).open(newline="") as handle:
            return list(csv.DictReader(handle))


def _step(row: Mapping[str, str | None]) -> int | None:
    try:
        return int(float(row.get("step") or "nan"))
    except ValueError:  # a torn last line, or a foreign file
        return None


def _fmt(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


#: tells apart the event files of writers that share a folder, a process and a second
_SERIAL = itertools.count()


class EventWriter:
    """Scalars to a TensorBoard event file ``events.out.tfevents.<time>.<host>.<pid>.<n>.biounet`` in ``folder``.

    A thin wrapper of :class:`tensorboardX.SummaryWriter`: one ``add_scalar`` per finite value.
    Without tensorboardX it logs one line and writes nothing. Events reach the file within
    ``flush_secs`` seconds and all of them at :meth:`close`. ``purge_step``: TensorBoard
    drops the events of earlier files from that step on (as ``CsvLog`` drops the rows).
    """

    def __init__(self, folder: Path, *, flush_secs: int = 10, purge_step: int | None = None) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX is not installed (pip install 'biounet[tensorboard]'): no TensorBoard events; "
                     "log.csv and curves.png are still written")  # fmt: skip
            self._writer: Any = None
            return
        suffix = f".{os.getpid()}.{next(_SERIAL)}.biounet"  # tensorboardX names files by the second only
        # a resumed run (purge_step: its checkpoint's step + 1) hides the steps it logged after that checkpoint
        self._writer = SummaryWriter(str(folder), flush_secs=flush_secs, filename_suffix=suffix, purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Log the finite numbers of ``values`` at ``step``; others (NaN, text) are skipped."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        """Write the pending events and close the file (again: nothing)."""
        if self._writer is not None:
            self._writer.close()


def plot_curves(rows: Sequence[Mapping[str, str]], path: Path, *, title: str = "") -> Path:
    """Plot training loss and validation metrics of a CSV log to a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from biounet.io._files import atomic_write

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    steps, loss = series("loss")
    if len(loss):
        ax_loss.plot(steps, loss, lw=0.6, alpha=0.4, color="tab:blue", label="loss")
        k = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax_loss.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"mean of {k}")
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="weighted cross-entropy", title="training loss")
    ax_loss.legend(fontsize=8)
    for key, colour in (("val_iou", "tab:green"), ("val_pixel_error", "tab:red"), ("val_f1", "tab:purple")):
        x, y = series(key)
        if len(y):
            ax_val.plot(x, y, marker="o", ms=3, color=colour, label=key.removeprefix("val_"))
    ax_val.set(xlabel="step", title="validation", ylim=(0, 1))
    if ax_val.get_legend_handles_labels()[0]:
        ax_val.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
