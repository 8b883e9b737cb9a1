"""Refinement of a live session's map (engine.live_refinement) on real stacks, a real map and the real policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.daemon.state import SessionState
from cryofastar.engine.class_posing import ClassPoser, ClassViews
from cryofastar.engine.live_refinement import LiveRefinement
from cryofastar.engine.streaming_refiner import UNREADABLE, StreamingRefiner
from cryofastar.model.evaluation import pose_errors
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io import ParticleSource, write_stack
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
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


def _own_classes(state, sim, keep: int = N) -> ClassViews:
    """Every particle its own class (its image the average, psi and origin 0), naming the first ``keep``."""
    table = state.poses
    return ClassViews(sim.images[:keep], torch.ones(keep), torch.zeros(keep, dtype=torch.bool), np.arange(keep),
                      np.zeros(keep), np.zeros((keep, 2)), stacks=table.stack_paths(np.arange(keep)),
                      indices=table.column("index")[:keep], version=3)


def _classes_session(session):
    live, state, sim, volume, halves, steps = session
    live.refiner.poses_from = "classes"
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    assert live.refiner.wants_class_views and not live.idle_work_left()
    return live, state, sim, halves, steps


def test_class_poses_move_the_named_particles_exactly_then_a_probe_judges_them(session, tmp_path: Path) -> None:
    live, state, sim, halves, steps = _classes_session(session)
    assert live.pose_from_classes(_own_classes(state, sim), ClassPoser.load("classical"), APIX)
    assert not live.wants_class_views  # the set is being applied: no other is asked for
    live.poll(APIX)  # the first (here the only) chunk moves to its class poses
    assert live.moved == N and live.background is None and live.refiner.phase == "classes"
    live.poll(APIX)  # all moved: the probe starts beside the stream
    assert live.background == "class_probe"
    assert live.wait_background(APIX, timeout=120)
    record = live.refiner.class_poses
    assert record["class_set"] == 3 and record["classes_posed"] == N and record["particles"] == N
    assert record["probed"] == N and record["informative"] and record["agree"]
    # informative class poses are confirmed by one random ab initio start on the probed particles (policy); used
    # only if it agrees
    confirmation = record["confirmation"]
    assert confirmation["particles"] == N and confirmation["seconds"] > 0
    assert record["used"] == confirmation["agree"]
    assert live.refiner.phase == ("local" if confirmation["agree"] else "ab-initio")
    assert steps == [("class_poses", N)] and live.moved == 2 * N  # moved to the class poses, then by the probe
    # the map is exactly the one built from scratch with the recorded poses, which are right up to one frame
    rebuilt = HalfSetAccumulator(BOX, APIX)
    poses = state.poses.rotations(np.arange(N))
    rebuilt.add(sim.images, poses, torch.from_numpy(state.poses.column("origins")), halves)
    torch.testing.assert_close(state.accumulator.grids, rebuilt.grids, atol=1e-3, rtol=1e-4)
    assert pose_errors(poses, sim.rotations).geodesic_median_degrees < 25.0  # 32 px, 24 views; chance: 128


def test_a_class_set_naming_too_few_particles_is_passed_over(session, tmp_path: Path) -> None:
    live, state, sim, _, steps = _classes_session(session)
    before = state.accumulator.grids.clone()
    assert not live.pose_from_classes(_own_classes(state, sim, keep=5), ClassPoser.load("classical"), APIX)
    assert live.refiner.wants_class_views and steps == [] and torch.equal(state.accumulator.grids, before)


def test_class_poses_that_fail_send_the_session_to_ab_initio_and_leave_the_map(session, tmp_path: Path) -> None:
    live, state, sim, _, steps = _classes_session(session)
    before = state.accumulator.grids.clone()
    views = _own_classes(state, sim)
    one_class = ClassViews(views.averages, torch.eye(N)[0], views.junk, np.zeros(N, np.int64), views.psi_degrees,
                           views.origins_angstrom, stacks=views.stacks, indices=views.indices)
    assert live.pose_from_classes(one_class, ClassPoser.load("classical"), APIX)  # one class: nothing to pose
    assert live.wait_background(APIX, timeout=10)
    assert live.refiner.phase == "ab-initio" and "at least 2" in live.refiner.class_poses["error"]
    assert steps == [] and torch.equal(state.accumulator.grids, before)


def test_without_a_network_particles_never_refined_are_searched_globally(session) -> None:
    live, state, sim, volume, _, _ = session
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    live.refiner.phase = "local"
    start = state.poses.rotations(np.arange(10))
    state.poses.set_values("refined", np.arange(5), 1)  # refined once (stale): local; rows 5-9 never: global
    live.refiner.version = 2
    state.poses.set_values("refined", np.arange(10, N), 2)  # up to date: not picked
    live.repose(APIX)
    assert (state.poses.column("refined")[:10] == 2).all()
    moved = state.poses.rotations(np.arange(10))
    local_range = live.refiner.search.local_range_degrees
    assert float(geodesic_degrees(moved[:5], start[:5]).max()) <= 2 * local_range  # stayed near where they were
    # random starts searched globally land near the truth (the true map fixes the frame)
    assert float(geodesic_degrees(moved[5:], sim.rotations[5:10]).median()) < 20.0


def test_class_poses_two_decoder_starts_disagree_on_move_nothing_and_turn_to_ab_initio(session, tmp_path: Path):
    live, state, sim, _, steps = _classes_session(session)
    before = state.accumulator.grids.clone()
    views = _own_classes(state, sim)
    noise = torch.randn(views.averages.shape, generator=torch.Generator().manual_seed(1))
    unseen = ClassViews(noise, views.counts, views.junk, views.classes, views.psi_degrees, views.origins_angstrom,
                        stacks=views.stacks, indices=views.indices, version=4)
    assert live.pose_from_classes(unseen, ClassPoser.load("classical"), APIX)
    assert live.wait_background(APIX, timeout=10)
    record = live.refiner.class_poses
    assert live.refiner.phase == "ab-initio" and not record["agree"] and not record["informative"]
    assert not record["used"] and "confirmation" not in record  # untrusted: not probed, not confirmed
    assert record["class_set"] == 4 and "NOT trusted" in record["error"]
    assert steps == [("class_poses", 0)] and live.moved == 0 and torch.equal(state.accumulator.grids, before)


def test_the_ab_initio_starts_beside_the_stream_and_its_poses_are_applied_exactly(session) -> None:
    live, state, sim, volume, halves, steps = session
    live.refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N)
    assert live.refiner.phase == "ab-initio" and live.refiner.needs_bootstrap  # map-only
    before = state.poses.rotations(np.arange(N))
    # a new pass starts it in the background and goes into the map at its own poses, unrefined
    assert live.refine_pass(sim.images[:4], halves[:4], sim.rotations[:4], sim.origins_angstrom[:4], None,
                            APIX) is None
    assert live.background == "ab_initio" and live.refiner.bootstrapping and not live.refiner.needs_bootstrap
    assert not live.idle_work_left()  # nothing to re-pose with until it is done
    live.repose(APIX)  # and re-posing waits for it too
    assert live.moved == 0 and torch.equal(state.poses.rotations(np.arange(N)), before)
    assert live.wait_background(APIX, timeout=120)
    assert live.background is None and live.refiner.ab is not None and steps == [("ab_initio", N)]
    assert live.moved == N and (state.poses.column("refined") == live.refiner.version).all()
    rebuilt = HalfSetAccumulator(BOX, APIX)
    rebuilt.add(sim.images, state.poses.rotations(np.arange(N)), torch.from_numpy(state.poses.column("origins")),
                halves)
    torch.testing.assert_close(state.accumulator.grids, rebuilt.grids, atol=1e-3, rtol=1e-4)
    # from now on new passes are posed by it
    again = live.refine_pass(sim.images[:4], halves[:4], sim.rotations[:4], sim.origins_angstrom[:4], None, APIX)
    assert again is not None and again.mode == "ab-initio"


def _add_ctf_rows(state, sim, halves, k: int = 8):  # noqa: ANN001, ANN202 - test helper
    """Append k particles with a CTF (the first k images again, at random poses) to the map; their CTF."""
    from cryofastar.recon.ctf import CtfParams

    defocus = torch.full((k,), 15_000.0, dtype=torch.float64)

    def each(value: float) -> torch.Tensor:
        return torch.full((k,), value, dtype=torch.float64)

    ctf = CtfParams(defocus, defocus, each(0.0), each(300.0), each(2.7), each(0.1), each(0.0))
    stack = state.poses.stack_paths(np.array([0]))[0]
    wrong = random_rotations(k, torch.Generator().manual_seed(11))
    zero = torch.zeros(k, 2, dtype=torch.float64)
    state.accumulator.add(sim.images[:k], wrong, zero, halves[:k], ctf)
    state.poses.append(np.array([stack] * k), np.arange(1, k + 1), wrong, zero, torch.ones(k), halves[:k], ctf)
    return ctf


def test_a_map_mixing_particles_with_and_without_a_ctf_is_reposed_one_kind_at_a_time(session) -> None:
    """A stack taken bare, then one named by a STAR file: one step re-poses particles of one kind (the more
    numerous first), never marking the others unreadable; the next steps take the rest."""
    live, state, sim, volume, halves, steps = session
    k = 8
    _add_ctf_rows(state, sim, halves, k)
    refiner = live.refiner
    refiner.update_reference(torch.stack([volume, volume]), APIX, 12.0, n_particles=N + k)
    refiner.phase = "local"
    kinds = []
    for _ in range(5):  # 24 without a CTF, 8 with; at most 10 a step, of one kind
        before = state.poses.column("refined").copy()
        live.repose(APIX)
        moved = np.flatnonzero(state.poses.column("refined") != before)
        kinds.append(sorted({bool(row >= N) for row in moved}))
    assert (state.poses.column("refined") != UNREADABLE).all()
    assert kinds[0] == [False] and all(len(kind) == 1 for kind in kinds) and [True] in kinds
    assert (state.poses.column("refined") == refiner.version).all()  # all re-posed after five steps


def test_class_poses_move_a_map_mixing_particles_with_and_without_a_ctf_exactly(session) -> None:
    live, state, sim, halves, steps = _classes_session(session)
    k = 8
    ctf = _add_ctf_rows(state, sim, halves, k)
    table = state.poses
    views = ClassViews(torch.cat([sim.images, sim.images[:k]]), torch.ones(N + k), torch.zeros(N + k, dtype=torch.bool),
                       np.arange(N + k), np.zeros(N + k), np.zeros((N + k, 2)),
                       stacks=table.stack_paths(np.arange(N + k)), indices=table.column("index"), version=3)
    assert live.pose_from_classes(views, ClassPoser.load("classical"), APIX)
    live.poll(APIX)  # the chunk of both kinds moves, one kind at a time
    assert live.moved == N + k
    live.poll(APIX)  # the probe starts, on particles of one kind
    assert live.background == "class_probe" and live.wait_background(APIX, timeout=120)
    assert live.refiner.class_poses["probed"] == N  # the more numerous kind: without a CTF
    rebuilt = HalfSetAccumulator(BOX, APIX)
    rows = np.arange(N + k)
    origins = torch.from_numpy(table.column("origins"))
    rebuilt.add(sim.images, table.rotations(rows[:N]), origins[:N], halves)
    rebuilt.add(sim.images[:k], table.rotations(rows[N:]), origins[N:], halves[:k], ctf)
    torch.testing.assert_close(state.accumulator.grids, rebuilt.grids, atol=1e-3, rtol=1e-4)
