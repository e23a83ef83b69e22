"""The training CSV log: appended, never rewritten in place."""

from __future__ import annotations

from biounet.training import CsvLog

FIELDS = ["step", "loss"]


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
