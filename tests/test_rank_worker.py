"""daemon.rank_worker's 2D part: a real RankWorker (its watcher on a real directory, its reader, poser and classifier
threads) in a real 2-rank gloo group, its syncs led by hand from rank 0 (tests/distributed_helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import distributed_helpers as helpers
import mrcfile
import pytest
from cryofastar.engine import distributed as d
from test_classify2d import _two_views


@pytest.fixture(scope="module")
def watch(tmp_path_factory) -> Path:
    """24 bare stacks of 50 particles (two views of a phantom, box 32, SNR 0.5) in a directory."""
    folder = tmp_path_factory.mktemp("watch")
    sim, _, _ = _two_views(1200, snr=0.5, seed=4)
    for k in range(24):
        with mrcfile.new(folder / f"stack_{k}.mrcs") as mrc:
            mrc.set_data(sim.images[50 * k: 50 * (k + 1)].numpy())
            mrc.voxel_size = 3.0
    return folder


@pytest.mark.parametrize("give_up", [False, True])
def test_every_particle_a_rank_reads_reaches_the_2d_lane_once_classified_there_or_by_location(
        watch: Path, tmp_path: Path, give_up: bool) -> None:
    """Classes sent at the first sync: rank 1 aligns what it reads against them and hands over rows and sums, which
    rank 0's classifier takes exactly (what its queue cannot hold goes by location). When rank 0's lane stops taking
    particles mid-share, rank 1 hands back by location what it had aligned and not handed over, and the rest."""
    session = tmp_path / "session"
    session.mkdir()
    for stack in watch.glob("*.mrcs"):
        shutil.copy(stack, session / stack.name)
    root = d.launch(2, helpers.follow_classes, str(session), give_up)[0]
    share = root["share"]
    assert root["inserted"] == len(share) > 400
    assert sorted(root["classified"] + root["located"]) == share  # each of rank 1's particles once
    assert root["rows"] == 1200 - len(share) + len(root["classified"])
    assert root["sums"] < 1e-6  # rank 0's sums: what its table says, rank 1's rows moved to its frame
    assert not root["late"] and len(root["classified"]) > 0
    if give_up:
        assert len(root["located"]) > 0
