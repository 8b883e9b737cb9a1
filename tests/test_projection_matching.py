"""Orientation grids and classical projection matching (recon), on clean simulated particles."""

from __future__ import annotations

import pytest
import torch
from cryofastar.model.rotations import geodesic_degrees
from cryofastar.recon.orientation_grids import global_rotation_grid, local_rotation_grid
from cryofastar.recon.projection_matching import match_projections
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, random_rotations
from cryofastar.recon.simulate.particles import simulate_particles

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)


def test_global_grid_covers_so3_at_its_step():
    grid = global_rotation_grid(20.0)
    probes = random_rotations(200, torch.Generator().manual_seed(0))
    nearest = geodesic_degrees(probes[:, None], grid[None]).min(dim=1).values
    assert float(nearest.max()) < 20.0 and float(nearest.median()) < 12.0
    assert torch.allclose(grid @ grid.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(grid),
                          atol=1e-9)
    with pytest.raises(ValueError, match="step"):
        global_rotation_grid(0.0)


def test_local_grid_is_a_ball_around_the_identity():
    grid = local_rotation_grid(6.0, 2.0)
    angles = geodesic_degrees(grid, torch.eye(3, dtype=torch.float64).expand_as(grid))
    assert float(angles[0]) == pytest.approx(0.0, abs=1e-9) and float(angles.max()) <= 6.0 + 1e-6
    assert len(grid) == 123  # grid points of spacing 1 inside a ball of radius 3
    with pytest.raises(ValueError, match="step"):
        local_rotation_grid(2.0, 3.0)


def test_local_search_recovers_known_poses_and_shifts(volume):
    generator = torch.Generator().manual_seed(1)
    sim = simulate_particles(volume, 4, APIX, None, generator, max_shift_px=3.0)
    kick = local_rotation_grid(7.0, 7.0)[1:5]  # start 7° away from the truth
    start = sim.rotations @ kick
    assert bool((geodesic_degrees(start, sim.rotations) > 6.9).all())
    coarse = match_projections(sim.images, volume, start[:, None] @ local_rotation_grid(9.0, 3.0)[None], APIX)
    fine = match_projections(sim.images, volume, coarse.rotations[:, None] @ local_rotation_grid(2.0, 0.5)[None],
                             APIX)
    assert float(geodesic_degrees(fine.rotations, sim.rotations).max()) < 2.0
    true_origins = sim.origins_angstrom / APIX
    assert float((fine.origins_px - true_origins).abs().max()) <= 0.5 + 1e-6  # integer shifts: nearest pixel
    assert bool((fine.scores > 0.95).all()) and fine.all_scores.shape == (4, len(local_rotation_grid(2.0, 0.5)))


def test_global_search_finds_the_neighbourhood_of_any_pose(volume):
    sim = simulate_particles(volume, 3, APIX, None, torch.Generator().manual_seed(2), max_shift_px=2.0)
    result = match_projections(sim.images, volume, global_rotation_grid(20.0), APIX, max_shift_px=3,
                               resolution_angstrom=12.0)
    assert float(geodesic_degrees(result.rotations, sim.rotations).max()) < 20.0
    assert bool((result.scores == result.all_scores.max(dim=1).values).all())


def test_bad_shapes_are_refused(volume):
    with pytest.raises(ValueError, match="share the box"):
        match_projections(torch.zeros(2, 16, 16), volume, global_rotation_grid(60.0), APIX)
    with pytest.raises(ValueError, match="candidates"):
        match_projections(torch.zeros(2, BOX, BOX), volume, torch.eye(3)[None, None].expand(3, 1, 3, 3), APIX)
    with pytest.raises(ValueError, match="max_shift_px"):
        match_projections(torch.zeros(2, BOX, BOX), volume, global_rotation_grid(60.0), APIX, max_shift_px=16)
