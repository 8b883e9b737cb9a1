"""Map slices, orientation grids and classical projection matching (recon), on simulated particles."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.ctf import CtfParams, ctf_rfft
from cryofastar.recon.fourier import rfft2_centered
from cryofastar.recon.map_slices import MapSlicer, band_frequencies
from cryofastar.recon.orientation_grids import (
    global_rotation_grid,
    local_rotation_grid,
    local_rotation_vectors,
    rotation_vectors_to_matrices,
)
from cryofastar.recon.projection_matching import (
    ctf_at_band,
    posterior_mean_rotations,
    refine_local,
    score_candidates,
    search_global,
)
from cryofastar.recon.rotations import geodesic_degrees, random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)


def test_band_frequencies_are_a_half_plane_disk():
    k = band_frequencies(32, 0.25)
    assert bool(((k[:, 0] > 0) | ((k[:, 0] == 0) & (k[:, 1] > 0))).all())
    assert float(k.norm(dim=-1).max()) <= 0.25 + 1e-6 and float(k.norm(dim=-1).min()) > 0
    full = torch.cat([k, -k])  # with the Friedel mates: every pixel of the disk but DC, once
    assert len(torch.unique((full * 32).round().long(), dim=0)) == len(full)
    with pytest.raises(ValueError, match="band limit"):
        band_frequencies(32, 0.6)


def test_slices_equal_the_spectra_of_projections(volume):
    """The slicer's slice at A is rfft2_centered of the simulator's projection at A (central-slice theorem)."""
    sim = simulate_particles(volume, 4, APIX, None, torch.Generator().manual_seed(0), max_shift_px=0.0)
    k = band_frequencies(BOX, 0.25)
    slices = MapSlicer(volume, 0.25).slices(sim.rotations, k)
    spectra = rfft2_centered(sim.images)[:, (k[:, 1] * BOX).round().long() % BOX, (k[:, 0] * BOX).round().long()]
    ncc = (slices * spectra.conj()).sum(-1).real / (slices.abs().norm(dim=-1) * spectra.abs().norm(dim=-1))
    assert bool((ncc > 0.999).all())


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


def test_local_refinement_recovers_known_poses_and_shifts(volume):
    sim = simulate_particles(volume, 16, APIX, None, torch.Generator().manual_seed(1), max_shift_px=3.0)
    kick = local_rotation_grid(8.0, 8.0)[1:7].repeat(3, 1, 1)[:16]  # start 8° away from the truth
    start = sim.rotations @ kick
    true_origins = sim.origins_angstrom / APIX
    start_origins = true_origins.round() + torch.tensor([1.0, -1.0])  # and 1-2 px off
    assert bool((geodesic_degrees(start, sim.rotations) > 7.9).all())
    result = refine_local(sim.images, MapSlicer(volume, 0.5), start, start_origins, range_degrees=10.0,
                          step_degrees=5.0, stages=4, max_shift_px=2)
    assert float(geodesic_degrees(result.rotations, sim.rotations).max()) < 2.0
    assert float((result.origins_px - true_origins).abs().max()) < 0.35  # sub-pixel
    assert bool((result.scores > 0.95).all())
    assert result.spread_degrees.shape == (16,) and bool((result.spread_degrees < 10.0).all())


def test_local_rotation_vectors_are_the_grid_of_local_rotation_grid():
    vectors = local_rotation_vectors(6.0, 2.0)
    assert vectors.shape == (123, 3) and float(vectors[0].norm()) == 0.0
    assert torch.allclose(rotation_vectors_to_matrices(vectors), local_rotation_grid(6.0, 2.0))


def test_posterior_mean_lands_between_grid_points_that_explain_the_particle_alike(volume):
    """Clean particles started half a grid step (1.5°) off: the ball's candidates at 1.5° on
    either side of the truth score alike, so their posterior mean is nearer the truth than either."""
    sim = simulate_particles(volume, 12, APIX, None, torch.Generator().manual_seed(5), max_shift_px=0.0)
    axes = torch.nn.functional.normalize(torch.randn(12, 3, generator=torch.Generator().manual_seed(6),
                                                     dtype=torch.float64), dim=-1)
    start = sim.rotations @ rotation_vectors_to_matrices(axes * torch.deg2rad(torch.tensor(1.5, dtype=torch.float64)))
    slicer, origins = MapSlicer(volume, 0.5), sim.origins_angstrom / APIX
    mean = posterior_mean_rotations(sim.images, slicer, start, origins, range_degrees=6.0, step_degrees=3.0, chunk=5)
    error = geodesic_degrees(mean, sim.rotations)
    assert float(error.median()) < 1.0 and float(error.max()) < 1.5
    at_truth = posterior_mean_rotations(sim.images, slicer, sim.rotations, origins, range_degrees=6.0,
                                        step_degrees=3.0)  # a sharp peak stays put
    assert float(geodesic_degrees(at_truth, sim.rotations).max()) < 0.5
    with pytest.raises(ValueError, match="rotations"):
        posterior_mean_rotations(sim.images, slicer, start[:3], origins)


def test_local_refinement_ending_in_the_posterior_mean_still_recovers_poses(volume):
    sim = simulate_particles(volume, 8, APIX, None, torch.Generator().manual_seed(7), max_shift_px=1.0)
    start = sim.rotations @ local_rotation_grid(6.0, 6.0)[1:7].repeat(2, 1, 1)[:8]
    plain = refine_local(sim.images, MapSlicer(volume, 0.5), start, sim.origins_angstrom / APIX)
    mean = refine_local(sim.images, MapSlicer(volume, 0.5), start, sim.origins_angstrom / APIX,
                        mean_range_degrees=6.0, mean_step_degrees=3.0)
    assert float(geodesic_degrees(mean.rotations, sim.rotations).max()) < 2.0
    assert torch.equal(mean.scores, plain.scores) and torch.equal(mean.origins_px, plain.origins_px)
    assert not torch.equal(mean.rotations, plain.rotations)


def test_ctf_scores_compare_the_particle_with_the_modulated_projection(volume):
    """A particle that is exactly CTF x P(A) scores 1 at A and less at every other candidate.

    Normalising by |P| instead of |CTF P| (the old score) let candidates whose power sits
    where the CTF is strong beat the true one.
    """
    k = band_frequencies(BOX, 0.5)
    others = global_rotation_grid(30.0)
    others = others[geodesic_degrees(others, torch.eye(3, dtype=others.dtype).expand_as(others)) > 5.0]
    grid = torch.cat([torch.eye(3, dtype=others.dtype)[None], others])
    slices = MapSlicer(volume, 0.5).slices(grid, k)  # (C, M); candidate 0 is the truth
    two = torch.ones(2, dtype=torch.float64)
    ctf_params = CtfParams(torch.tensor([18000.0, 9000.0], dtype=torch.float64),
                           torch.tensor([17000.0, 9500.0], dtype=torch.float64),
                           torch.tensor([30.0, 70.0], dtype=torch.float64), 300 * two, 2.7 * two, 0.1 * two, 0 * two)
    ctf = ctf_at_band(ctf_rfft(ctf_params, BOX, APIX), k)  # (2, M)
    spectra = ctf * slices[0]  # both particles are CTF x the truth's slice, no noise
    scores = score_candidates(spectra, slices, k, 0, ctf)[..., 0]  # (2, C)
    assert torch.allclose(scores[:, 0], torch.ones(2), atol=1e-4)
    assert bool((scores[:, 1:] < scores[:, :1] - 1e-3).all())
    per_particle = score_candidates(spectra, slices.expand(2, *slices.shape), k, 0, ctf)
    assert torch.allclose(per_particle[..., 0], scores, atol=1e-5)  # shared and per-particle slices agree


def test_global_search_finds_the_neighbourhood_of_any_pose(volume):
    sim = simulate_particles(volume, 8, APIX, None, torch.Generator().manual_seed(2), max_shift_px=2.0)
    result = search_global(sim.images, MapSlicer(volume, APIX / 12.0), global_rotation_grid(15.0), max_shift_px=3)
    assert float(geodesic_degrees(result.rotations, sim.rotations).max()) < 15.0
    assert float((result.origins_px - sim.origins_angstrom / APIX).abs().max()) < 1.0


def test_spread_is_large_where_the_data_cannot_tell(volume):
    """Pure noise has no preferred orientation; a clean particle has one."""
    clean = simulate_particles(volume, 8, APIX, None, torch.Generator().manual_seed(3), max_shift_px=0.0)
    noise = torch.randn(8, BOX, BOX, generator=torch.Generator().manual_seed(4))
    slicer, grid = MapSlicer(volume, APIX / 12.0), global_rotation_grid(30.0)
    sure = search_global(clean.images, slicer, grid, max_shift_px=0)
    unsure = search_global(noise, slicer, grid, max_shift_px=0)
    # a clean particle between two grid points may share its weight with the neighbour (30° away)
    assert float(sure.spread_degrees.median()) < 5.0 and float(sure.spread_degrees.max()) < 30.0
    assert float(unsure.spread_degrees.min()) > 40.0
    assert float(unsure.scores.max()) < float(sure.scores.min())


def test_bad_shapes_are_refused(volume):
    slicer = MapSlicer(volume, 0.25)
    with pytest.raises(ValueError, match="like the map"):
        search_global(torch.zeros(2, 16, 16), slicer, global_rotation_grid(60.0))
    with pytest.raises(ValueError, match="max_shift_px"):
        search_global(torch.zeros(2, BOX, BOX), slicer, global_rotation_grid(60.0), max_shift_px=16)
    with pytest.raises(ValueError, match="rotations"):
        refine_local(torch.zeros(2, BOX, BOX), slicer, torch.eye(3)[None].expand(3, 3, 3),
                     torch.zeros(2, 2))
    with pytest.raises(ValueError, match="cube"):
        MapSlicer(torch.zeros(4, 4, 5))
