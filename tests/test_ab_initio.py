"""Map-only ab initio (recon/ab_initio/): conventions of the soft search, exact removal, convergence."""

from __future__ import annotations

import pytest
import torch
from cryofastar.model.evaluation import pose_errors
from cryofastar.recon import CtfParams
from cryofastar.recon.ab_initio import AbInitio, AbInitioSettings, SoftPoses, run_ab_initio
from cryofastar.recon.simulate import CtfRange, simulate_particles

APIX = 3.0


def _filled_from_true_poses(phantom: torch.Tensor, sim, halves: torch.Tensor, settings: AbInitioSettings,
                            ctf: CtfParams | None = None) -> AbInitio:
    """An AbInitio whose internal maps were built from particles at their true poses."""
    state = AbInitio(32, APIX, settings)
    small = state._to_working(sim.images)
    state.accumulator.add(small, sim.rotations, sim.origins_angstrom, halves, ctf=ctf)
    state.particles_inside = len(halves)
    state.poses_done = 10**9  # end of the schedule: the finest band
    return state


@pytest.mark.parametrize("with_ctf", [False, True])
def test_search_finds_true_poses_and_origins_of_clean_particles(phantom32: torch.Tensor, with_ctf: bool) -> None:
    """Against a map from true poses, the best candidate is the true pose within the grid step, with its origin."""
    g = torch.Generator().manual_seed(3)
    ctf_range = CtfRange(defocus_min_angstrom=8000.0, defocus_max_angstrom=15000.0) if with_ctf else None
    sim = simulate_particles(phantom32, 600, apix=APIX, snr=None, generator=g, max_shift_px=2.0, ctf=ctf_range)
    halves = 1 + (torch.arange(600) % 2)
    settings = AbInitioSettings(final_resolution_angstrom=9.0, working_box=32, global_step_degrees=15.0,
                                max_shift_angstrom=9.0)
    state = _filled_from_true_poses(phantom32, sim, halves, settings, ctf=sim.ctf)
    new = slice(0, 60)
    poses = state.repose(sim.images[new], halves[new], _true_soft(sim, new, settings.top_k), ctf=None
                         if sim.ctf is None else sim.ctf[new])
    angle = torch.rad2deg(torch.arccos(((poses.rotations * sim.rotations[new]).sum((-2, -1)) - 1).div(2).clamp(-1, 1)))
    assert float(angle.median()) < 8.0  # grid step 15°: nearest grid point is within ~7.5° typically
    assert float((angle < 15.0).float().mean()) > 0.9
    shift_error = (poses.origins_angstrom - sim.origins_angstrom[new]).norm(dim=-1) / APIX
    assert float(shift_error.median()) < 1.0  # px of the session box (shift grid: 1 px)
    assert torch.allclose(poses.candidate_weights.sum(-1), torch.ones(60))
    assert poses.rotations.dtype == torch.float64 and poses.rotations.shape == (60, 3, 3)
    assert poses.origins_angstrom.shape == (60, 2) and poses.scores.shape == (60,)
    assert float(poses.spread_degrees.median()) < 15.0


def _true_soft(sim, index, k: int) -> SoftPoses:
    """SoftPoses with all weight on the true pose (as inserted by _filled_from_true_poses)."""
    rot, org = sim.rotations[index], sim.origins_angstrom[index]
    n = rot.shape[0]
    weights = torch.zeros(n, k)
    weights[:, 0] = 1
    return SoftPoses(rot, org, torch.zeros(n), torch.zeros(n), rot[:, None].repeat(1, k, 1, 1),
                     org[:, None].repeat(1, k, 1), weights)


