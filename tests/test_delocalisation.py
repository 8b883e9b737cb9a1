"""CTF delocalisation (recon.delocalisation): the kept-fraction model, the fit of the loss, the engine's use."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.accumulator import HalfSetAccumulator
from cryofastar.recon.ctf import CtfParams, ctf_rfft
from cryofastar.recon.delocalisation import effective_ctf, fit_loss, kept_fraction
from cryofastar.recon.fourier import irfft2_centered, rfft2_centered
from cryofastar.recon.refinement import RefinementReference, RefineSettings
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule
from cryofastar.recon.simulate.particles import CtfRange, simulate_particles


def _ctf(defocus_angstrom: list[float], cs_mm: float = 2.7) -> CtfParams:
    d = torch.tensor(defocus_angstrom, dtype=torch.float64)
    n = len(defocus_angstrom)
    return CtfParams.from_arrays(defocus_u_angstrom=d, defocus_v_angstrom=d, defocus_angle_degrees=0.0,
                                 voltage_kv=300.0, spherical_aberration_mm=cs_mm, amplitude_contrast=0.1,
                                 phase_shift_degrees=torch.zeros(n))


def test_kept_fraction_falls_with_defocus_and_frequency():
    kept = kept_fraction(_ctf([5_000.0, 25_000.0]), 64, 1.25, 80.0)
    assert kept.shape == (2, 64, 33) and kept.dtype == torch.float32
    assert float(kept[:, 0, 0].min()) == 1.0  # DC is not moved
    along_x = kept[:, 0, :]  # ky = 0, kx = 0 .. Nyquist
    assert bool((along_x[:, 1:] <= along_x[:, :-1] + 1e-6).all())  # monotone in |k| (Cs small here)
    assert float(along_x[1].mean()) < float(along_x[0].mean())  # more defocus, more lost
    # 2.5 µm at 300 kV (0.019687 Å) moves detail at k = 7/80 1/Å (11.4 Å) by 43 Å; a particle of radius 28 Å
    # (0.35 of the 80-Å box) then spans 15..71 Å, of which 40 Å is the box's half-extent along x
    moved = 0.019687 * 25_000.0 * 7 / 80
    assert float(along_x[1, 7]) == pytest.approx((40 - (moved - 28)) / 56, abs=0.01)
    assert float(along_x[0, 7]) == 1.0  # 0.5 µm: moved 8.6 Å, the particle stays inside
    # a field of view large enough keeps everything
    assert float(kept_fraction(_ctf([25_000.0]), 64, 1.25, 1e5).min()) == 1.0
    with pytest.raises(ValueError, match="field of view"):
        kept_fraction(_ctf([1.0]), 8, 1.0, 0.0)


@pytest.mark.parametrize("loss", [0.0, 0.4, 1.0])
def test_fit_loss_recovers_the_share_of_the_modelled_loss(loss):
    g = torch.Generator().manual_seed(0)
    kept = torch.rand(200_000, generator=g)
    power = torch.rand(200_000, generator=g) + 0.1
    cross = 0.8 * (1 - loss * (1 - kept)) * power + 0.05 * torch.randn(200_000, generator=g)
    assert fit_loss(cross, power, kept) == pytest.approx(loss, abs=0.03)


def test_fit_loss_without_a_trend_or_signal_is_zero():
    kept = torch.linspace(0, 1, 1000)
    power = torch.ones(1000)
    assert fit_loss(2.0 - kept, power, kept) == 0.0  # more signal where the model says it is lost: none lost
    assert fit_loss(torch.zeros(1000), power, kept) == 0.0  # no signal at all
    assert fit_loss(kept, power, torch.ones(1000)) == 0.0  # one bin: nothing to fit
    with pytest.raises(ValueError, match="one shape"):
        fit_loss(kept, power[:10], kept)


def test_effective_ctf():
    ctf, kept = torch.full((1, 4, 3), -0.5), torch.full((1, 4, 3), 0.25)
    assert effective_ctf(ctf, kept, 0.0) is ctf
    assert torch.allclose(effective_ctf(ctf, kept, 1.0), ctf * kept)
    assert torch.allclose(effective_ctf(ctf, kept, 0.5), ctf * 0.625)
    with pytest.raises(ValueError, match="loss"):
        effective_ctf(ctf, kept, 1.5)


BOX, APIX, N = 32, 3.0, 600
WIDE_DEFOCUS = CtfRange(defocus_min_angstrom=5_000.0, defocus_max_angstrom=40_000.0)


@pytest.fixture(scope="module")
def volume():
    return atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)


def _loss_of(volume: torch.Tensor, images: torch.Tensor, rotations: torch.Tensor, origins: torch.Tensor,
             ctf: CtfParams) -> float:
    halves = 1 + torch.arange(len(images)) % 2
    acc = HalfSetAccumulator(BOX, APIX)
    acc.add(images, rotations, origins, halves, ctf=ctf)
    reference = RefinementReference(acc.half_volumes(), APIX, acc.resolution_angstrom(),
                                    RefineSettings(working_box=BOX))
    reference.match(images[:200], halves[:200], rotations[:200], origins[:200], "local", ctf[torch.arange(200)])
    assert reference.delocalisation_loss is not None
    return reference.delocalisation_loss


def test_engine_measures_the_loss_of_boxed_out_particles_and_none_where_nothing_was_lost(volume):
    """Particles boxed out of a larger field after the CTF (as on a micrograph) lost the signal the CTF moved out:
    the reference measures most of the modelled loss. The same projections with the CTF applied on the box's own
    grid (as some simulators do) lost nothing, and it measures none."""
    g = torch.Generator().manual_seed(1)
    boxed = simulate_particles(volume, N, APIX, 2.0, g, max_shift_px=1.0, ctf=WIDE_DEFOCUS)
    assert _loss_of(volume, boxed.images, boxed.rotations, boxed.origins_angstrom, boxed.ctf) > 0.5
    clean = simulate_particles(volume, N, APIX, None, torch.Generator().manual_seed(2), max_shift_px=1.0)
    periodic = irfft2_centered(rfft2_centered(clean.images) * ctf_rfft(boxed.ctf, BOX, APIX), BOX)
    periodic = periodic + 0.7 * periodic.std() * torch.randn(periodic.shape, generator=g)
    assert _loss_of(volume, periodic, clean.rotations, clean.origins_angstrom, boxed.ctf) < 0.2
