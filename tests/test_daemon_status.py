"""The daemon's public read-only API and the status a restarted daemon rebuilds from its output folder."""

from __future__ import annotations

import math
import socket

from cryofastar.daemon.pipeline import Daemon, DaemonSettings
from cryofastar.monitoring.subscriber import Subscriber
from cryofastar.protocol import StatusMessage
from test_publisher import receive_matching


def _settings(tmp_path, **kw) -> DaemonSettings:
    (tmp_path / "watch").mkdir(exist_ok=True)
    return DaemonSettings(watch=tmp_path / "watch", out=tmp_path / "out", poses_from="map-only",
                          zmq="tcp://127.0.0.1:0", **{"metrics_port": None, **kw})


def test_a_new_daemon_reports_an_empty_session_before_it_starts(tmp_path):
    settings = _settings(tmp_path)
    daemon = Daemon(settings)
    assert daemon.out == settings.out and daemon.out.is_dir() and daemon.device.type in ("cpu", "cuda")
    assert daemon.address is None and daemon.metrics_port is None and daemon.metrics_url is None
    assert daemon.particles_in_map == 0 and math.isnan(daemon.resolution_angstrom)
    assert daemon.refinement_phase == "waiting" and not daemon.refinement_converged and daemon.errors == []
    status = daemon.status()
    assert status["particles_per_second"] == 0.0 and status["particles_in_map"] == 0
    assert status["rejected_recent"] == [] and status["pose_source"] == "map-only"
    assert status["poses_from"] == "random"  # a map-only session before refinement: random poses, not the map's
    assert status["ranks"] == {"world": 1, "waiting": 0, "from_other_ranks": 0}  # one process


def test_recent_rejections_come_back_in_status_after_a_restart(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rows = [f"{1700000000 + i}.5\t/data/bad_{i}.mrcs\t/data/bad_{i}.mrcs: not a readable MRC" for i in range(25)]
    (out / "rejected.tsv").write_text("unix_time\tpath\treason\n" + "\n".join(rows) + "\n", encoding="utf-8")
    recent = Daemon(_settings(tmp_path)).status()["rejected_recent"]
    assert len(recent) == 20 and recent[0]["path"] == "/data/bad_5.mrcs"  # the last 20 rows
    assert recent[-1] == {"time": 1700000024.5, "path": "/data/bad_24.mrcs",
                          "reason": "/data/bad_24.mrcs: not a readable MRC"}


def test_a_started_daemon_gives_its_addresses_and_publishes_status(tmp_path):
    with socket.socket() as probe:  # a free port for /metrics
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = Daemon(_settings(tmp_path, metrics_port=port, status_seconds=0.1))
    daemon.start()
    try:
        assert daemon.address is not None and daemon.address.startswith("tcp://127.0.0.1:")
        assert daemon.metrics_port == port and daemon.metrics_url == f"http://127.0.0.1:{port}/metrics"
        with Subscriber(daemon.address, topics=("status",)) as subscriber:
            message = receive_matching(subscriber, lambda m: isinstance(m, StatusMessage))
        assert message.status["watch"] == str(tmp_path / "watch") and message.status["files_seen"] == 0
        assert daemon.wait_idle(5.0)
    finally:
        daemon.stop()
    assert daemon.errors == [] and daemon.particles_in_map == 0
