"""Pieces of the daemon's status message that a restarted daemon rebuilds from its output folder."""

from __future__ import annotations

import pytest
from cryofastar.daemon.pipeline import Daemon, DaemonSettings, _recent_rejections


def test_recent_rejections_come_back_from_rejected_tsv_after_a_restart(tmp_path):
    path = tmp_path / "rejected.tsv"
    assert len(_recent_rejections(path, 3)) == 0  # a new session: none
    rows = [f"{1700000000 + i}.5\t/data/bad_{i}.mrcs\t/data/bad_{i}.mrcs: not a readable MRC" for i in range(5)]
    path.write_text("unix_time\tpath\treason\n" + "\n".join(rows) + "\n17000000", encoding="utf-8")  # torn last line
    recent = list(_recent_rejections(path, 3))
    assert [r["path"] for r in recent] == ["/data/bad_3.mrcs", "/data/bad_4.mrcs"]
    assert recent[-1] == {"time": 1700000004.5, "path": "/data/bad_4.mrcs",
                          "reason": "/data/bad_4.mrcs: not a readable MRC"}


def test_particles_per_second_covers_the_last_30_s_and_falls_to_zero_when_idle(tmp_path):
    (tmp_path / "watch").mkdir()
    daemon = Daemon(DaemonSettings(watch=tmp_path / "watch", out=tmp_path / "out", poses_from="map-only",
                                   metrics_port=None))
    start = daemon._rate_window[0][0]
    assert daemon._particles_per_second(start + 5) == 0.0  # nothing yet
    for i in range(1, 11):  # 100 particles/s for 10 s
        daemon._rate_window.append((start + i, 100 * i))
    assert daemon._particles_per_second(start + 10) == pytest.approx(100.0)
    assert daemon._particles_per_second(start + 20) == pytest.approx(1000 / 20)  # younger than the window
    assert daemon._particles_per_second(start + 35) == pytest.approx(500 / 30)  # only the last 5 s of it count
    assert daemon._particles_per_second(start + 45) == 0.0  # idle for 35 s
    assert daemon.status()["particles_per_second"] == 0.0
