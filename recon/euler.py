"""RELION Euler angles (ZYZ, degrees) <-> rotation matrices.

Convention (docs/conventions.md, "Rotations"): for angles ``(rot, tilt, psi)``
RELION's matrix is ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` built from the *passive*
elementary rotations ``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and
``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``. ``A`` left-multiplies xyz column
vectors. The 2D Fourier transform of a particle at frequency ``k = (kx, ky, 0)``
equals the 3D transform of the map at ``A.T @ k``; in real space the particle is
the projection along z of the map sampled at ``A.T @ (x, y, z)``.
"""

from __future__ import annotations

import torch

__all__ = ["euler_to_matrix", "matrix_to_euler"]


def euler_to_matrix(
    rot_degrees: torch.Tensor, tilt_degrees: torch.Tensor, psi_degrees: torch.Tensor
) -> torch.Tensor:
    """RELION ``Euler_angles2matrix``, vectorised.

    Parameters
    ----------
    rot_degrees, tilt_degrees, psi_degrees: torch.Tensor
        `(...)` rlnAngleRot, rlnAngleTilt, rlnAnglePsi in degrees (broadcastable).

    Returns
    -------
    matrices: torch.Tensor
        `(..., 3, 3)` matrices ``A`` (float64 if the angles are float64, else float32)
        that left-multiply xyz column vectors.
    """
    rot, tilt, psi = torch.broadcast_tensors(
        torch.as_tensor(rot_degrees), torch.as_tensor(tilt_degrees),
        torch.as_tensor(psi_degrees),
    )
    dtype = rot.dtype if rot.dtype == torch.float64 else torch.float32
    a, b, g = (torch.deg2rad(t.to(dtype)) for t in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb,
        -sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb,
        sc, ss, cb,
    ]
    return torch.stack(rows, dim=-1).reshape(*rot.shape, 3, 3)


def matrix_to_euler(
    matrices: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION ``Euler_matrix2angles``, vectorised.

    Parameters
    ----------
    matrices: torch.Tensor
        `(..., 3, 3)` rotation matrices ``A`` (RELION convention).

    Returns
    -------
    rot, tilt, psi: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        `(...)` angles in degrees; rot and psi in (-180, 180], tilt in [0, 180].
        At the gimbal poles (tilt 0 or 180) rot is 0 and psi carries the in-plane
        angle, as in RELION.
    """
    A = matrices
    abs_sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * torch.finfo(torch.float32).eps
    gamma = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    beta = torch.atan2(abs_sb, A[..., 2, 2])
    upright = A[..., 2, 2] > 0
    pole_gamma = torch.where(
        upright,
        torch.atan2(-A[..., 1, 0], A[..., 0, 0]),
        torch.atan2(A[..., 1, 0], -A[..., 0, 0]),
    )
    pole_beta = torch.where(upright, torch.zeros_like(beta), torch.full_like(beta, torch.pi))
    alpha = torch.where(regular, alpha, torch.zeros_like(alpha))
    beta = torch.where(regular, beta, pole_beta)
    gamma = torch.where(regular, gamma, pole_gamma)
    return torch.rad2deg(alpha), torch.rad2deg(beta), torch.rad2deg(gamma)
