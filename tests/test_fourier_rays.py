"""recon.fourier_rays: the ray convention (angles, radii, scale, in-plane rotation as a cyclic shift)."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.fourier_rays import image_rays, ray_angles, ray_directions, ray_radii
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, simulate_particles

BOX, L, R = 48, 96, 16


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    atoms = procedural_molecule(5)
    return atoms_to_volume(atoms, BOX, 2 * atoms.radius_angstrom() / (0.6 * BOX))


def test_grid():
    assert torch.allclose(ray_angles(4), torch.tensor([0, math.pi / 2, math.pi, 3 * math.pi / 2]))
    assert torch.allclose(ray_radii(4, 64, 0.5), torch.tensor([4.0, 8.0, 12.0, 16.0]))
    assert torch.allclose(ray_directions(4)[1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-7)


def test_samples_are_the_unnormalised_dft_with_the_phase_origin_at_the_centre():
    """A point at (x, y) relative to the centre has transform exp(-2 pi i k.(x, y) / B)."""
    image = torch.zeros(1, BOX, BOX)
    image[0, BOX // 2 + 3, BOX // 2 - 2] = 2.0  # row = y = +3, column = x = -2
    rays = image_rays(image, 8, 4, 0.5)[0]
    theta = ray_angles(8)[:, None]
    r = ray_radii(4, BOX, 0.5)[None]
    # exact on the axes (integer frequency pixels): ray 0 is +x, ray 2 is +y
    expected = 2.0 * torch.exp(-2j * math.pi * r * (torch.cos(theta) * -2 + torch.sin(theta) * 3) / BOX)
    assert torch.allclose(rays[[0, 2, 4, 6]], expected[[0, 2, 4, 6]].to(torch.complex64), atol=1e-4)


def test_in_plane_rotation_is_a_cyclic_shift_and_opposite_rays_are_conjugate(volume):
    """psi + 90 degrees (RELION) moves every ray to the one L/4 further on."""
    rotations = euler_to_matrix(torch.tensor([30.0, 30.0]), torch.tensor([50.0, 50.0]),
                                torch.tensor([10.0, 100.0])).double()
    sim = simulate_particles(volume, 2, 1.0, None, torch.Generator().manual_seed(0), max_shift_px=0,
                             rotations=rotations)
    rays = image_rays(sim.images, L, R, 0.75)
    scale = rays.abs().max()
    assert (rays[1] - torch.roll(rays[0], -L // 4, 0)).abs().max() < 1e-3 * scale
    assert (rays[0, L // 2:] - rays[0, : L // 2].conj()).abs().max() < 1e-5 * scale


def test_bad_input():
    with pytest.raises(ValueError, match="images must be"):
        image_rays(torch.zeros(4, 4), 8, 4, 0.5)
    with pytest.raises(ValueError, match="max_radius_fraction"):
        image_rays(torch.zeros(1, 8, 8), 8, 4, 1.5)
