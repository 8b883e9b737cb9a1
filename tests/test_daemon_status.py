"""Pieces of the daemon's status message that a restarted daemon rebuilds from its output folder."""

from __future__ import annotations

from cryofastar.daemon.pipeline import _recent_rejections


def test_recent_rejections_come_back_from_rejected_tsv_after_a_restart(tmp_path):
    path = tmp_path / "rejected.tsv"
    assert len(_recent_rejections(path, 3)) == 0  # a new session: none
    rows = [f"{1700000000 + i}.5\t/data/bad_{i}.mrcs\t/data/bad_{i}.mrcs: not a readable MRC" for i in range(5)]
    path.write_text("unix_time\tpath\treason\n" + "\n".join(rows) + "\n17000000", encoding="utf-8")  # torn last line
    recent = list(_recent_rejections(path, 3))
    assert [r["path"] for r in recent] == ["/data/bad_3.mrcs", "/data/bad_4.mrcs"]
    assert recent[-1] == {"time": 1700000004.5, "path": "/data/bad_4.mrcs",
                          "reason": "/data/bad_4.mrcs: not a readable MRC"}