def test_remove_is_the_exact_inverse_of_add(phantom32: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    sim = simulate_particles(phantom32, 300, apix=APIX, snr=1.0, generator=g, max_shift_px=2.0)
    halves = 1 + (torch.arange(300) % 2)
    state = AbInitio(32, APIX, AbInitioSettings(initial_particles=100, batch_size=100, working_box=16))
    state.add(sim.images[:100], halves[:100])
    before = state.accumulator.grids.clone()
    poses = state.add(sim.images[100:], halves[100:])
    assert (poses.candidate_weights > 0).sum(-1).float().mean() > 1.0  # soft: several candidates inserted
    state.remove(sim.images[100:], halves[100:], poses)
    assert float((state.accumulator.grids - before).abs().max()) < 1e-4 * float(before.abs().max())
    assert state.particles_inside == 100
    resumed = AbInitio.from_state_dict(state.state_dict())
    assert torch.equal(resumed.accumulator.grids, state.accumulator.grids)
    assert (resumed.poses_done, resumed.particles_inside, resumed.working_box) == (300, 100, 16)
    grids = state.accumulator.grids.clone()
    looked = state.match(sim.images[100:], halves[100:], resolution_angstrom=20.0)
    assert torch.equal(state.accumulator.grids, grids) and len(looked) == 200  # match does not insert
    again = state.repose(sim.images[:100], halves[:100], _random_start(state, sim, halves))
    assert len(again) == 100
    with pytest.raises(ValueError, match="previous poses"):
        state.repose(sim.images[:10], halves[:10], again)
    with pytest.raises(ValueError, match="images"):
        state.add(sim.images[:, :16, :16], halves)


def _random_start(state: AbInitio, sim, halves) -> SoftPoses:
    """Rebuild the first 100 particles' random-start poses (same generator seed) to re-pose them."""
    fresh = AbInitio(32, APIX, state.settings)
    return fresh.add(sim.images[:100], halves[:100])


def test_map_only_ab_initio_converges_from_random_poses(phantom32: torch.Tensor) -> None:
    """400 particles at SNR 1 (box 32): random start to a median error well below chance (~100°)."""
    g = torch.Generator().manual_seed(5)
    sim = simulate_particles(phantom32, 400, apix=APIX, snr=1.0, generator=g, max_shift_px=2.0)
    halves = 1 + (torch.arange(400) % 2)
    settings = AbInitioSettings(initial_resolution_angstrom=30.0, final_resolution_angstrom=12.0,
                                schedule_particles=1600, seed_particles=400, seed_passes=6,
                                batch_size=100, initial_particles=100, global_step_degrees=20.0)
    stages = []
    result = run_ab_initio(sim.images, halves, APIX, passes=1, settings=settings,
                           callback=lambda label, poses, seen: stages.append(label))
    errors = pose_errors(result.poses.rotations, sim.rotations)
    assert float(errors.geodesic_degrees.median()) < 16.0  # 10-12° over generator seeds; grid step 20°
    assert stages[:6] == [f"restart 1 seed {i}" for i in range(1, 7)]
    assert "restart 2 seed 6" in stages
    assert result.verdict.converged and result.verdict.restarts == 2  # the two starts found the same map
    assert result.verdict.agreement_degrees < settings.agreement_degrees
    assert sum("restart_score" in h for h in result.history) == 2
    assert result.accumulator.box == 32 and result.accumulator.n_particles == 400
    assert result.poses.origins_angstrom.shape == (400, 2)


def test_ab_initio_on_pure_noise_says_it_did_not_converge() -> None:
    """Images of noise only: every random start settles somewhere else, so the verdict is negative."""
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(200, 32, 32, generator=g)
    settings = AbInitioSettings(particle_diameter_angstrom=40.0, seed_particles=200, seed_passes=3, max_seed_passes=3,
                                seed_restarts=2, max_seed_restarts=3, batch_size=100, initial_particles=100,
                                global_step_degrees=20.0)
    result = run_ab_initio(noise, 1 + (torch.arange(200) % 2), APIX, passes=1, settings=settings)
    verdict = result.verdict
    assert not verdict.converged and verdict.restarts == 3
    assert verdict.agreement_degrees > settings.agreement_degrees and len(verdict.pair_degrees) == 3
    assert "NOT converged" in verdict.summary() and verdict.as_dict()["restarts"] == 3


def test_settings_resolved_ties_the_schedule_to_the_particle_diameter() -> None:
    """Bands, mask and shifts follow the diameter and the box; what is given is kept."""
    s = AbInitioSettings(particle_diameter_angstrom=150.0).resolved(64, 2.0)
    assert (s.initial_resolution_angstrom, s.shared_resolution_angstrom, s.final_resolution_angstrom) == (
        pytest.approx(50.0), pytest.approx(30.0), pytest.approx(15.0))
    assert s.max_shift_angstrom == pytest.approx(0.08 * 64 * 2.0) and s.mask_diameter_angstrom == pytest.approx(180.0)
    small = AbInitioSettings(final_resolution_angstrom=9.0).resolved(64, 1.0, particle_diameter_angstrom=30.0)
    assert small.final_resolution_angstrom == 9.0 and small.initial_resolution_angstrom == pytest.approx(10.0)
    assert small.shared_resolution_angstrom == pytest.approx(6.0)
    assert AbInitioSettings().resolved(64, 1.0, 10.0).final_resolution_angstrom == pytest.approx(2.5)  # 2.5 px floor
