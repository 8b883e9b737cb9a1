"""rejected.tsv and the recent rejections of status messages (daemon.rejections), on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryofastar.daemon.rejections import REJECTED_NAME, RejectionLog, recent_rejections


def test_recent_rejections_come_back_from_rejected_tsv_after_a_restart(tmp_path):
    path = tmp_path / "rejected.tsv"
    assert len(recent_rejections(path, 3)) == 0  # a new session: none
    rows = [f"{1700000000 + i}.5\t/data/bad_{i}.mrcs\t/data/bad_{i}.mrcs: not a readable MRC" for i in range(5)]
    path.write_text("unix_time\tpath\treason\n" + "\n".join(rows) + "\n17000000", encoding="utf-8")  # torn last line
    recent = list(recent_rejections(path, 3))
    assert [r["path"] for r in recent] == ["/data/bad_3.mrcs", "/data/bad_4.mrcs"]
    assert recent[-1] == {"time": 1700000004.5, "path": "/data/bad_4.mrcs",
                          "reason": "/data/bad_4.mrcs: not a readable MRC"}


def test_the_log_writes_one_header_one_line_per_row_and_keeps_the_last_rows(tmp_path):
    log = RejectionLog(tmp_path, keep=2)
    assert log.recent() == [] and not (tmp_path / REJECTED_NAME).exists()
    entry = log.record(tmp_path / "a.mrcs", "a.mrcs: box 64 px\tdiffers\nfrom 128")
    assert entry["reason"] == "a.mrcs: box 64 px\\tdiffers\\nfrom 128" and entry["path"] == str(tmp_path / "a.mrcs")
    log.record("b.mrcs", "b")
    log.record("c.mrcs", "c")
    lines = (tmp_path / REJECTED_NAME).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "unix_time\tpath\treason" and len(lines) == 4
    assert lines[1].split("\t")[1:] == [str(tmp_path / "a.mrcs"), "a.mrcs: box 64 px\\tdiffers\\nfrom 128"]
    assert float(lines[1].split("\t")[0]) == entry["time"]
    assert [r["path"] for r in log.recent()] == ["b.mrcs", "c.mrcs"]
    assert RejectionLog(tmp_path, keep=2).recent() == log.recent()  # a restarted session shows the same rows


def test_rows_of_concurrent_writers_are_never_interleaved(tmp_path):
    log = RejectionLog(tmp_path, keep=5)

    def write(k: int) -> None:
        for i in range(50):
            log.record(f"/data/t{k}_{i}.mrcs", f"thread {k} row {i} " + "x" * 200)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / REJECTED_NAME).read_text(encoding="utf-8").splitlines()
    assert lines.count("unix_time\tpath\treason") == 1 and len(lines) == 201
    for line in lines[1:]:
        _, path, reason = line.split("\t")
        k, i = path.removeprefix("/data/t").removesuffix(".mrcs").split("_")
        assert reason == f"thread {k} row {i} " + "x" * 200
    assert len(log.recent()) == 5


def test_any_file_name_is_one_utf8_row_and_comes_back_after_a_restart(tmp_path):
    """Issue 20: a name with byte 0xff (a lone surrogate from os.listdir) raised UnicodeEncodeError here; a tab or a
    line break in it split the row."""
    names = [os.fsdecode(b"/w/a\xffb.mrcs"), "/w/a\tb.mrcs", "/w/a\nb.mrcs", "/w/a\u2028b\x85c\x1cd.mrcs"]
    log = RejectionLog(tmp_path, keep=10)
    for name in names:
        log.record(Path(name), f"{name}: its name has a problem")
    lines = (tmp_path / REJECTED_NAME).read_text(encoding="utf-8").splitlines()  # splitlines: every line break
    assert len(lines) == 1 + len(names) and all(len(line.split("\t")) == 3 for line in lines)
    shown = ["/w/a\\xffb.mrcs", "/w/a\\tb.mrcs", "/w/a\\nb.mrcs", "/w/a\\u2028b\\x85c\\x1cd.mrcs"]
    assert [line.split("\t")[1] for line in lines[1:]] == shown
    assert [r["path"] for r in RejectionLog(tmp_path).recent()] == shown == [r["path"] for r in log.recent()]
    assert [r["reason"] for r in log.recent()] == [f"{s}: its name has a problem" for s in shown]


def test_the_same_rejection_is_one_row_however_often_the_session_restarts(tmp_path):
    """Issue 20: every restart re-rejected the same bad files, adding their rows again (rejected.tsv grew)."""
    for _ in range(5):  # five runs of a session over the same directory
        log = RejectionLog(tmp_path, keep=10)
        log.record("/data/bad.mrcs", "/data/bad.mrcs: not a readable MRC")
        log.record("/data/a\tb.mrcs", "/data/a\tb.mrcs: its name has a tab")  # compared as written (escaped)
        log.record("/data/bad.mrcs", "/data/bad.mrcs: not a readable MRC")  # seen again in the same run
    lines = (tmp_path / REJECTED_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and [line.split("\t")[1] for line in lines[1:]] == ["/data/bad.mrcs", "/data/a\\tb.mrcs"]
    assert [r["path"] for r in log.recent()] == ["/data/bad.mrcs", "/data/a\\tb.mrcs"]
    log.record("/data/bad.mrcs", "/data/bad.mrcs: box 64 px differs from 128")  # a new reason: a new row
    assert len((tmp_path / REJECTED_NAME).read_text(encoding="utf-8").splitlines()) == 4
