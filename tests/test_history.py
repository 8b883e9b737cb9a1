"""The bounded FSC history (daemon.history) and the files and checkpoint that carry it (daemon.state)."""

from __future__ import annotations

import pytest
import torch
from cryofastar.daemon.history import FSC_HISTORY_ROWS, compact_history
from cryofastar.daemon.ingest import SessionGeometry
from cryofastar.daemon.state import SessionState
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.rotations import random_rotations


def test_a_short_history_is_kept_whole():
    rows = [(float(i), 10 * i, 20.0) for i in range(FSC_HISTORY_ROWS)]
    assert compact_history(rows) == rows


@pytest.mark.parametrize("limit", [2, 3, 10, 1000])
def test_a_history_appended_row_by_row_stays_bounded_spans_the_session_and_keeps_its_order(limit):
    rows: list[tuple[float, int, float]] = []
    for i in range(20 * limit + 7):  # a session far longer than the limit
        rows = compact_history([*rows, (float(i), i, 1.0)], limit)
        assert len(rows) <= limit
    times = [t for t, _, _ in rows]
    assert times[0] == 0.0 and times[-1] == 20 * limit + 6  # the first map and the latest one
    assert times == sorted(set(times))  # in order, no row twice
    recent = limit // 2
    assert times[-recent:] == [float(i) for i in range(20 * limit + 7 - recent, 20 * limit + 7)]  # newest: every map


def test_a_limit_below_two_rows_is_refused():
    with pytest.raises(ValueError, match="at least 2 rows"):
        compact_history([(0.0, 1, 1.0)] * 3, 1)


def _state() -> SessionState:
    state = SessionState(geometry=SessionGeometry(16, 2.0), accumulator=HalfSetAccumulator(16, 2.0,
                                                                                         interpolation="nearest"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 16, 16, generator=generator)
    state.accumulator.add(images, random_rotations(8, generator), torch.zeros(8, 2, dtype=torch.float64),
                          torch.tensor([1, 2] * 4))
    return state


def test_fsc_history_tsv_and_the_checkpoint_stay_bounded_in_a_long_session(tmp_path):
    """Before: one row per map for ever (8,640 rows a day at a map every 10 s), the whole file rewritten at each."""
    state = _state()
    state.fsc_history = [(1.7e9 + 10 * i, i, 30.0) for i in range(3 * FSC_HISTORY_ROWS)]  # an old checkpoint's
    state.save(tmp_path / "checkpoint.pt")
    loaded = SessionState.load(tmp_path / "checkpoint.pt")
    assert len(loaded.fsc_history) <= FSC_HISTORY_ROWS and loaded.fsc_history[0] == state.fsc_history[0]
    assert loaded.fsc_history[-1] == state.fsc_history[-1]
    loaded.write_maps(tmp_path)
    lines = (tmp_path / "fsc_history.tsv").read_text().splitlines()
    assert lines[0] == "unix_time\tparticles\tresolution_angstrom"
    assert len(lines) - 1 == len(loaded.fsc_history) <= FSC_HISTORY_ROWS
    assert int(lines[-1].split("\t")[1]) == 8  # the map just written is the last row
    loaded.fsc_history = loaded.fsc_history + [(1.8e9 + i, 8, 30.0) for i in range(FSC_HISTORY_ROWS)]  # grown
    loaded.write_maps(tmp_path)  # the map that outgrows the limit compacts the history
    lines = (tmp_path / "fsc_history.tsv").read_text().splitlines()
    assert len(lines) - 1 == len(loaded.fsc_history) <= FSC_HISTORY_ROWS
    assert float(lines[1].split("\t")[0]) == pytest.approx(state.fsc_history[0][0])  # still the session's start
