"""Refinement policy against half maps (recon.refinement): working box, bands, modes, half-set independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryofastar.recon.orientation_grids import local_rotation_grid
from cryofastar.recon.refinement import (
    RefinementReference,
    RefineSettings,
    band_limit,
    images_to_working_box,
    map_to_working_box,
)
from cryofastar.recon.rotations import geodesic_degrees
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import simulate_particles

BOX, APIX = 48, 3.0


@pytest.fixture(scope="module")
def data():
    volume = atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)
    sim = simulate_particles(volume, 24, APIX, 2.0, torch.Generator().manual_seed(3), max_shift_px=2.0)
    return volume, sim


def test_band_limit_follows_the_resolution_within_bounds():
    assert band_limit(None, 2.0, 64) == pytest.approx(4 / 64)
    assert band_limit(math.inf, 2.0, 64) == pytest.approx(4 / 64)
    assert band_limit(10.0, 2.0, 64) == pytest.approx(0.2)
    assert band_limit(1.0, 2.0, 64) == 0.5  # finer than Nyquist: Nyquist
    assert band_limit(500.0, 2.0, 64) == pytest.approx(4 / 64)


def test_working_box_keeps_the_field_of_view(data):
    volume, sim = data
    small = map_to_working_box(volume, 24)
    assert small.shape == (24, 24, 24)
    # the same mass at half the sampling: the sum scales by (24/48)^3
    assert float(small.sum()) == pytest.approx(float(volume.sum()) / 8, rel=1e-3)
    assert images_to_working_box(sim.images, 24).shape == (len(sim.images), 24, 24)
    # as many images as pixels a side are still images, not a cubic map (a daemon crash at box 128)
    cube_of_images = torch.randn(48, 48, 48)
    assert images_to_working_box(cube_of_images, 24).shape == (48, 24, 24)
    np.testing.assert_allclose(images_to_working_box(cube_of_images, 24)[7].numpy(),
                               images_to_working_box(cube_of_images[7:8], 24)[0].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="map"):
        map_to_working_box(torch.zeros(4, 8, 8), 4)


def test_local_mode_refines_each_half_against_its_own_map(data):
    volume, sim = data
    halves = 1 + (torch.arange(24) % 2)
    # half 2's map is empty: its particles cannot be refined, half 1's are
    reference = RefinementReference(torch.stack([volume, torch.zeros_like(volume)]), APIX, 8.0,
                                    RefineSettings(working_box=32))
    start = sim.rotations @ local_rotation_grid(6.0, 6.0)[1:7].repeat(4, 1, 1)
    match, origins = reference.match(sim.images, halves, start, sim.origins_angstrom.round(), mode="local")
    error = geodesic_degrees(match.rotations, sim.rotations)
    assert float(error[halves == 1].median()) < 3.0
    assert float(match.scores[halves == 2].abs().max()) < 1e-3  # nothing to correlate with
    assert origins.shape == (24, 2) and origins.dtype == torch.float64


def test_global_mode_finds_poses_from_nothing(data):
    volume, sim = data
    halves = 1 + (torch.arange(24) % 2)
    reference = RefinementReference(torch.stack([volume, volume]), APIX, 8.0, RefineSettings(working_box=32))
    match, origins = reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="global")
    assert float(geodesic_degrees(match.rotations, sim.rotations).median()) < 5.0
    assert float((origins - sim.origins_angstrom).norm(dim=-1).median()) < APIX
    best, _ = reference.match(sim.images, halves, sim.rotations @ local_rotation_grid(60.0, 60.0)[1:2].expand(24, 3, 3),
                              torch.zeros(24, 2), mode="best")  # 60° off: the global search wins
    assert float(geodesic_degrees(best.rotations, sim.rotations).median()) < 5.0


def test_coarse_mode_is_the_global_search_alone_a_first_pose_on_its_grid(data):
    volume, sim = data
    halves = 1 + (torch.arange(24) % 2)
    settings = RefineSettings(working_box=32)
    reference = RefinementReference(torch.stack([volume, volume]), APIX, 8.0, settings)
    coarse, origins = reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="coarse")
    polished, _ = reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="global")
    # within the grid's reach of the truth, and no nearer than a polish gets
    assert float(geodesic_degrees(coarse.rotations, sim.rotations).median()) < settings.global_step_degrees
    assert float(geodesic_degrees(polished.rotations, sim.rotations).median()) <= \
        float(geodesic_degrees(coarse.rotations, sim.rotations).median())
    assert float((origins - sim.origins_angstrom).norm(dim=-1).median()) < 2 * APIX


def test_bad_arguments_are_refused(data):
    volume, sim = data
    reference = RefinementReference(torch.stack([volume, volume]), APIX, 8.0)
    with pytest.raises(ValueError, match="mode"):
        reference.match(sim.images, torch.ones(24), sim.rotations, torch.zeros(24, 2), mode="fast")
    with pytest.raises(ValueError, match="rotations"):
        reference.match(sim.images, torch.ones(24), None, torch.zeros(24, 2), mode="local")
    with pytest.raises(ValueError, match="images"):
        reference.match(sim.images[:, :32, :32], torch.ones(24), sim.rotations, torch.zeros(24, 2))
    with pytest.raises(ValueError, match="half maps"):
        RefinementReference(volume, APIX, 8.0)


def test_ctf_modulated_particles_are_matched_against_ctf_modulated_projections(data):
    """Images carry a CTF (defocus 2-3 µm: several lobes in the band), the map does not: with the CTF the
    global search finds the poses; ignoring it, lobes of the wrong sign mislead it."""
    from cryofastar.recon.simulate.particles import CtfRange

    volume, _ = data
    sim = simulate_particles(volume, 24, APIX, 2.0, torch.Generator().manual_seed(5), max_shift_px=2.0,
                             ctf=CtfRange(defocus_min_angstrom=20_000.0, defocus_max_angstrom=30_000.0))
    halves = 1 + (torch.arange(24) % 2)
    reference = RefinementReference(torch.stack([volume, volume]), APIX, 8.0, RefineSettings(working_box=32))
    with_ctf, _ = reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="global", ctf=sim.ctf)
    without, _ = reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="global")
    error_with = float(geodesic_degrees(with_ctf.rotations, sim.rotations).median())
    error_without = float(geodesic_degrees(without.rotations, sim.rotations).median())
    assert error_with < 5.0 and error_without > 2 * error_with
    with pytest.raises(ValueError, match="CTF parameter sets"):
        reference.match(sim.images, halves, None, torch.zeros(24, 2), mode="global", ctf=sim.ctf[:3])
