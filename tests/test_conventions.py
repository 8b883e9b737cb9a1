"""The code against docs/conventions.md, checked with independent implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryofastar.recon import HalfSetAccumulator, euler_to_matrix, fsc, matrix_to_euler
from cryofastar.recon.ctf import CtfParams, ctf_array, ctf_from_array, ctf_rfft
from cryofastar.recon.fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import simulate_particles
from cryofastar.recon.simulate.particles import CtfRange
from scipy.ndimage import shift as nd_shift


def _passive_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])


def _passive_y(b: float) -> np.ndarray:
    c, s = math.cos(b), math.sin(b)
    return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])


@pytest.mark.parametrize("angles", [(0, 0, 0), (90, 0, 0), (30, 60, -45), (-170, 120, 10), (45, 180, 20)])
def test_euler_matrix_is_relion_zyz(angles: tuple[float, float, float]) -> None:
    rot, tilt, psi = (math.radians(a) for a in angles)
    expected = _passive_z(psi) @ _passive_y(tilt) @ _passive_z(rot)
    got = euler_to_matrix(*(torch.tensor(float(a), dtype=torch.float64) for a in angles))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_euler_round_trip_angles_and_matrices() -> None:
    g = torch.Generator().manual_seed(3)
    matrices = random_rotations(500, g)
    rot, tilt, psi = matrix_to_euler(matrices)
    assert bool(((tilt >= 0) & (tilt <= 180)).all())
    back = euler_to_matrix(rot, tilt, psi)
    torch.testing.assert_close(back, matrices, atol=1e-9, rtol=0)
    # angles in canonical range survive a second round trip unchanged
    rot2, tilt2, psi2 = matrix_to_euler(back)
    torch.testing.assert_close(torch.stack([rot2, tilt2, psi2]), torch.stack([rot, tilt, psi]), atol=1e-7, rtol=0)


def test_euler_gimbal_poles_round_trip() -> None:
    for tilt in (0.0, 180.0):
        m = euler_to_matrix(torch.tensor(40.0, dtype=torch.float64), torch.tensor(tilt, dtype=torch.float64),
                            torch.tensor(25.0, dtype=torch.float64))
        back = euler_to_matrix(*matrix_to_euler(m))
        torch.testing.assert_close(back, m, atol=1e-9, rtol=0)


def test_centring_delta_at_box_half_has_flat_zero_phase_spectrum() -> None:
    image = torch.zeros(16, 16)
    image[8, 8] = 1.0
    spectrum = rfft2_centered(image)
    torch.testing.assert_close(spectrum, torch.ones_like(spectrum))
    torch.testing.assert_close(irfft2_centered(spectrum, 16), image)


def test_phase_shift_moves_content_by_plus_s() -> None:
    image = torch.zeros(16, 16)
    image[8, 8] = 1.0
    moved = irfft2_centered(phase_shift_rfft2(rfft2_centered(image), torch.tensor([3.0, -2.0]), 16), 16)
    assert tuple(torch.nonzero(moved > 0.5)[0].tolist()) == (8 - 2, 8 + 3)  # [y, x]


def test_simulated_projection_equals_real_space_rotate_and_sum(phantom32: torch.Tensor, projector) -> None:
    g = torch.Generator().manual_seed(1)
    sim = simulate_particles(phantom32, 6, apix=1.0, snr=None, generator=g, max_shift_px=0.0)
    for image, matrix in zip(sim.images, sim.rotations.numpy(), strict=True):
        reference = projector(phantom32, matrix)
        wrong = projector(phantom32, matrix.T)  # the other convention
        corr = np.corrcoef(image.numpy().ravel(), reference.ravel())[0, 1]
        corr_wrong = np.corrcoef(image.numpy().ravel(), wrong.ravel())[0, 1]
        assert corr > 0.995, corr
        assert corr_wrong < corr - 0.05, (corr, corr_wrong)


def _reconstruct(images: torch.Tensor, matrices: torch.Tensor, origins: torch.Tensor, box: int) -> torch.Tensor:
    acc = HalfSetAccumulator(box, 1.0)
    halves = 1 + (torch.arange(len(images)) % 2)
    acc.add(images, matrices, origins, halves)
    return acc.volume()


def test_backprojection_of_real_space_projections_with_relion_origins(phantom32: torch.Tensor, projector) -> None:
    """Particles drawn displaced by +d px, origin -d*apix: the map comes back."""
    g = torch.Generator().manual_seed(2)
    n, box, apix = 300, 32, 1.0
    matrices = random_rotations(n, g)
    displacement = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 8 - 4)
    images = []
    for m, d in zip(matrices.numpy(), displacement.numpy(), strict=True):
        projection = projector(phantom32, m)
        images.append(nd_shift(projection, (d[1], d[0]), order=3, mode="constant"))  # [y, x] by (+dy, +dx)
    images = torch.as_tensor(np.stack(images), dtype=torch.float32)
    good = _reconstruct(images, matrices, -displacement * apix, box)
    flipped = _reconstruct(images, matrices, displacement * apix, box)
    transposed = _reconstruct(images, matrices.transpose(-1, -2), -displacement * apix, box)
    score = fsc(good, phantom32)[1:12].mean()
    assert score > 0.97, score
    assert fsc(flipped, phantom32)[1:12].mean() < score - 0.2
    assert fsc(transposed, phantom32)[1:12].mean() < score - 0.2


def _relion_ctf(
    du: float, dv: float, angle: float, kv: float, cs: float, q0: float, box: int, apix: float
) -> torch.Tensor:
    """RELION's CTF::getCTF, written out independently (ctf.h)."""
    wavelength = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    ky = torch.fft.fftfreq(box, dtype=torch.float64) / apix
    kx = torch.fft.rfftfreq(box, dtype=torch.float64) / apix
    y, x = torch.meshgrid(ky, kx, indexing="ij")
    u2 = x * x + y * y
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * torch.cos(2 * (torch.atan2(y, x) - math.radians(angle)))
    k1 = math.pi * wavelength
    k2 = math.pi / 2 * cs * 1e7 * wavelength**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    return -torch.sin(k1 * deltaf * u2 + k2 * u2 * u2 - k3)


