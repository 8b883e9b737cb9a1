"""Tests of recon/view_directions.py: view directions follow RELION's matrices; equal-area cells."""

import numpy as np
import pytest
import torch
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.view_directions import view_direction_histogram, view_directions


def test_direction_is_the_third_row_of_relions_matrix():
    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(-180, 180, 500), rng.uniform(-30, 210, 500), rng.uniform(-180, 180, 500)
    azimuth, elevation = view_directions(rot, tilt)
    a = np.deg2rad(azimuth)
    e = np.deg2rad(elevation)
    d = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], -1)
    matrices = euler_to_matrix(torch.from_numpy(rot), torch.from_numpy(tilt), torch.from_numpy(psi)).numpy()
    np.testing.assert_allclose(d, matrices[:, 2, :], atol=1e-9)
    assert azimuth.min() >= -180 and azimuth.max() < 180


def test_uniform_views_fill_every_equal_area_cell_equally():
    rotations = random_rotations(100_000, torch.Generator().manual_seed(1))
    rot, tilt, _ = matrix_to_euler(rotations.double())
    hist = view_direction_histogram(rot.numpy(), tilt.numpy(), azimuth_bins=24, elevation_bins=12)
    assert hist.counts.shape == (12, 24) and hist.counts.sum() == 100_000
    mean = 100_000 / hist.counts.size
    assert np.abs(hist.counts - mean).max() < 6 * np.sqrt(mean)  # Poisson noise only: no pole or band bias
    np.testing.assert_allclose(hist.elevation_edges[[0, 6, 12]], [-90, 0, 90], atol=1e-9)


def test_a_preferred_orientation_lands_in_one_cell():
    hist = view_direction_histogram(np.full(50, 45.0), np.full(50, 30.0), azimuth_bins=36, elevation_bins=18)
    row, col = np.unravel_index(hist.counts.argmax(), hist.counts.shape)
    assert hist.counts[row, col] == 50
    assert hist.azimuth_edges[col] <= 45 < hist.azimuth_edges[col + 1]
    assert hist.elevation_edges[row] <= 60 < hist.elevation_edges[row + 1]
    assert set(hist.to_json()) == {"azimuth_edges_degrees", "elevation_edges_degrees", "counts"}


def test_bad_bins_are_refused():
    with pytest.raises(ValueError, match="bins"):
        view_direction_histogram(np.zeros(1), np.zeros(1), azimuth_bins=0)
