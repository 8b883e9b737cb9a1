"""FSC and resolution read-out."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.recon import fsc, resolution_at_threshold, shell_resolutions_angstrom


def test_fsc_of_a_map_with_itself_is_one(phantom32: torch.Tensor) -> None:
    curve = fsc(phantom32, phantom32)
    assert curve.shape == (17,)
    torch.testing.assert_close(curve, torch.ones_like(curve))


def test_fsc_of_independent_noise_is_near_zero() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 48, 48, 48, generator=g)
    curve = fsc(a, b)
    assert float(curve[4:].abs().max()) < 0.15


def test_fsc_is_insensitive_to_scale_but_not_to_sign(phantom32: torch.Tensor) -> None:
    torch.testing.assert_close(fsc(phantom32, 3.0 * phantom32), torch.ones(17, dtype=torch.float64))
    assert float(fsc(phantom32, -phantom32)[1:].max()) < -0.99


def test_resolution_interpolates_the_crossing() -> None:
    curve = torch.tensor([1.0, 0.9, 0.6, 0.4, 0.1, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # box 16
    # crosses 0.5 halfway between shell 2 and 3 -> shell 2.5 -> 16 * 2 / 2.5 Å
    assert resolution_at_threshold(curve, apix=2.0, threshold=0.5) == pytest.approx(16 * 2.0 / 2.5)
    assert resolution_at_threshold(torch.ones(9, dtype=torch.float64), 2.0) == pytest.approx(4.0)
    assert resolution_at_threshold(torch.tensor([1.0] + [0.0] * 8), 2.0) == pytest.approx(32.0)
    assert shell_resolutions_angstrom(16, 2.0)[4] == pytest.approx(8.0)


def test_fsc_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="cubic"):
        fsc(torch.zeros(8, 8, 8), torch.zeros(10, 10, 10))


# ------------------------------------------------------------- issue 20: a NaN map has no resolution


def test_a_curve_that_is_nan_has_an_unknown_resolution_not_nyquist(phantom32: torch.Tensor) -> None:
    """Issue 20: a half map of NaN was reported at Nyquist (4.00 Å): an all-NaN curve never drops below 0.143."""
    from cryofastar.recon.fsc import resolution_text

    nan_half = torch.full_like(phantom32, float("nan"))
    curve = fsc(phantom32, nan_half)
    assert bool(torch.isnan(curve[1:]).all())
    assert math.isnan(resolution_at_threshold(curve, 2.0))
    one_shell = torch.tensor([1.0, 0.9, float("nan"), 0.9, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert math.isnan(resolution_at_threshold(one_shell, 2.0, 0.5))  # a hole in the curve: unknown, not a guess
    assert resolution_text(resolution_at_threshold(curve, 2.0)) == "undefined"
    assert resolution_text(4.0) == "4.00 Å" and resolution_text(None) == "undefined"