@pytest.mark.parametrize(("angle", "du", "dv"), [(0.0, 18000.0, 15500.0), (33.0, 18000.0, 15500.0),
                                                 (121.0, 18000.0, 15500.0), (33.0, 15500.0, 18000.0)])
def test_ctf_matches_relion_formula(angle: float, du: float, dv: float) -> None:
    """Also where DefocusV > DefocusU, which RELION allows."""
    params = CtfParams.from_arrays(
        defocus_u_angstrom=du, defocus_v_angstrom=dv, defocus_angle_degrees=angle,
        voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_degrees=0.0,
    )
    ours = ctf_rfft(params, 64, 1.3)[0].double()
    relion = _relion_ctf(du, dv, angle, 300.0, 2.7, 0.1, 64, 1.3)
    assert float((ours - relion).abs().max()) < 5e-3
    assert float(ours[0, 1]) > 0  # positive at low frequency for underfocus


def test_ctf_bfactor_envelope_and_scale_follow_relion() -> None:
    """RELION's CTF::getCTF: times exp(-B |k|^2 / 4) (|k| in 1/Å) and times the scale factor."""
    base = dict(defocus_u_angstrom=18000.0, defocus_v_angstrom=15500.0, defocus_angle_degrees=20.0, voltage_kv=300.0,
                spherical_aberration_mm=2.7, amplitude_contrast=0.1, phase_shift_degrees=0.0)
    plain = ctf_rfft(CtfParams.from_arrays(**base), 64, 1.3)[0].double()
    damped = ctf_rfft(CtfParams.from_arrays(**base, b_factor_angstrom2=80.0, scale=0.5), 64, 1.3)[0].double()
    ky = torch.fft.fftfreq(64, d=1.3, dtype=torch.float64)
    kx = torch.fft.rfftfreq(64, d=1.3, dtype=torch.float64)
    envelope = 0.5 * torch.exp(-80.0 / 4 * (ky[:, None] ** 2 + kx[None, :] ** 2))
    assert float((damped - plain * envelope).abs().max()) < 1e-5


def test_snr_definition(phantom32: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(4)
    sim = simulate_particles(phantom32, 200, apix=1.0, snr=0.5, generator=g)
    clean = simulate_particles(phantom32, 200, apix=1.0, snr=None, generator=torch.Generator().manual_seed(4))
    measured = float(clean.images.var(dim=(-2, -1)).mean()) / sim.noise_sigma**2
    assert measured == pytest.approx(0.5, rel=0.1)


def test_ctf_parameters_round_trip_through_an_array() -> None:
    plain = CtfRange().sample(5, torch.Generator().manual_seed(0))
    back = ctf_from_array(ctf_array(plain, 5))
    assert back.b_factor_angstrom2 is None and back.scale is None
    assert torch.equal(back.defocus_u_angstrom, plain.defocus_u_angstrom)
    assert torch.equal(back.phase_shift_degrees, plain.phase_shift_degrees)
    b_factor = torch.full((5,), 40.0, dtype=torch.float64)
    with_envelope = CtfParams.cat([plain, CtfParams(**{**plain.__dict__, "b_factor_angstrom2": b_factor})])
    array = ctf_array(with_envelope, 10)
    array[:5, 7] = np.nan  # a B-factor not given for half of them: RELION's 0 there
    back = ctf_from_array(array)
    assert back.b_factor_angstrom2.tolist() == [0.0] * 5 + [40.0] * 5
    assert ctf_from_array(ctf_array(None, 3)) is None
    assert ctf_from_array(ctf_array(None, 0)) is None
