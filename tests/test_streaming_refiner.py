"""The streaming refinement policy (engine.streaming_refiner)."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.engine.policy import CLASS_POSES_WAIT_SECONDS
from cryofastar.engine.streaming_refiner import COARSE, RankPolicy, StreamingRefiner
from cryofastar.recon.io import ParticleFileError, ParticleSource, write_stack
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles


def _settings(tmp_path: Path, **kw) -> DaemonSettings:
    return DaemonSettings(watch=tmp_path, out=tmp_path / "out", **kw)


def test_stale_particles_are_picked_never_refined_first_then_oldest_map_least_sure(tmp_path):
    refiner = StreamingRefiner(_settings(tmp_path, repose_per_pass=4), torch.device("cpu"))
    refiner.version = 3
    refined = np.array([3, 0, 1, 0, 2, 1, 3])
    spread = np.array([1.0, np.nan, 5.0, np.nan, 1.0, 9.0, 1.0])
    assert refiner.pick_stale(refined, spread).tolist() == [1, 3, 5, 2]
    assert len(StreamingRefiner(_settings(tmp_path, repose_per_pass=0), torch.device("cpu"))
               .pick_stale(refined, spread)) == 0


def test_refinement_starts_with_enough_particles_and_probes_the_network(tmp_path):
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    halves = torch.stack([volume, volume])
    sim = simulate_particles(volume, 16, apix, 2.0, torch.Generator().manual_seed(2), max_shift_px=1.0)
    half_sets = 1 + torch.arange(16) % 2

    good = StreamingRefiner(_settings(tmp_path, refine_after=100, refine_box=32, probe_every=2), torch.device("cpu"))
    good.update_reference(halves, apix, 10.0, n_particles=50)
    assert not good.active and good.phase == "waiting"  # too few particles
    good.update_reference(halves, apix, 10.0, n_particles=100)
    assert good.active and good.phase == "probe" and good.network_informative is None
    probe = good.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom)
    assert probe.mode == "best" and good.network_informative and good.phase == "local"
    assert float(geodesic_degrees(probe.rotations, sim.rotations).median()) < 6.0
    assert good.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom).mode == "local"
    assert good.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom).mode == "best"  # every 2nd

    bad = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=32), torch.device("cpu"))
    bad.update_reference(halves, apix, 10.0, n_particles=16)
    random_poses = random_rotations(16, torch.Generator().manual_seed(3))
    assert bad.refine(sim.images, half_sets, random_poses, torch.zeros(16, 2)).mode == "best"
    assert bad.network_informative is False and bad.phase == "ab-initio" and bad.needs_bootstrap
    rows = np.arange(16)
    work = bad.bootstrap_work(sim.images, half_sets, None, apix)  # on the particles "already in the map"
    assert bad.bootstrapping and not bad.needs_bootstrap  # one at a time: none other is due while it runs
    started = bad.finish_bootstrap(work(), rows)
    assert started.mode == "ab-initio" and started.soft is not None and not bad.needs_bootstrap
    assert not bad.bootstrapping
    again = bad.repose(sim.images, half_sets, started.rotations, started.origins_angstrom, None, rows)
    assert again.mode == "ab-initio" and again.version > started.version and len(again.soft) == 16
    new = bad.refine(sim.images[:4], half_sets[:4], random_poses[:4], torch.zeros(4, 2))
    assert new.mode == "ab-initio" and new.rotations.shape == (4, 3, 3)
    assert not bad.maybe_finish_ab_initio(np.full(16, again.version))  # its schedule has not run out
    hurried = bad.refine(sim.images[:4], half_sets[:4], random_poses[:4], torch.zeros(4, 2), hurry=True)
    assert hurried.mode == "ab-initio"  # before it has run out, the ab initio poses new passes even in a hurry
    bad.ab.poses_done = bad.ab_settings.schedule_particles  # as if it had
    last = bad.repose(sim.images, half_sets, again.rotations, again.origins_angstrom, None, rows)
    hurried = bad.refine(sim.images[:4], half_sets[:4], random_poses[:4], torch.zeros(4, 2), network=False,
                         hurry=True)  # now: a coarse search of the latest map, the ab initio poses them later
    assert hurried.mode == "coarse" and hurried.version == COARSE and bad.phase == "ab-initio"
    assert not bad.maybe_finish_ab_initio(np.full(16, again.version))  # not every particle posed since
    assert bad.maybe_finish_ab_initio(np.full(16, last.version))
    assert bad.phase == "local" and bad.ab is None and bad.reference is None and bad.wants_reference(16)


def test_as_many_particles_as_pixels_a_side_are_reposed_as_images_not_as_a_map(tmp_path):
    # regression: 128 re-posed particles of box 128 were once Fourier-cropped as one cubic map (IndexError)
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    sim = simulate_particles(volume, box, apix, 2.0, torch.Generator().manual_seed(4))
    half_sets, rows = 1 + torch.arange(box) % 2, np.arange(box)
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=16), torch.device("cpu"))
    refiner.update_reference(torch.stack([volume, volume]), apix, 10.0, n_particles=box)
    refiner.phase = "ab-initio"
    started = refiner.finish_bootstrap(refiner.bootstrap_work(sim.images, half_sets, None, apix)(), rows)
    again = refiner.repose(sim.images, half_sets, started.rotations, started.origins_angstrom, None, rows)
    assert again.rotations.shape == (box, 3, 3) and len(again.soft) == box


def test_images_are_read_again_per_stack(tmp_path):
    images = torch.randn(5, 8, 8)
    write_stack(tmp_path / "a.mrcs", images, 1.0)
    write_stack(tmp_path / "b.mrcs", -images, 1.0)
    names = np.array([str(tmp_path / "a.mrcs"), str(tmp_path / "b.mrcs")], dtype=object)
    source = ParticleSource.from_locations(tmp_path, names[[1, 0, 1]], np.array([2, 5, 1]), 8, 1.0)
    got = source.images().all_images()
    assert torch.equal(got, torch.stack([-images[1], images[4], -images[0]]))
    with pytest.raises(ParticleFileError):
        ParticleSource.from_locations(tmp_path, names[[0]], np.array([9]), 8, 1.0).images()


def test_a_bootstrap_that_fails_leaves_the_session_to_global_search(tmp_path):
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=16), torch.device("cpu"),
                               poses_from="map-only")
    refiner.phase = "ab-initio"
    refiner.bootstrap_work(torch.randn(4, 16, 16), 1 + torch.arange(4) % 2, None, 4.0)
    assert refiner.finish_bootstrap(None, np.arange(4)) is None
    assert refiner.phase == "local" and refiner.ab is None and not refiner.bootstrapping


def test_in_a_hurry_a_pass_gets_a_first_pose_only_and_the_network_runs_only_when_used(tmp_path):
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    sim = simulate_particles(volume, 8, apix, 2.0, torch.Generator().manual_seed(2), max_shift_px=1.0)
    half_sets = 1 + torch.arange(8) % 2
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=32, probe_every=4), torch.device("cpu"))
    assert refiner.wants_network_poses(1)  # before refinement starts the network's poses go in
    refiner.update_reference(torch.stack([volume, volume]), apix, 10.0, n_particles=10)
    assert refiner.phase == "probe" and refiner.wants_network_poses(1)  # for the probe
    probe = refiner.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom, hurry=True)
    assert probe.mode == "best" and refiner.phase == "local"  # the session's first probe runs even in a hurry
    refiner._probes = collections.deque([0.9])  # informative
    assert refiner.wants_network_poses(1) and refiner.wants_network_poses(2)
    assert refiner.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom, hurry=True) is None  # as is
    refiner._probes = collections.deque([0.1])  # uninformative: only every probe_every-th pass, to probe it
    assert [refiner.wants_network_poses(c) for c in range(1, 9)] == [False, False, False, True] * 2
    start = random_rotations(8, torch.Generator().manual_seed(1))
    first = refiner.refine(sim.images, half_sets, start, torch.zeros(8, 2), network=False, hurry=True)
    assert first.mode == "coarse" and first.version == COARSE  # re-posed first, locally
    assert refiner.refine(sim.images, half_sets, sim.rotations, torch.zeros(8, 2), network=False).mode == "global"
    assert refiner.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom).mode == "best"  # the probe
    refiner.phase = "ab-initio"
    assert not refiner.wants_network_poses(4)  # the ab initio poses everything: the network is not run
    for source in ("map-only", "classes"):
        assert not StreamingRefiner(_settings(tmp_path), torch.device("cpu"), poses_from=source).wants_network_poses(1)
    assert refiner.pick_stale(np.array([COARSE, 0, 3]), np.full(3, np.nan)).tolist() == [0, 1]  # coarse ones first


def test_a_session_restarted_past_its_ab_initio_resumes_in_the_local_phase(tmp_path):
    from cryofastar.daemon.pipeline import Daemon
    from cryofastar.daemon.state import CHECKPOINT_NAME, SessionState

    settings = _settings(tmp_path, poses_from="map-only", metrics_port=None)
    assert Daemon(settings).refinement_phase == "waiting"  # a new session
    (tmp_path / "out").mkdir(exist_ok=True)
    SessionState(counters={"refinement_local": 1}).save(tmp_path / "out" / CHECKPOINT_NAME)
    assert Daemon(settings).refinement_phase == "local"


def test_ab_initio_that_did_not_converge_starts_again_once_the_map_holds_a_larger_seed_set(tmp_path):
    """Noise only: the verdict is negative, so a second bootstrap on twice the seed set is due (and then no more)."""
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=16), torch.device("cpu"),
                               poses_from="map-only")
    refiner.phase = "ab-initio"
    noise = torch.randn(40, 16, 16, generator=torch.Generator().manual_seed(4))
    half_sets = 1 + torch.arange(40) % 2
    assert refiner.needs_bootstrap and refiner.ab_verdict is None and refiner.seed_particles == 1000
    refiner.finish_bootstrap(refiner.bootstrap_work(noise, half_sets, None, 4.0)(), np.arange(40))
    assert refiner.ab_verdict is not None and not refiner.ab_verdict.converged
    assert refiner.seed_particles == 2000 and not refiner.retry_due(1999) and refiner.retry_due(2000)
    work = refiner.bootstrap_work(noise, half_sets, None, 4.0)  # the second and last attempt
    assert not refiner.retry_due(2000)  # not while it runs
    refiner.finish_bootstrap(work(), np.arange(40))
    assert not refiner.ab_verdict.converged and not refiner.retry_due(10_000)


def test_a_classes_session_waits_for_its_classes_then_gives_up_for_ab_initio_if_none_come(tmp_path):
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=16, poses_from="classes"),
                               torch.device("cpu"), poses_from="classes")
    assert refiner.phase == "waiting" and not refiner.wants_class_views
    refiner.update_reference(torch.stack([volume, volume]), apix, 12.0, n_particles=20)
    # nothing is refined while the session waits for settled classes: new passes go in at their random poses
    assert refiner.phase == "classes" and refiner.wants_class_views and not refiner.active
    assert not refiner.wants_reference(100)
    assert not refiner.classes_overdue() and refiner.classes_overdue(time.monotonic() + CLASS_POSES_WAIT_SECONDS + 1)
    refiner.give_up_classes("the 2D lane failed (boom)")
    assert refiner.phase == "ab-initio" and refiner.needs_bootstrap and refiner.active
    assert refiner.class_poses == {"error": "the 2D lane failed (boom)", "informative": False, "used": False}


def test_the_hurried_mode_and_the_other_ranks_policy_follow_the_phase(tmp_path):
    """hurried_mode/rank_policy (watch --nproc) per phase; refine(hurry=True) skips a pass exactly when 'own'."""
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    halves = torch.stack([volume, volume])
    sim = simulate_particles(volume, 8, apix, 2.0, torch.Generator().manual_seed(2), max_shift_px=1.0)
    half_sets, start = 1 + torch.arange(8) % 2, random_rotations(8, torch.Generator().manual_seed(1))

    def modes(refiner: StreamingRefiner) -> tuple[str, str]:
        return refiner.hurried_mode(True), refiner.hurried_mode(False)

    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=32), torch.device("cpu"))
    assert refiner.phase == "waiting" and modes(refiner) == ("own", "own")
    assert refiner.rank_policy() == RankPolicy(True, "own", "own", 0) and refiner.reference_source is None
    refiner.update_reference(halves, apix, 10.0, n_particles=9)  # too few particles: no reference
    assert refiner.reference_source is None and refiner.rank_policy().version == 0
    refiner.update_reference(halves, apix, 10.0, n_particles=10)
    assert refiner.phase == "probe" and modes(refiner) == ("own", "own")
    assert refiner.rank_policy() == RankPolicy(True, "own", "own", 1)
    source = refiner.reference_source
    assert source[0] is halves and source[1:] == (apix, 10.0) and type(source[1]) is float

    probe = refiner.refine(sim.images, half_sets, sim.rotations, sim.origins_angstrom, hurry=True)
    assert probe.mode == "best" and refiner.phase == "local" and refiner.network_informative
    assert modes(refiner) == ("own", "coarse")
    assert refiner.rank_policy() == RankPolicy(True, "own", "coarse", 1)
    refiner._probes = collections.deque([0.1])  # a later probe found the network uninformative
    assert modes(refiner) == ("coarse", "coarse")
    assert refiner.rank_policy() == RankPolicy(False, "coarse", "coarse", 1)  # the others pose at random
    for won in (0.9, 0.1):  # in a hurry, refine() leaves a pass unrefined exactly when the policy says 'own'
        refiner._probes = collections.deque([won])
        for network in (True, False):
            poses = refiner.refine(sim.images, half_sets, sim.rotations if network else start, torch.zeros(8, 2),
                                   network=network, hurry=True)
            assert (poses is None) == (refiner.hurried_mode(network) == "own"), (won, network)
            assert poses is None or (poses.mode == "coarse" and poses.version == COARSE)
    refiner.update_reference(halves, apix, 8.0, n_particles=20)
    assert refiner.rank_policy().version == 2 and refiner.reference_source[2] == 8.0

    refiner.phase = "ab-initio"  # its schedule runs: its own poses (the ab initio poses them when re-posed)
    assert modes(refiner) == ("own", "own")
    assert refiner.rank_policy() == RankPolicy(False, "own", "own", refiner.version)
    refiner._final_band_version = refiner.version  # its schedule has run out: a coarse search of the latest map
    assert modes(refiner) == ("coarse", "coarse")
    assert refiner.rank_policy() == RankPolicy(False, "coarse", "coarse", refiner.version)
    assert refiner.maybe_finish_ab_initio(np.full(4, refiner.version))  # local, waiting for its next reference
    assert modes(refiner) == ("own", "own") and refiner.rank_policy() == RankPolicy(False, "own", "own", 0)
    refiner._probes = collections.deque([0.9])
    assert refiner.rank_policy() == RankPolicy(True, "own", "own", 0)


@pytest.mark.parametrize("poses_from", ["map-only", "classes"])
def test_sessions_without_the_network_never_ask_the_other_ranks_for_its_poses(tmp_path, poses_from):
    box, apix = 32, 4.0
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), box, apix)
    refiner = StreamingRefiner(_settings(tmp_path, refine_after=10, refine_box=16, poses_from=poses_from),
                               torch.device("cpu"), poses_from=poses_from)
    assert refiner.rank_policy() == RankPolicy(False, "own", "own", 0)
    refiner.update_reference(torch.stack([volume, volume]), apix, 12.0, n_particles=20)
    assert refiner.phase == {"map-only": "ab-initio", "classes": "classes"}[poses_from]
    assert refiner.rank_policy() == RankPolicy(False, "own", "own", 1)
    refiner.phase = "local"  # after the ab initio or the class poses
    assert refiner.rank_policy() == RankPolicy(False, "coarse", "coarse", 1)


def test_without_refinement_the_other_ranks_use_the_sessions_own_poses(tmp_path):
    for poses_from, network in (("network", True), ("map-only", False)):
        refiner = StreamingRefiner(_settings(tmp_path, refine=False, poses_from=poses_from), torch.device("cpu"),
                                   poses_from=poses_from)
        assert refiner.phase == "off" and refiner.rank_policy() == RankPolicy(network, "own", "own", 0)
