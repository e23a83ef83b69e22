"""Training logs: a CSV file, TensorBoard event files, and a PNG of the curves.

The TensorBoard writer is written here in a few lines (TFRecord framing, masked CRC32C and
the three protobuf messages a scalar needs) so that training logs for TensorBoard without
depending on the tensorboard or tensorflow packages. TensorBoard reads the files as usual:
``tensorboard --logdir RUNDIR``.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


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


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(wall_time: float, step: int, *, file_version: str | None = None, scalars: Mapping[str, float] = {}) -> bytes:
    # Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    # Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
    message = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        message += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
            for tag, value in scalars.items()
        )
        message += _length_delimited(5, values)
    return message


class EventWriter:
    """Scalars to a TensorBoard event file ``events.out.tfevents.<time>.<host>`` in ``folder``."""

    def __init__(self, folder: Path) -> None:
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.biounet"
        self.path = Path(folder) / name
        self._write(_event(time.time(), 0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            self._write(_event(time.time(), step, scalars=finite))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        with self.path.open("ab") as handle:
            handle.write(header + struct.pack("<I", _masked_crc(header)) + record)
            handle.write(struct.pack("<I", _masked_crc(record)))


def read_events(path: Path) -> list[bytes]:
    """The records of a TFRecord file, their checksums verified (for tests and tools)."""
    data, records, offset = Path(path).read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        (crc,) = struct.unpack_from("<I", data, offset + 8)
        if crc != _masked_crc(data[offset : offset + 8]):
            raise ValueError(f"{path}: corrupt length checksum at byte {offset}")
        record = data[offset + 12 : offset + 12 + length]
        (crc,) = struct.unpack_from("<I", data, offset + 12 + length)
        if crc != _masked_crc(record):
            raise ValueError(f"{path}: corrupt record checksum at byte {offset}")
        records.append(record)
        offset += 16 + length
    return records


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
