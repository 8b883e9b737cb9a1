"""Shared fixtures: a small asymmetric phantom, an independent real-space projector, and ``spawn``
for processes closed after each test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

torch.set_num_threads(2)


@pytest.fixture
def spawn():
    """``spawn(cls, *args, **kwargs)`` starts a process object (e.g. ``session_helpers.ScriptProcess``);
    every one is closed after the test."""
    started = []

    def start(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        started.append(cls(*args, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.close()


def blob_phantom(box: int, n_blobs: int = 12, seed: int = 0) -> torch.Tensor:
    """`(B, B, B)` [z, y, x] sum of Gaussian blobs placed asymmetrically around B // 2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(n_blobs):
        cx, cy, cz = rng.uniform(-0.28, 0.28, size=3) * box
        sigma = rng.uniform(1.2, 2.5)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    # an unmistakably asymmetric arm along +x
    vol += np.exp(-((x - 0.3 * box) ** 2 + y**2 / 4 + z**2 / 4) / 2.0)
    return torch.as_tensor(vol, dtype=torch.float32)


def real_space_project(volume: torch.Tensor, matrix: np.ndarray) -> np.ndarray:
    """Rotate-and-sum projector, written independently of the package.

    RELION's rule: pixel (x, y) of the particle is the sum over z of the map at
    ``A.T @ (x, y, z)``, coordinates relative to the box centre B // 2, map
    indexed [z, y, x].
    """
    vol = volume.numpy().astype(np.float64)
    box = vol.shape[0]
    c = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")  # image pixel (x, y) and depth z
    image_xyz = np.stack([xx.ravel(), yy.ravel(), zz.ravel()])  # (3, B^3)
    map_xyz = matrix.T @ image_xyz
    coords = np.stack([map_xyz[2], map_xyz[1], map_xyz[0]]) + box // 2  # (z, y, x) indices
    sampled = map_coordinates(vol, coords, order=1, mode="constant", cval=0.0).reshape(box, box, box)
    return sampled.sum(axis=0)  # sum over depth -> [y, x]


@pytest.fixture(scope="session")
def phantom32() -> torch.Tensor:
    return blob_phantom(32)


@pytest.fixture(scope="session")
def projector():
    """The independent real-space projector :func:`real_space_project`."""
    return real_space_project


@pytest.fixture(scope="session")
def make_phantom():
    """The phantom factory :func:`blob_phantom`."""
    return blob_phantom


@pytest.fixture()
def fake_sources(tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    """A structure cache whose pinned archives are small fake ones, already downloaded
    (``structure_fixtures.fake_source_cache``); returns the cache folder."""
    from structure_fixtures import fake_source_cache

    return fake_source_cache(tmp_path, monkeypatch)
