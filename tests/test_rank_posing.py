"""engine.rank_posing: another rank's first poses of a live session, by rank 0's policy and reference."""

from __future__ import annotations

import pytest
import torch
from cryofastar.daemon.settings import DaemonSettings
from cryofastar.engine.rank_posing import RankPoser
from cryofastar.engine.streaming_refiner import COARSE, RankPolicy, StreamingRefiner
from cryofastar.recon.rotations import geodesic_degrees
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import SimulatedParticles, simulate_particles

BOX, APIX, N = 32, 4.0, 16


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)


@pytest.fixture(scope="module")
def sim(volume: torch.Tensor) -> SimulatedParticles:
    return simulate_particles(volume, N, APIX, None, torch.Generator().manual_seed(2), max_shift_px=1.0)


def _first(poser: RankPoser, sim: SimulatedParticles, network: bool):  # noqa: ANN202 - RefinedPoses | None
    return poser.first_poses(sim.images, 1 + torch.arange(N) % 2, torch.zeros(N, 2, dtype=torch.float64), None,
                             network)


def test_before_rank_zeros_policy_every_pass_goes_in_at_its_own_poses(sim: SimulatedParticles) -> None:
    poser = RankPoser(BOX, torch.device("cpu"))
    assert poser.policy == RankPolicy() and poser.reference is None and poser.version == 0
    assert _first(poser, sim, network=True) is None and _first(poser, sim, network=False) is None
    poser.adopt(RankPolicy(random_mode="coarse", version=1), None)  # coarse, but no reference came yet
    assert _first(poser, sim, network=False) is None


def test_coarse_first_poses_are_a_global_search_of_rank_zeros_reference(volume: torch.Tensor,
                                                                        sim: SimulatedParticles) -> None:
    poser = RankPoser(BOX, torch.device("cpu"))
    halves = torch.stack([volume, volume])
    poser.adopt(RankPolicy(random_mode="coarse", version=1), (halves, APIX, 10.0, 1))
    assert poser.reference is not None and poser.version == 1
    poses = _first(poser, sim, network=False)
    assert poses is not None and poses.mode == "coarse" and poses.version == COARSE
    assert poses.rotations.shape == (N, 3, 3) and poses.origins_angstrom.shape == (N, 2)
    assert poses.scores.shape == poses.spread_degrees.shape == (N,)
    # clean projections: on the 15° grid of the search (measured: median 7.4°, max 14.9°; random poses ~126°)
    error = geodesic_degrees(poses.rotations, sim.rotations)
    assert float(error.median()) < 10.0 and float(error.max()) < 20.0
    assert float((poses.origins_angstrom - sim.origins_angstrom).abs().max()) < APIX  # shifts within a pixel

    assert _first(poser, sim, network=True) is None  # the policy's network mode is own: the network's poses as is

    reference = poser.reference
    poser.adopt(RankPolicy(random_mode="coarse", version=1), (halves * 2, APIX, 10.0, 1))
    assert poser.reference is reference  # the same version: not rebuilt
    poser.adopt(RankPolicy(random_mode="own", version=1), None)
    assert poser.reference is reference and _first(poser, sim, network=False) is None  # the policy alone changed
    poser.adopt(RankPolicy(network_mode="coarse", version=2), (halves, APIX, 12.0, 2))
    assert poser.reference is not reference and poser.version == 2
    assert _first(poser, sim, network=True).mode == "coarse"


def test_a_pass_gets_the_same_first_poses_on_another_rank_as_on_rank_zero(tmp_path, volume: torch.Tensor,
                                                                         sim: SimulatedParticles) -> None:
    """Rank 0's refiner in a hurry and a RankPoser given its rank_policy and reference pose a pass alike."""
    settings = DaemonSettings(watch=tmp_path, out=tmp_path / "out", refine_after=10, refine_box=BOX)
    refiner = StreamingRefiner(settings, torch.device("cpu"), poses_from="map-only")
    refiner.update_reference(torch.stack([volume, volume]), APIX, 10.0, n_particles=N)
    refiner.phase = "local"  # as after the ab initio: random poses are searched
    half_sets, start = 1 + torch.arange(N) % 2, torch.zeros(N, 2, dtype=torch.float64)
    own = refiner.refine(sim.images, half_sets, sim.rotations, start, network=False, hurry=True)
    poser = RankPoser(BOX, torch.device("cpu"))
    poser.adopt(refiner.rank_policy(), (*refiner.reference_source, refiner.version))
    other = poser.first_poses(sim.images, half_sets, start, None, network=False)
    assert own.mode == other.mode == "coarse" and own.version == other.version == COARSE
    assert torch.equal(own.rotations, other.rotations) and torch.equal(own.origins_angstrom, other.origins_angstrom)
    assert torch.equal(own.scores, other.scores)
