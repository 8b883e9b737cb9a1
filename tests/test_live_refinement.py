"""Refinement of a live session's map (engine.live_refinement) on real stacks, a real map and the real policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.daemon.state import SessionState
from cryofastar.engine.live_refinement import LiveRefinement
from cryofastar.engine.streaming_refiner import UNREADABLE, StreamingRefiner
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import ParticleSource, write_stack
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles

BOX, APIX, N = 32, 4.0, 24


@pytest.fixture()
def session(tmp_path: Path):
    """A map of N particles at random (wrong) poses, their stack on disk, and a refiner whose reference is the truth."""
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)
    sim = simulate_particles(volume, N, APIX, 5.0, torch.Generator().manual_seed(2), max_shift_px=0.0)
    stack = tmp_path / "a.mrcs"
    write_stack(stack, sim.images, APIX)
    state = SessionState(accumulator=HalfSetAccumulator(BOX, APIX))
    halves = 1 + torch.arange(N) % 2
    wrong = random_rotations(N, torch.Generator().manual_seed(9))
    zero = torch.zeros(N, 2, dtype=torch.float64)
    state.accumulator.add(sim.images, wrong, zero, halves)
    state.poses.append(np.array([str(stack)] * N), np.arange(1, N + 1), wrong, zero, torch.ones(N), halves, None)
    settings = DaemonSettings(watch=tmp_path, out=tmp_path / "out", refine_after=10, refine_box=16,
                              repose_per_pass=10)
    refiner = StreamingRefiner(settings, torch.device("cpu"), poses_from="map-only")
    steps: list[tuple[str, int]] = []

    def read(rows: np.ndarray) -> torch.Tensor:
        table = state.poses
        return ParticleSource.from_locations(tmp_path, table.stack_paths(rows), table.column("index")[rows], BOX,
                                             APIX).images().all_images()

    live = LiveRefinement(refiner, state, read, lambda step, n, seconds: steps.append((step, n)))
    return live, state, sim, volume, halves, steps


def test_nothing_is_refined_before_the_map_holds_enough_particles(session) -> None:
    live, state, sim, _, halves, steps = session
    assert live.refine_pass(sim.images[:4], halves[:4], sim.rotations[:4], sim.origins_angstrom[:4], None, APIX) \
        is None
    assert not live.idle_work_left() and steps == [] and live.moved == 0


def test_reposing_moves_particles_exactly_and_records_the_step(session) -> None:
    live, state, sim, volume, halves, steps = session
    refiner = live.refiner
    refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    refiner.phase = "local"
    assert live.idle_work_left()  # every particle is older than the reference
    live.repose(APIX)
    moved = np.nonzero(state.poses.column("refined") == refiner.version)[0]
    assert len(moved) == 10 and live.moved == 10 and steps == [("repose", 10)]
    # the map is now exactly the one built from scratch with the recorded poses
    rebuilt = HalfSetAccumulator(BOX, APIX)
    rebuilt.add(sim.images, state.poses.rotations(np.arange(N)),
                torch.from_numpy(state.poses.column("origins")), halves)
    torch.testing.assert_close(state.accumulator.grids, rebuilt.grids, atol=1e-3, rtol=1e-4)


def test_a_pass_is_refined_against_the_map_once_refinement_is_active(session) -> None:
    live, _, sim, volume, halves, steps = session
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    live.refiner.phase = "local"
    start = random_rotations(6, torch.Generator().manual_seed(3))
    refined = live.refine_pass(sim.images[:6], halves[:6], start, sim.origins_angstrom[:6], None, APIX)
    assert refined is not None and refined.mode == "global" and refined.rotations.shape == (6, 3, 3)
    assert steps == [("refine", 6)]


def test_particles_whose_stack_is_gone_keep_their_poses_and_are_not_retried(session, tmp_path: Path) -> None:
    live, state, _, volume, _, steps = session
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    live.refiner.phase = "local"
    before = state.accumulator.grids.clone()
    (tmp_path / "a.mrcs").unlink()
    live.repose(APIX)
    assert (state.poses.column("refined")[:10] == UNREADABLE).all() and steps == [] and live.moved == 0
    assert torch.equal(state.accumulator.grids, before)


def test_particles_are_tried_again_when_the_process_is_out_of_file_descriptors(session) -> None:
    """'Too many open files' says nothing about the stack: the particles are re-posed by a later pass."""
    import os
    import resource

    live, state, _, volume, _, steps = session
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    live.refiner.phase = "local"
    before = state.accumulator.grids.clone()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}
    lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next open() fails with EMFILE
    try:
        live.repose(APIX)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not (state.poses.column("refined") == UNREADABLE).any() and steps == [] and live.moved == 0
    assert torch.equal(state.accumulator.grids, before)
    live.repose(APIX)  # descriptors back: the same particles are re-posed
    assert steps == [("repose", 10)] and live.moved == 10
