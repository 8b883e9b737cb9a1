"""Where the particles look from: view directions and their equal-area histogram.

Convention (docs/conventions.md, "Rotations"): a particle with RELION angles
``(rot, tilt, psi)`` is the projection of the map along the unit vector
``d = A[2, :] = (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))`` in the map's
xyz frame (``A`` from :func:`~cryofastar.recon.euler.euler_to_matrix`); ``psi`` is an
in-plane rotation and does not change ``d``. As a point on the sphere, ``d`` has
**azimuth** ``rot`` (degrees, wrapped to [-180, 180)) and **elevation** ``90 - tilt`` (degrees,
[-90, 90]: +90 looks down the map's z axis).

The histogram's elevation bins are equal-area (uniform in ``sin(elevation)``), so every
cell covers the same solid angle: a uniform spread of views gives equal counts in every
cell, and a count shows density directly (preferred orientation at a glance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ViewHistogram", "view_direction_histogram", "view_directions"]


def view_directions(rot_degrees: np.ndarray, tilt_degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Azimuth and elevation of each particle's view direction.

    Parameters
    ----------
    rot_degrees, tilt_degrees: np.ndarray
        `(n,)` rlnAngleRot and rlnAngleTilt in degrees.

    Returns
    -------
    azimuth, elevation: np.ndarray
        `(n,)` float64 degrees, azimuth in [-180, 180), elevation in [-90, 90] (any
        tilt, also outside RELION's usual [0, 180], gives the true direction).
    """
    rot = np.deg2rad(np.asarray(rot_degrees, dtype=np.float64))
    tilt = np.deg2rad(np.asarray(tilt_degrees, dtype=np.float64))
    x, y, z = np.sin(tilt) * np.cos(rot), np.sin(tilt) * np.sin(rot), np.cos(tilt)  # d = A[2, :]
    azimuth = np.rad2deg(np.arctan2(y, x))
    azimuth = np.where(azimuth >= 180.0, azimuth - 360.0, azimuth)
    return azimuth, np.rad2deg(np.arcsin(np.clip(z, -1.0, 1.0)))


@dataclass(frozen=True)
class ViewHistogram:
    """Counts of view directions on an equal-area azimuth x elevation grid.

    Attributes
    ----------
    counts: np.ndarray
        `(E, A)` int64 particles per cell; row 0 is the lowest elevation.
    azimuth_edges, elevation_edges: np.ndarray
        `(A + 1,)` and `(E + 1,)` cell edges in degrees (elevation edges are
        ``degrees(arcsin(linspace(-1, 1, E + 1)))``).
    """

    counts: np.ndarray
    azimuth_edges: np.ndarray
    elevation_edges: np.ndarray

    def to_json(self) -> dict[str, list]:
        """Plain lists for JSON (``counts`` row-major, lowest elevation first)."""
        return {"azimuth_edges_degrees": [round(float(v), 4) for v in self.azimuth_edges],
                "elevation_edges_degrees": [round(float(v), 4) for v in self.elevation_edges],
                "counts": self.counts.tolist()}


def view_direction_histogram(rot_degrees: np.ndarray, tilt_degrees: np.ndarray, azimuth_bins: int = 36,
                             elevation_bins: int = 18) -> ViewHistogram:
    """Equal-area histogram of view directions (module docstring for the convention).

    Parameters
    ----------
    rot_degrees, tilt_degrees: np.ndarray
        `(n,)` rlnAngleRot and rlnAngleTilt in degrees.
    azimuth_bins, elevation_bins: int
        Grid size (A, E); every cell covers ``4 pi / (A E)`` steradians.

    Returns
    -------
    ViewHistogram
        `(E, A)` counts and the cell edges.
    """
    if azimuth_bins < 1 or elevation_bins < 1:
        raise ValueError(f"bins must be >= 1, got {azimuth_bins} x {elevation_bins}")
    azimuth, elevation = view_directions(rot_degrees, tilt_degrees)
    az_edges = np.linspace(-180.0, 180.0, azimuth_bins + 1)
    sin_edges = np.linspace(-1.0, 1.0, elevation_bins + 1)
    az_index = np.clip(((azimuth + 180.0) / 360.0 * azimuth_bins).astype(np.int64), 0, azimuth_bins - 1)
    el_index = np.clip(((np.sin(np.deg2rad(elevation)) + 1.0) / 2.0 * elevation_bins).astype(np.int64), 0,
                       elevation_bins - 1)
    flat = np.bincount(el_index * azimuth_bins + az_index, minlength=azimuth_bins * elevation_bins)
    return ViewHistogram(flat.reshape(elevation_bins, azimuth_bins).astype(np.int64), az_edges,
                         np.rad2deg(np.arcsin(sin_edges)))
