"""Map comparison with a free centre and hand (recon.map_alignment)."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.fourier import irfft3_centered, rfft3_centered
from cryofastar.recon.fsc import fsc
from cryofastar.recon.map_alignment import resolution_vs_known_map, translate_onto
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule

BOX, APIX = 32, 4.0


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return atoms_to_volume(procedural_molecule(1_000_000_005), BOX, APIX)


def _shifted(volume: torch.Tensor, shift_zyx: tuple[float, float, float]) -> torch.Tensor:
    k = [torch.fft.fftfreq(BOX), torch.fft.fftfreq(BOX), torch.fft.rfftfreq(BOX)]
    kz, ky, kx = torch.meshgrid(*k, indexing="ij")
    phase = -2 * torch.pi * (kz * shift_zyx[0] + ky * shift_zyx[1] + kx * shift_zyx[2])
    return irfft3_centered(rfft3_centered(volume) * torch.polar(torch.ones_like(phase), phase), BOX)


def test_a_translated_map_is_moved_back_onto_its_reference(volume):
    moved = _shifted(volume, (3.0, -2.0, 1.4))
    assert float(fsc(moved, volume)[1:8].min()) < 0.9  # far apart before
    back = translate_onto(moved, volume)
    assert float(fsc(back, volume)[1:12].min()) > 0.99


def test_resolution_takes_the_better_hand_and_the_centre(volume):
    good = resolution_vs_known_map(volume, volume, APIX)
    assert good == pytest.approx(2 * APIX)  # identical maps: Nyquist
    assert resolution_vs_known_map(_shifted(volume.flip(0), (2.0, 1.0, 0.0)), volume, APIX) == pytest.approx(good)
    noise = torch.randn(BOX, BOX, BOX, generator=torch.Generator().manual_seed(0))
    assert resolution_vs_known_map(noise, volume, APIX) > 5 * good


def test_a_nan_map_has_an_unknown_resolution_and_a_good_one_keeps_its_own(volume: torch.Tensor) -> None:
    nan_map = torch.full_like(volume, float("nan"))
    assert torch.isnan(torch.tensor(resolution_vs_known_map(nan_map, volume, APIX)))
    assert resolution_vs_known_map(volume, volume, APIX) == pytest.approx(2 * APIX)  # identical: Nyquist
