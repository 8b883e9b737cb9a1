"""Rotation helpers of the whole package: random poses, angles between poses, the mirror.

Rotations are `(..., 3, 3)` matrices acting on (x, y, z) column vectors; poses are
RELION matrices ``A`` (map frame -> particle frame, docs/conventions.md). The mirror
``J = diag(1, 1, -1)`` maps poses of a map to poses of its mirror image: ``J A J``.
"""

from __future__ import annotations

import torch

__all__ = ["geodesic_degrees", "mirror_rotations", "random_rotations"]

_MIRROR = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, 3, 3)` float64 SO(3)-uniform rotation matrices (from uniform unit quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(n, 3, 3)


def mirror_rotations(rot: torch.Tensor) -> torch.Tensor:
    """``J @ A @ J`` with ``J = diag(1, 1, -1)``: the poses of the mirrored map.

    Parameters
    ----------
    rot: torch.Tensor
        `(..., 3, 3)` RELION matrices.

    Returns
    -------
    mirrored: torch.Tensor
        `(..., 3, 3)` same dtype; for Euler angles, ``(rot + 180, tilt, psi + 180)``.
    """
    j = _MIRROR.to(rot.dtype).to(rot.device)
    return rot * j[:, None] * j[None, :]


def geodesic_degrees(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(...)` angle (degrees, [0, 180]) of the rotation ``a.T @ b``, accurate near 0 and 180.

    Parameters
    ----------
    a, b: torch.Tensor
        `(..., 3, 3)` rotation matrices.
    """
    rel = a.transpose(-1, -2) @ b
    cos = (rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    skew = torch.stack([rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0],
                        rel[..., 1, 0] - rel[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, cos))
