"""recon.simulate.ray_views: rays simulated from the map's transform agree with image_rays of simulated images."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.recon.ctf import CtfParams, ctf_at
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import (
    CtfRange,
    RayViews,
    RayVolume,
    atoms_to_volume,
    procedural_molecule,
    simulate_particles,
    simulate_ray_sets,
    simulate_ray_views,
)
from cryofastar.recon.simulate.ray_views import _CtfPolynomial

BOX, L, R, FRACTION = 48, 96, 24, 0.75


def _map(seed: int, fill: float = 0.6) -> tuple[torch.Tensor, float]:
    """A procedural molecule whose diameter fills ``fill`` of the box (model/training_data.py's rule)."""
    atoms = procedural_molecule(seed)
    apix = 2.0 * max(atoms.radius_angstrom(), 5.0) / (fill * BOX)
    return atoms_to_volume(atoms, BOX, apix), apix


@pytest.fixture(scope="module")
def molecule() -> tuple[torch.Tensor, float, RayVolume]:
    volume, apix = _map(3)
    return volume, apix, RayVolume(volume)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.conj() * b).sum().real / (a.norm() * b.norm()))


def _real_path(volume: torch.Tensor, apix: float, n: int, seed: int, **kwargs: object):  # noqa: ANN202
    """simulate_particles' images and their rays, and the displacements it drew."""
    sim = simulate_particles(volume, n, apix, generator=torch.Generator().manual_seed(seed), **kwargs)
    return sim, image_rays(sim.images, L, R, FRACTION), -sim.origins_angstrom / apix


def test_axis_order_sign_and_scale_on_a_point():
    """A point at (x, y, z) voxels from the centre has transform exp(-2 pi i k.(x, y, z) / B) (times the
    sinc^2 correction, exact on the padded grid's points)."""
    volume = torch.zeros(BOX, BOX, BOX)
    offset = (3, -2, 5)  # x, y, z
    volume[BOX // 2 + offset[2], BOX // 2 + offset[1], BOX // 2 + offset[0]] = 2.0
    k = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-0.5, 2, 1.5], [3, -1.5, -2], [0, 0, 0]])
    values = RayVolume(volume).sample(k)
    x = torch.tensor(offset, dtype=torch.float32)
    correction = torch.sinc(x / (2 * BOX)).square().prod()
    expected = 2.0 * torch.exp(-2j * math.pi * (k @ x) / BOX) / correction
    assert torch.allclose(values, expected.to(torch.complex64), atol=1e-4)


