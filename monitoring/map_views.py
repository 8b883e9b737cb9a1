"""What the dashboard draws of a map: central slices, projections and a small isosurface grid.

All inputs are maps as published (``docs/protocol.md``): `(B, B, B)` float32, axes
``[z, y, x]``, origin at voxel ``B // 2``. Images come out as nested lists ready for
JSON, row 0 first (the page draws row 0 at the bottom, so y points up as in an MRC
viewer). Values are rescaled for display only; nothing here is used for science.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ISO_SIZE", "VIEW_SIZE", "block_mean", "isosurface_grid", "map_views"]

VIEW_SIZE = 96  # slices and projections are block-averaged to at most this many pixels a side
ISO_SIZE = 24  # the isosurface grid: at most this many voxels a side (24^3 values to the browser)


def block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor``-sized blocks along every axis (edges cropped to a multiple).

    Parameters
    ----------
    array: np.ndarray
        `(N, ...)` any number of axes.
    factor: int
        Block size >= 1 (1 returns the array as float32).

    Returns
    -------
    np.ndarray
        `(N // factor, ...)` float32.
    """
    array = np.asarray(array, dtype=np.float32)
    if factor <= 1:
        return array
    crop = tuple(slice(0, (n // factor) * factor) for n in array.shape)
    array = array[crop]
    shape: list[int] = []
    for n in array.shape:
        shape += [n // factor, factor]
    return array.reshape(shape).mean(axis=tuple(range(1, 2 * array.ndim, 2)))


def _image(values: np.ndarray) -> list[list[float]]:
    """Min-max rescaled to [0, 1], 3 decimals (a flat image stays 0)."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.round(scaled, 3).tolist()


def map_views(volume: np.ndarray, size: int = VIEW_SIZE) -> dict[str, list[list[float]]]:
    """Three orthogonal central slices and three projections of a map.

    Parameters
    ----------
    volume: np.ndarray
        `(B, B, B)` map, axes [z, y, x].
    size: int
        Largest image side; bigger maps are block-averaged first.

    Returns
    -------
    dict
        ``slice_xy`` (z = B//2; rows y, columns x), ``slice_xz`` (y = B//2; rows z,
        columns x), ``slice_yz`` (x = B//2; rows z, columns y), and ``projection_z``,
        ``projection_y``, ``projection_x`` (sums along that axis, same layouts). Each is
        a list of rows with values in [0, 1].
    """
    volume = block_mean(volume, math.ceil(volume.shape[0] / size))
    c = volume.shape[0] // 2
    return {
        "slice_xy": _image(volume[c]),
        "slice_xz": _image(volume[:, c, :]),
        "slice_yz": _image(volume[:, :, c]),
        "projection_z": _image(volume.sum(0)),
        "projection_y": _image(volume.sum(1)),
        "projection_x": _image(volume.sum(2)),
    }


def isosurface_grid(volume: np.ndarray, apix: float, size: int = ISO_SIZE) -> dict[str, object]:
    """A small copy of the map for a browser isosurface, in units of its standard deviation.

    Parameters
    ----------
    volume: np.ndarray
        `(B, B, B)` map, axes [z, y, x].
    apix: float
        Its pixel size in Å.
    size: int
        Largest grid side; bigger maps are block-averaged first.

    Returns
    -------
    dict
        ``n`` (grid side), ``spacing_angstrom``, ``values`` (flattened x-fastest,
        (v - mean) / std, 2 decimals), and a suggested ``threshold`` with its slider
        range ``threshold_min`` / ``threshold_max`` (σ): the suggestion encloses the
        densest 8 % of the box.
    """
    factor = max(1, math.ceil(volume.shape[0] / size))
    small = block_mean(volume, factor)
    std = float(small.std())
    values = (small - small.mean()) / std if std > 0 else np.zeros_like(small)
    return {
        "n": int(small.shape[0]),
        "spacing_angstrom": float(apix) * factor,
        "values": np.round(values, 2).reshape(-1).tolist(),
        "threshold": round(float(np.quantile(values, 0.92)), 2),
        "threshold_min": round(float(np.quantile(values, 0.5)), 2),
        "threshold_max": round(float(values.max()), 2),
    }
