"""engine.junk_exclusion: the 2D lane's junk taken out of a real map and put back exactly, on real stacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.daemon.state import SessionState
from cryofastar.engine.junk_exclusion import MAX_ROWS_PER_STEP, JunkExclusion, JunkVerdicts, rows_to_change
from cryofastar.engine.live_refinement import LiveRefinement
from cryofastar.engine.streaming_refiner import NEVER, UNREADABLE, StreamingRefiner
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import ParticleSource, write_stack
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles

BOX, APIX, N = 32, 4.0, 24


@pytest.fixture()
def session(tmp_path: Path):
    """N particles in a map at recorded poses, in two stacks on disk (12 each)."""
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)
    sim = simulate_particles(volume, N, APIX, 5.0, torch.Generator().manual_seed(2), max_shift_px=2.0)
    stacks = np.array([str(tmp_path / "a.mrcs")] * 12 + [str(tmp_path / "b.mrcs")] * 12)
    write_stack(tmp_path / "a.mrcs", sim.images[:12], APIX)
    write_stack(tmp_path / "b.mrcs", sim.images[12:], APIX)
    indices = np.concatenate([np.arange(1, 13), np.arange(1, 13)])
    state = SessionState(accumulator=HalfSetAccumulator(BOX, APIX))
    halves = 1 + torch.arange(N) % 2
    rotations = random_rotations(N, torch.Generator().manual_seed(9))
    origins = sim.origins_angstrom.double()
    state.accumulator.add(sim.images, rotations, origins, halves)
    state.poses.append(stacks, indices, rotations, origins, torch.ones(N), halves, None, refined=3)

    def read(rows: np.ndarray) -> torch.Tensor:
        table = state.poses
        return ParticleSource.from_locations(tmp_path, table.stack_paths(rows), table.column("index")[rows], BOX,
                                             APIX).images().all_images()

    def built_from(keep: np.ndarray) -> HalfSetAccumulator:
        acc = HalfSetAccumulator(BOX, APIX)
        acc.add(sim.images[keep], rotations[keep], origins[keep], halves[keep])
        return acc

    return state, JunkExclusion(state, read), stacks, indices, built_from


def _verdicts(stacks, indices, junk, version=1) -> JunkVerdicts:
    return JunkVerdicts(np.asarray(stacks), np.asarray(indices), np.asarray(junk, bool), version)


def test_junk_is_taken_out_exactly_and_put_back_exactly(session) -> None:
    state, exclusion, stacks, indices, built_from = session
    junk = np.zeros(N, bool)
    junk[[0, 5, 13, 20]] = True
    exclusion.offer(_verdicts(stacks, indices, junk))
    assert exclusion.due()
    step = exclusion.step()
    assert (step.removed, step.restored, step.left) == (4, 0, 0) and exclusion.excluded == 4
    assert state.n_particles == N - 4 and not exclusion.due()
    torch.testing.assert_close(state.accumulator.grids, built_from(np.flatnonzero(~junk)).grids, atol=1e-3,
                               rtol=1e-4)
    assert (state.poses.column("excluded") == junk).all()
    # the classes changed their minds about two of them: put back at their poses, to be posed again
    junk[[0, 13]] = False
    exclusion.offer(_verdicts(stacks, indices, junk, version=2))
    step = exclusion.step()
    assert (step.removed, step.restored) == (0, 2) and state.n_particles == N - 2
    torch.testing.assert_close(state.accumulator.grids, built_from(np.flatnonzero(~junk)).grids, atol=1e-3,
                               rtol=1e-4)
    refined = state.poses.column("refined")
    assert refined[0] == NEVER and refined[13] == NEVER and refined[1] == 3


def test_particles_the_verdicts_do_not_name_keep_their_state_and_later_ones_are_taken_out(session) -> None:
    state, exclusion, stacks, indices, _ = session
    # verdicts on stack b only, one of them for a particle the 3D map does not hold yet, one for an unknown stack
    exclusion.offer(_verdicts([stacks[12], stacks[12], "/elsewhere/c.mrcs"], [2, 40, 1], [True, True, True]))
    assert exclusion.step().removed == 1 and exclusion.excluded == 1
    assert state.poses.column("excluded")[13]
    # the map grows (the same verdicts are applied again to what arrived since)
    halves = torch.tensor([1])
    rotation = random_rotations(1, torch.Generator().manual_seed(1))
    state.poses.append(np.array([stacks[12]]), np.array([40]), rotation, torch.zeros(1, 2, dtype=torch.float64),
                       torch.ones(1), halves, None)
    assert exclusion.due()
    remove, restore = rows_to_change(state.poses.stack_names, state.poses.column("stack_id"),
                                     state.poses.column("index"), state.poses.column("excluded"),
                                     state.poses.column("refined"), exclusion.verdicts)
    assert remove.tolist() == [N] and restore.tolist() == []


def test_unreadable_particles_stay_in_the_map_and_are_never_tried_again(session, tmp_path: Path) -> None:
    state, exclusion, stacks, indices, _ = session
    (tmp_path / "a.mrcs").unlink()
    junk = np.zeros(N, bool)
    junk[[1, 2]] = True
    exclusion.offer(_verdicts(stacks, indices, junk))
    step = exclusion.step()
    assert step.removed == 0 and exclusion.excluded == 0 and state.n_particles == N
    assert (state.poses.column("refined")[[1, 2]] == UNREADABLE).all()
    assert rows_to_change(state.poses.stack_names, state.poses.column("stack_id"), state.poses.column("index"),
                          state.poses.column("excluded"), state.poses.column("refined"), exclusion.verdicts
                          )[0].size == 0


def test_excluded_rows_survive_a_checkpoint_and_leave_particles_star(session, tmp_path: Path) -> None:
    state, exclusion, stacks, indices, _ = session
    junk = np.zeros(N, bool)
    junk[[3, 4, 15]] = True
    exclusion.offer(_verdicts(stacks, indices, junk))
    exclusion.step()
    state.geometry = type("G", (), {"box": BOX, "apix": APIX})()
    path = tmp_path / "checkpoint.pt"
    state.save(path)
    loaded = SessionState.load(path)
    assert (loaded.poses.column("excluded") == junk).all() and loaded.n_particles == N - 3
    torch.testing.assert_close(loaded.accumulator.grids, state.accumulator.grids)
    particles, _ = state.poses.to_star(tmp_path, BOX, APIX, {})
    assert len(particles) == N - 3
    names = set(particles["rlnImageName"])
    assert not names & {"000004@a.mrcs", "000005@a.mrcs", "000004@b.mrcs"} and "000005@b.mrcs" in names


def test_refinement_never_picks_an_excluded_particle(session, tmp_path: Path) -> None:
    state, exclusion, stacks, indices, _ = session
    junk = np.ones(N, bool)
    junk[:4] = False
    exclusion.offer(_verdicts(stacks, indices, junk))
    exclusion.step()
    settings = DaemonSettings(watch=tmp_path, out=tmp_path / "out", refine_after=10, refine_box=16,
                              repose_per_pass=50)
    refiner = StreamingRefiner(settings, torch.device("cpu"), poses_from="map-only")
    refiner.phase, refiner.version = "local", 10
    live = LiveRefinement(refiner, state, lambda rows: torch.zeros(len(rows), BOX, BOX), lambda *_: None)
    assert (live._refined()[4:] == UNREADABLE).all() and (live._refined()[:4] == 3).all()
    assert set(refiner.pick_stale(live._refined(), state.poses.column("spread")).tolist()) == {0, 1, 2, 3}


def test_a_large_change_is_spread_over_steps(session, monkeypatch) -> None:
    state, exclusion, stacks, indices, built_from = session
    monkeypatch.setattr("cryofastar.engine.junk_exclusion.MAX_ROWS_PER_STEP", 5)
    exclusion.offer(_verdicts(stacks, indices, np.ones(N, bool)))
    steps = []
    while exclusion.due():
        steps.append(exclusion.step())
    assert [s.removed for s in steps] == [5, 5, 5, 5, 4] and steps[-1].left == 0 and state.n_particles == 0
    assert MAX_ROWS_PER_STEP >= 1000


def test_verdicts_of_unequal_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="unequal lengths"):
        JunkVerdicts(np.array(["a"]), np.array([1, 2]), np.array([True]), 1)
