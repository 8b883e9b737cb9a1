"""The status message's body (daemon.reporting): particle rate, view directions, counts, the assembled report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryofastar.daemon.ingest import SessionGeometry
from cryofastar.daemon.metrics import DaemonMetrics
from cryofastar.daemon.rejections import RejectionLog
from cryofastar.daemon.reporting import COUNTS, RateWindow, StatusBoard, ViewDirections, refinement_status
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.daemon.state import SessionState
from cryofastar.engine.pose_table import PoseTable
from cryofastar.engine.streaming_refiner import StreamingRefiner
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.pose_precision import pose_precision
from cryofastar.recon.rotations import random_rotations


def _poses(n: int, seed: int = 0) -> PoseTable:
    table = PoseTable()
    rotations = random_rotations(n, torch.Generator().manual_seed(seed))
    table.append(np.array(["/a.mrcs"] * n), np.arange(1, n + 1), rotations, torch.zeros(n, 2, dtype=torch.float64),
                 torch.ones(n), 1 + torch.arange(n) % 2, None)
    return table


def _board(tmp_path, metrics: DaemonMetrics | None = None) -> StatusBoard:
    return StatusBoard(metrics or DaemonMetrics(), RejectionLog(tmp_path), watch=tmp_path / "watch", device="cpu",
                       poses_from="map-only", model=None, model_box=None, particles_in_map=0, status_seconds=1.0)


def test_particles_per_second_covers_the_last_30_s_and_falls_to_zero_when_idle():
    window = RateWindow(0, now=1000.0)
    assert window.started == 1000.0 and window.per_second(1005.0) == 0.0  # nothing yet
    for i in range(1, 11):  # 100 particles/s for 10 s
        window.add(1000.0 + i, 100 * i)
    assert window.per_second(1010.0) == pytest.approx(100.0)
    assert window.per_second(1020.0) == pytest.approx(1000 / 20)  # younger than the window
    assert window.per_second(1035.0) == pytest.approx(500 / 30)  # only the last 5 s of it count
    assert window.per_second(1045.0) == 0.0  # idle for 35 s
    assert RateWindow(0, now=5.0).per_second(5.0) == 0.0  # no time has passed


def test_the_rate_window_holds_only_its_last_seconds_even_if_never_read():
    """Issue 20 (bounded resources): points were dropped only when the rate was read, so a window nobody read
    kept one point per insertion for the whole session."""
    window = RateWindow(0, now=0.0, seconds=30.0)
    for i in range(1, 100_001):  # a day of insertions, one per second, never read
        window.add(float(i), 10 * i)
    assert len(window._points) <= 32 and window.particles == 1_000_000
    assert window.per_second(100_000.0) == pytest.approx(10.0)


def test_view_directions_are_recomputed_only_when_poses_changed_and_the_period_passed():
    views = ViewDirections(period_seconds=1.0)
    assert views.histogram is None
    assert views.update(edits=10, poses=_poses(10), now=0.0)
    first = views.histogram
    assert sum(map(sum, first["counts"])) == 10 and len(first["azimuth_edges_degrees"]) == 37
    assert not views.update(edits=10, poses=_poses(30), now=5.0)  # no change since
    assert not views.update(edits=30, poses=_poses(30), now=0.5)  # within the period
    assert views.histogram is first
    assert views.update(edits=30, poses=_poses(30), now=0.5, force=True)
    assert sum(map(sum, views.histogram["counts"])) == 30


def test_counts_go_to_the_report_and_to_their_prometheus_counters(tmp_path):
    metrics = DaemonMetrics()
    board = _board(tmp_path, metrics)
    board.count("particles_posed", 7)
    board.count("particles_posed", 3)
    board.count("particles_rejected", 2)
    assert board.total("particles_posed") == 10 and board.total("particles_refined") == 0
    assert metrics.total("particles_posed") == 10.0 and metrics.total("particles_rejected") == 2.0
    with pytest.raises(ValueError, match="unknown count"):
        board.count("maps_published", 1)  # a counter of its own, not one of this run's totals


def test_the_report_carries_the_session_its_counts_and_its_rejections(tmp_path):
    board = _board(tmp_path)
    board.count("particles_ingested", 40)
    board.rejections.record(tmp_path / "bad.mrcs", "bad.mrcs: not a readable MRC")
    state = SessionState(counters={"files_seen": 3, "files_rejected": 1})
    refiner = StreamingRefiner(DaemonSettings(watch=tmp_path, out=tmp_path / "out", poses_from="map-only"),
                               torch.device("cpu"))
    status = board.report(state, {"files": 1, "chunks": 0, "posed": 2}, files_pending=4,
                          refinement=refinement_status(refiner), geometry=SessionGeometry(64, 1.5))
    assert list(status) == ["particles_in_map", *COUNTS, "refinement", "particles_per_second", "files_seen",
                            "files_rejected", "files_pending", "queues", "resolution_angstrom", "box", "apix",
                            "model_box", "poses_from", "pose_source", "model", "watch", "device", "rejected_recent",
                            "views", "classification",
                            "uptime_seconds"]
    assert status["particles_ingested"] == 40 and status["particles_in_map"] == 0
    assert (status["files_seen"], status["files_rejected"], status["files_pending"]) == (3, 1, 4)
    assert status["queues"] == {"files": 1, "chunks": 0, "posed": 2}
    assert (status["box"], status["apix"]) == (64, 1.5)  # the reader's geometry while the map has none
    assert status["resolution_angstrom"] is None and status["views"] is None
    assert status["pose_source"] == "map-only" and status["model"] is None and status["device"] == "cpu"
    assert status["poses_from"] == "random"  # waiting for --refine-after particles: random poses
    assert status["refinement"] == {"active": False, "phase": "waiting", "background": None, "reference_version": 0,
                                    "network_informative": None, "working_box": None, "band_angstrom": None,
                                    "ab_initio": None, "class_poses": None, "pose_precision": None}
    precise = refinement_status(refiner, pose_precision(torch.tensor([3.0, 5.0, float("nan")])))["pose_precision"]
    assert precise["particles"] == 2 and precise["median_spread_degrees"] == 4.0 and precise["precise"]
    assert precise["summary"].startswith("poses precise: estimated median error 3.6°")
    assert [r["path"] for r in status["rejected_recent"]] == [str(tmp_path / "bad.mrcs")]
    assert status["watch"] == str(tmp_path / "watch") and status["uptime_seconds"] >= 0
    state.fsc_history.append((0.0, 10, math.inf))  # an undefined resolution is sent as unknown
    assert board.report(state, {}, 0, {})["resolution_angstrom"] is None
    state.fsc_history.append((1.0, 20, 7.5))
    assert board.report(state, {}, 0, {})["resolution_angstrom"] == 7.5


def test_particles_in_map_is_the_last_settled_count_not_one_read_while_particles_are_reposed(tmp_path):
    """Re-posing removes particles from the grids and inserts them again: a status message sent in between
    must not show the map shrinking (it once showed 3,872 of 4,000 for a moment during the demo)."""
    board = _board(tmp_path)
    state = SessionState(accumulator=HalfSetAccumulator(16, 2.0))
    images, rotations = torch.randn(8, 16, 16), random_rotations(8, torch.Generator().manual_seed(1))
    zero, halves = torch.zeros(8, 2, dtype=torch.float64), 1 + torch.arange(8) % 2
    state.accumulator.add(images, rotations, zero, halves)
    board.rate.add(1.0, state.n_particles)  # what the accumulator thread records after a pass
    state.accumulator.remove(images[:3], rotations[:3], zero[:3], halves[:3])  # half-way through re-posing 3
    assert state.n_particles == 5
    assert board.report(state, {}, 0, {})["particles_in_map"] == 8 and board.rate.particles == 8


@pytest.mark.parametrize(("source", "phase", "expected"), [
    ("network", "off", "network"), ("network", "waiting", "network"), ("network", "probe", "network"),
    ("network", "ab-initio", "map-only ab initio"), ("network", "local", "refined"),
    ("map-only", "waiting", "random"), ("map-only", "ab-initio", "map-only ab initio"),
    ("map-only", "local", "refined")])
def test_poses_from_says_where_the_maps_poses_come_from_in_each_phase(tmp_path, source, phase, expected):
    """Issue 20: the dashboard said 'poses from: network' while a network session ran its map-only ab initio."""
    board = StatusBoard(DaemonMetrics(), RejectionLog(tmp_path), watch=tmp_path, device="cpu", poses_from=source,
                        model=None, model_box=None, particles_in_map=0, status_seconds=1.0)
    refiner = StreamingRefiner(DaemonSettings(watch=tmp_path, out=tmp_path / "out", poses_from=source),
                               torch.device("cpu"), poses_from=source)
    refiner.phase = phase  # as the refiner moves it (a probe that finds the network uninformative: ab-initio)
    status = board.report(SessionState(), {}, files_pending=0, refinement=refinement_status(refiner))
    assert (status["poses_from"], status["pose_source"]) == (expected, source)
