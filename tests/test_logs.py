"""The training logs: the CSV log (appended, never rewritten in place) and the TensorBoard events."""

from __future__ import annotations

import logging
import math
import struct
import sys

import numpy as np
import pytest

from biounet.data import make_sample, synthetic_cells
from biounet.training import CsvLog, EventWriter, TrainConfig, train

FIELDS = ["step", "loss"]


def _crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), as the TFRecord format specifies."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """The events of a TFRecord file: uint64 length, masked CRC of it, the record, masked CRC of it."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at : at + 8]
        (length,) = struct.unpack("<Q", header)
        record = data[at + 12 : at + 12 + length]
        assert struct.unpack_from("<II", data[at + 8 : at + 12] + data[at + 12 + length : at + 16 + length]) == (
            _masked(header), _masked(record))  # fmt: skip
        events.append(Event.FromString(record))
        at += 16 + length
    return events


def test_crc32c_of_the_check_string():
    assert _crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C


def test_events_hold_the_exact_steps_tags_and_finite_values(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = EventWriter(tmp_path)
    writer.scalars(1, {"loss": 0.5, "lr": 1e-3, "val_iou": math.nan, "note": "x", "count": 3})  # type: ignore[dict-item]
    writer.scalars(2, {"loss": 0.25, "seconds": math.inf})
    writer.close()
    writer.close()  # a second close does nothing
    (path,) = tmp_path.iterdir()
    assert path.name.startswith("events.out.tfevents.") and path.name.endswith(".biounet")
    first, *rest = read_events(path)
    assert first.file_version == "brain.Event:2"
    assert [(e.step, v.tag, v.simple_value) for e in rest for v in e.summary.value] == [
        (1, "loss", 0.5), (1, "lr", float(np.float32(1e-3))), (1, "count", 3.0), (2, "loss", 0.25)]  # fmt: skip


def test_two_writers_in_one_folder_and_second_keep_their_own_files(tmp_path):
    pytest.importorskip("tensorboardX")
    writers = [EventWriter(tmp_path), EventWriter(tmp_path)]
    for step, writer in enumerate(writers, 1):
        writer.scalars(step, {"loss": float(step)})
        writer.close()
    paths = sorted(tmp_path.iterdir())
    assert len(paths) == 2
    steps = sorted(e.step for p in paths for e in read_events(p)[1:])
    assert steps == [1, 2]


def test_without_tensorboardx_training_writes_the_csv_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # ``import tensorboardX`` raises ImportError
    samples = [make_sample(im, lab, name=str(i)) for i, (im, lab) in enumerate(synthetic_cells(2, (48, 48), seed=4))]
    config = TrainConfig.preset("fast", depth=2, base_channels=4, tile=76, batch_size=1, steps=3, val_every=1000)
    with caplog.at_level(logging.INFO, logger="biounet.training"):
        train(samples, tmp_path / "run", config, progress=False)
    assert [r["step"] for r in CsvLog.read(tmp_path / "run" / "log.csv")] == ["1", "2", "3"]
    assert (tmp_path / "run" / "curves.png").is_file()
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    lines = [r.getMessage() for r in caplog.records if "tensorboardX" in r.getMessage()]
    assert lines == ["tensorboardX is not installed (pip install 'biounet[tensorboard]'): no TensorBoard events; "
                     "log.csv and curves.png are still written"]  # fmt: skip


def _log(path, steps, **kwargs):
    log = CsvLog(path, FIELDS, **kwargs)
    for step in steps:
        log.write({"step": step, "loss": 1.0 / step})
    return log


def test_a_resumed_log_is_appended_when_nothing_must_go(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    _log(path, range(1, 4))
    inode = path.stat().st_ino
    _log(path, range(4, 6), keep_until_step=3)
    assert [r["step"] for r in CsvLog.read(path)] == ["1", "2", "3", "4", "5"]
    assert path.stat().st_ino == inode  # the same file, appended to


def test_rows_past_the_checkpoint_are_dropped_by_an_atomic_replace(tmp_path):
    path = tmp_path / "log.csv"
    _log(path, range(1, 6))
    with path.open("a") as handle:
        handle.write("6,0.1")  # a torn last line, as a kill leaves it
    inode = path.stat().st_ino
    _log(path, [4], keep_until_step=3)
    assert [r["step"] for r in CsvLog.read(path)] == ["1", "2", "3", "4"]
    assert path.stat().st_ino != inode  # replaced whole, not truncated and rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_a_fresh_log_replaces_an_old_one(tmp_path):
    path = tmp_path / "log.csv"
    _log(path, range(1, 4))
    _log(path, [1])
    assert [r["step"] for r in CsvLog.read(path)] == ["1"]
    CsvLog(path, ["step", "loss", "lr"], keep_until_step=1)  # other columns: rewritten with the new header
    assert path.read_text().splitlines() == ["step,loss,lr", "1,1,"]  # _fmt wrote 1.0 as 1


def test_a_torn_line_inside_the_kept_steps_is_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "log.csv"
    _log(path, range(1, 3))
    with path.open("a") as handle:
        handle.write("3,0.3")  # complete values, no line end: the kill came before the newline
    _log(path, [4], keep_until_step=3)
    assert [(r["step"], r["loss"]) for r in CsvLog.read(path)] == [("1", "1"), ("2", "0.5"), ("3", "0.3"),
                                                                   ("4", "0.25")]  # fmt: skip
