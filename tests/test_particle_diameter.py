"""Tests of recon/particle_diameter.py: the diameter measured from noisy particles."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.particle_diameter import estimate_particle_diameter
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles


@pytest.fixture(scope="module")
def molecule() -> tuple[torch.Tensor, float, float]:
    """A held-out procedural molecule in box 48 at a pixel size where it fills about half the box."""
    atoms = procedural_molecule(1_000_000_005)
    diameter = 2 * atoms.radius_angstrom()
    apix = diameter / (0.5 * 48)
    return atoms_to_volume(atoms, 48, apix), apix, diameter


@pytest.mark.parametrize("ctf", [None, CtfRange()])
def test_diameter_of_a_molecule_at_snr_0_1_is_close_to_its_extent(molecule, ctf) -> None:
    volume, apix, diameter = molecule
    sim = simulate_particles(volume, 600, apix, 0.1, torch.Generator().manual_seed(2), max_shift_px=2.0, ctf=ctf)
    estimate = estimate_particle_diameter(sim.images, apix, sim.ctf)
    assert 0.7 * diameter < estimate < 1.35 * diameter


def test_the_box_around_the_particle_does_not_change_its_diameter(molecule) -> None:
    """The same molecule in box 48 and padded into box 64 (same pixel size): the same diameter in Å."""
    volume, apix, _ = molecule
    g = torch.Generator().manual_seed(3)
    tight = estimate_particle_diameter(simulate_particles(volume, 300, apix, 1.0, g).images, apix)
    padded = torch.nn.functional.pad(volume, (8, 8, 8, 8, 8, 8))
    loose = estimate_particle_diameter(simulate_particles(padded, 300, apix, 1.0, g).images, apix)
    assert loose == pytest.approx(tight, rel=0.15)


def test_noise_only_gives_a_diameter_inside_the_box_and_bad_input_a_clear_error() -> None:
    noise = torch.randn(200, 32, 32, generator=torch.Generator().manual_seed(0))
    assert 0.25 * 32 * 1.5 <= estimate_particle_diameter(noise, 1.5) <= 0.96 * 32 * 1.5
    with pytest.raises(ValueError, match="images must be"):
        estimate_particle_diameter(torch.zeros(1, 32, 32), 1.0)
