"""Tests of recon.pose_precision: the precision estimate from posterior spreads."""

import math

import numpy as np
import pytest
import torch
from cryofastar.recon.pose_precision import MEDIAN_PER_RMS, PRECISE_DEGREES, pose_precision


def test_median_per_rms_is_that_of_isotropic_gaussian_rotation_errors():
    """Angles of rotation vectors N(0, sigma^2 I3): median / RMS is the Maxwell distribution's."""
    g = torch.Generator().manual_seed(0)
    angles = (torch.randn(200_000, 3, generator=g, dtype=torch.float64) * 2.0).norm(dim=-1)
    ratio = float(angles.median() / angles.square().mean().sqrt())
    assert ratio == pytest.approx(MEDIAN_PER_RMS, abs=0.003)
    assert MEDIAN_PER_RMS == pytest.approx(0.888, abs=0.001)


def test_estimate_is_the_scaled_median_of_finite_spreads():
    spreads = torch.tensor([2.0, 4.0, 6.0, float("nan"), 8.0, 10.0])
    p = pose_precision(spreads)
    assert p.particles == 5
    assert p.median_spread_degrees == 6.0
    assert p.estimated_median_error_degrees == pytest.approx(6.0 * MEDIAN_PER_RMS)
    assert p.precise == (6.0 * MEDIAN_PER_RMS < PRECISE_DEGREES)
    assert "estimated median error 5.3°" in p.summary() and "of 5 particles" in p.summary()


def test_bar_decides_precise_and_numpy_input_is_accepted():
    spreads = np.full(10, 4.0)
    assert pose_precision(spreads).precise
    assert not pose_precision(spreads, bar_degrees=3.0).precise
    assert "NOT precise" in pose_precision(spreads, bar_degrees=3.0).summary()
    assert pose_precision(spreads).as_dict()["bar_degrees"] == PRECISE_DEGREES


def test_no_refined_particle_gives_none():
    assert pose_precision(torch.full((4,), math.nan)) is None
    assert pose_precision(np.zeros(0)) is None
