"""Candidate orientations for projection matching: all of SO(3), or a ball around a pose.

Rotations are RELION matrices ``A`` (map frame -> particle frame, docs/conventions.md).

- :func:`global_rotation_grid`: an approximately uniform grid over SO(3) from torch-so3
  (Hopf fibration: view directions on the sphere x in-plane angles), at a given step.
  torch-so3 returns ZYZ Euler angles (phi, theta, psi) in degrees; they are turned into
  matrices with RELION's ZYZ rule. Whatever the exact Euler convention of the generator,
  a uniform set stays uniform under that bijection (tested by coverage).
- :func:`local_rotation_grid`: small rotations ``Δ`` on a cubic grid of rotation vectors
  inside a ball of radius ``range_degrees``; candidates around a pose ``A`` are ``A Δ``.
  :func:`local_rotation_vectors` gives the same grid as rotation vectors (for averaging).
"""

from __future__ import annotations

import math

import torch
from torch_so3 import get_uniform_euler_angles

from .euler import euler_to_matrix

__all__ = ["global_rotation_grid", "local_rotation_grid", "local_rotation_vectors", "rotation_vectors_to_matrices"]


def global_rotation_grid(step_degrees: float) -> torch.Tensor:
    """`(K, 3, 3)` float64 RELION matrices covering SO(3) with about ``step_degrees`` spacing.

    Every rotation lies within about ``step_degrees`` (geodesic) of a grid point.
    ``K`` grows as ``step^-3``: ~1,900 at 20°, ~15,000 at 10°.
    """
    if not 0 < step_degrees <= 90:
        raise ValueError(f"step must be in (0, 90] degrees, got {step_degrees}")
    angles = get_uniform_euler_angles(psi_step=step_degrees, theta_step=step_degrees)  # (K, 3) phi, theta, psi
    angles = angles.to(torch.float64)
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])


def rotation_vectors_to_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """`(..., 3)` rotation vectors (axis x angle, radians) -> `(..., 3, 3)` matrices (Rodrigues)."""
    return torch.linalg.matrix_exp(_skew(vectors))


def _skew(v: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                        torch.stack([-y, x, zero], -1)], -2)


def local_rotation_vectors(range_degrees: float, step_degrees: float) -> torch.Tensor:
    """`(M, 3)` float64 rotation vectors (radians) of :func:`local_rotation_grid`, in its order.

    A cubic grid of spacing ``step_degrees`` inside a ball of radius ``range_degrees``
    (identity, the zero vector, first). ``M`` is about ``4.2 (range / step)^3``.
    """
    if not 0 < step_degrees <= range_degrees:
        raise ValueError(f"need 0 < step <= range, got step {step_degrees}°, range {range_degrees}°")
    n = int(math.floor(range_degrees / step_degrees + 1e-9))
    axis = torch.arange(-n, n + 1, dtype=torch.float64) * math.radians(step_degrees)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[grid.norm(dim=-1) <= math.radians(range_degrees) + 1e-12]
    return grid[torch.argsort(grid.norm(dim=-1), stable=True)]  # identity first


def local_rotation_grid(range_degrees: float, step_degrees: float) -> torch.Tensor:
    """`(M, 3, 3)` float64 small rotations within ``range_degrees`` of the identity.

    Rotation vectors on a cubic grid of spacing ``step_degrees`` inside a ball of radius
    ``range_degrees`` (identity first; :func:`local_rotation_vectors`).
    """
    return rotation_vectors_to_matrices(local_rotation_vectors(range_degrees, step_degrees))