def test_sample_is_hermitian_and_batched(molecule):
    _, _, ray_volume = molecule
    k = (torch.rand(50, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * BOX
    plus, minus = ray_volume.sample(k), ray_volume.sample(-k)
    assert (plus - minus.conj()).abs().max() <= 1e-6 * plus.abs().max()
    stacked = RayVolume.stack([ray_volume, ray_volume])
    assert len(stacked) == 2
    both = stacked.sample(torch.stack([k, -k]))
    assert torch.equal(both[0], plus) and torch.equal(both[1], minus)
    volume = molecule[0]
    at_once = RayVolume(torch.stack([volume, volume.double()]))
    assert (at_once.planes - stacked.planes).abs().max() <= 1e-5 * stacked.planes.abs().max()


@pytest.mark.parametrize("shift", [0.0, 4.0])
def test_clean_rays_match_image_rays_of_simulated_particles(molecule, shift):
    """Same poses and displacements as simulate_particles, no CTF, no noise: 'grid' reproduces image_rays of
    its images (measured 0.99998, amplitude 0.3 % above); 'rays' (no bilinear loss) ~0.998, 5-8 % above."""
    volume, apix, ray_volume = molecule
    sim, reference, displacement = _real_path(volume, apix, 48, 0, snr=None, max_shift_px=shift)
    grid = simulate_ray_views(ray_volume, sim.rotations, L, R, FRACTION, apix, torch.Generator(),
                              shifts_px=displacement)
    assert _correlation(grid.clean, reference) >= 0.9995
    assert grid.clean.norm() / reference.norm() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(grid.rays, grid.clean)
    assert torch.allclose(grid.origins_angstrom, sim.origins_angstrom)
    rays = simulate_ray_views(ray_volume, sim.rotations, L, R, FRACTION, apix, torch.Generator(),
                              shifts_px=displacement, sampling="rays")
    assert _correlation(rays.clean, reference) >= 0.995
    assert 1.0 < rays.clean.norm() / reference.norm() < 1.12


def test_ctf_rays_match_image_rays_of_simulated_particles(molecule):
    """With the CTF (boxed out of a 2B field as simulate_particles does) and shifts: 'grid' 0.99998 measured,
    'rays' (the CTF analytic on the rays, no box) 0.97-0.99."""
    volume, apix, ray_volume = molecule
    sim, reference, displacement = _real_path(volume, apix, 48, 1, snr=None, max_shift_px=4.0, ctf=CtfRange())
    grid = simulate_ray_views(ray_volume, sim.rotations, L, R, FRACTION, apix, torch.Generator(),
                              shifts_px=displacement, ctf=sim.ctf)
    assert _correlation(grid.clean, reference) >= 0.999
    rays = simulate_ray_views(ray_volume, sim.rotations, L, R, FRACTION, apix, torch.Generator(),
                              shifts_px=displacement, ctf=sim.ctf, sampling="rays")
    assert _correlation(rays.clean, reference) >= 0.95
    assert grid.ctf is sim.ctf


@pytest.mark.parametrize("ctf", [None, CtfRange()])
def test_noise_sigma_from_snr_matches_simulate_particles(molecule, ctf):
    """SNR = mean var(clean image) / sigma^2 as in simulate_particles (measured within 0.02 %)."""
    volume, apix, ray_volume = molecule
    sim, _, displacement = _real_path(volume, apix, 64, 2, snr=0.1, max_shift_px=4.0, ctf=ctf)
    for sampling in ("grid", "rays"):
        out = simulate_ray_views(ray_volume, sim.rotations, L, R, FRACTION, apix, torch.Generator().manual_seed(0),
                                 shifts_px=displacement, ctf=sim.ctf, snr=0.1, sampling=sampling)
        assert float(out.noise_sigma) == pytest.approx(sim.noise_sigma, rel=0.01)


def test_noise_statistics_match_image_rays_of_white_noise(molecule):
    """Noise-only rays: per-radius variance and the correlation of neighbouring samples (along a ray and
    between rays) as image_rays of white-noise images."""
    _, apix, ray_volume = molecule
    n, sigma = 3000, 0.7
    generator = torch.Generator().manual_seed(3)
    out = simulate_ray_views(ray_volume, random_rotations(n, generator), L, R, FRACTION, apix, generator,
                             noise_sigma=sigma)
    noise = out.rays - out.clean
    reference = image_rays(sigma * torch.randn(n, BOX, BOX, generator=generator), L, R, FRACTION)
    ratio = noise.abs().square().mean((0, 1)) / reference.abs().square().mean((0, 1))
    assert ((ratio - 1).abs() < 0.04).all(), ratio  # measured within 1.3 %
    # bilinear sampling lowers the variance below B^2 sigma^2 between Fourier pixels
    assert float(noise.abs().square().mean()) < 0.8 * BOX**2 * sigma**2

    def neighbours(x: torch.Tensor, dim: int) -> float:
        a, b = x.narrow(dim, 1, x.shape[dim] - 1), x.narrow(dim, 0, x.shape[dim] - 1)
        return float((a * b.conj()).mean().real / x.abs().square().mean())

    for dim in (1, 2):
        assert neighbours(noise, dim) == pytest.approx(neighbours(reference, dim), abs=0.02)
    assert float(out.noise_sigma) == sigma


def test_hermitian_symmetry_of_rays(molecule):
    _, apix, ray_volume = molecule
    generator = torch.Generator().manual_seed(4)
    for sampling in ("grid", "rays"):
        out = simulate_ray_views(ray_volume, random_rotations(8, generator), L, R, FRACTION, apix, generator,
                                 max_shift_px=3.0, ctf=CtfRange(), snr=0.5, sampling=sampling)
        assert torch.equal(out.rays[:, L // 2:], out.rays[:, : L // 2].conj())


def test_shapes_dtypes_and_sets(molecule):
    volume, apix, ray_volume = molecule
    generator = torch.Generator().manual_seed(5)
    rotations = random_rotations(6, generator)
    out = simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, generator, max_shift_px=2.0,
                             ctf=CtfRange(), snr=1.0)
    assert isinstance(out, RayViews)
    assert out.rays.shape == out.clean.shape == (6, L, R) and out.rays.dtype == torch.complex64
    assert out.rotations.shape == (6, 3, 3) and out.rotations.dtype == torch.float64
    assert out.displacements_px.shape == out.origins_angstrom.shape == (6, 2)
    assert torch.allclose(out.origins_angstrom, -out.displacements_px * apix)
    assert out.displacements_px.abs().max() <= 2.0 and len(out.ctf) == 6
    assert out.noise_sigma.shape == () and float(out.noise_sigma) > 0
    # odd L: no conjugate half
    assert simulate_ray_views(ray_volume, rotations, 7, 5, 0.5, apix, generator).rays.shape == (6, 7, 5)

    other = RayVolume(_map(7)[0])
    sets = torch.stack([rotations, random_rotations(6, generator)])
    shifts = (torch.rand(2, 6, 2, generator=generator) - 0.5) * 4
    listed = simulate_ray_sets([ray_volume, other], sets, L, R, FRACTION, [apix, 1.5], generator,
                               shifts_px=shifts, snr=[0.1, 1.0])
    stacked = simulate_ray_sets(RayVolume.stack([ray_volume, other]), sets, L, R, FRACTION, [apix, 1.5],
                                generator, shifts_px=shifts, snr=[0.1, 1.0])
    assert listed.rays.shape == (2, 6, L, R) and listed.noise_sigma.shape == (2,)
    assert torch.allclose(listed.clean, stacked.clean) and torch.allclose(listed.noise_sigma, stacked.noise_sigma)
    for s, volume_s in enumerate([ray_volume, other]):
        single = simulate_ray_views(volume_s, sets[s], L, R, FRACTION, 1.0, generator, shifts_px=shifts[s],
                                    snr=[0.1, 1.0][s])
        assert torch.allclose(single.clean, listed.clean[s], atol=1e-3 * float(single.clean.abs().max()))
        assert float(single.noise_sigma) == pytest.approx(float(listed.noise_sigma[s]), rel=1e-4)
    assert torch.allclose(listed.origins_angstrom[1], -shifts[1].double() * 1.5)


def test_fast_ctf_is_ctf_at():
    generator = torch.Generator().manual_seed(6)
    n = 20
    base = CtfRange(max_astigmatism_angstrom=2000.0).sample(n, generator)
    params = CtfParams(base.defocus_u_angstrom, base.defocus_v_angstrom, base.defocus_angle_degrees, base.voltage_kv,
                       base.spherical_aberration_mm, base.amplitude_contrast,
                       torch.rand(n, generator=generator, dtype=torch.float64) * 90,
                       b_factor_angstrom2=torch.rand(n, generator=generator, dtype=torch.float64) * 100,
                       scale=torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
    k = (torch.rand(300, 2, generator=generator) - 0.5) * 64
    box_angstrom = torch.full((n,), 64 * 1.3, dtype=torch.float64)
    expected = ctf_at(params, (k / (64 * 1.3))[None].expand(n, -1, -1))
    assert (_CtfPolynomial(params, box_angstrom)(k, 1.0) - expected).abs().max() < 2e-4
    assert (_CtfPolynomial(params, box_angstrom)(2 * k, 2.0) - expected).abs().max() < 2e-4


def test_bad_input(molecule):
    _, apix, ray_volume = molecule
    rotations = random_rotations(4, torch.Generator().manual_seed(0))
    g = torch.Generator()
    with pytest.raises(ValueError, match="volume must be"):
        RayVolume(torch.zeros(BOX, BOX))
    with pytest.raises(ValueError, match="volume must be"):
        RayVolume(torch.zeros(BOX, BOX, BOX + 2))
    with pytest.raises(ValueError, match="even"):
        RayVolume(torch.zeros(33, 33, 33))
    with pytest.raises(ValueError, match="SNR must be positive"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, g, snr=0.0)
    with pytest.raises(ValueError, match="SNR must be positive"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, g, snr=-1.0)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_radius_fraction"):
            simulate_ray_views(ray_volume, rotations, L, R, fraction, apix, g)
    with pytest.raises(ValueError, match="rotations"):
        simulate_ray_views(ray_volume, rotations[:, :2], L, R, FRACTION, apix, g)
    with pytest.raises(ValueError, match="ctf must hold"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, g, ctf=CtfRange().sample(3, g))
    with pytest.raises(ValueError, match="shifts_px"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, g, shifts_px=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="apix"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, 0.0, g)
    with pytest.raises(ValueError, match="sampling"):
        simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, g, sampling="polar")
    with pytest.raises(ValueError, match="one box"):
        simulate_ray_sets([ray_volume, RayVolume(torch.zeros(32, 32, 32))], rotations.expand(2, -1, -1, -1),
                          L, R, FRACTION, apix, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_follows_the_volume(molecule):
    volume, apix, ray_volume = molecule
    on_gpu = RayVolume(volume.cuda())
    generator = torch.Generator(device="cuda").manual_seed(0)
    rotations = random_rotations(16, torch.Generator().manual_seed(0))
    ctf = CtfRange().sample(16, torch.Generator().manual_seed(1))
    out = simulate_ray_views(on_gpu, rotations, L, R, FRACTION, apix, generator, max_shift_px=2.0, ctf=ctf, snr=0.1)
    assert out.rays.device.type == "cuda" and out.rays.dtype == torch.complex64
    cpu = simulate_ray_views(ray_volume, rotations, L, R, FRACTION, apix, torch.Generator(),
                             shifts_px=out.displacements_px.cpu(), ctf=ctf)
    assert _correlation(out.clean.cpu(), cpu.clean) > 0.99999
