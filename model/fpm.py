"""The Fourier Planar Map (FPM): where each Fourier sample of a view lies in 3D.

For view ``i`` of a set whose first view is the **reference**, every planar Fourier
coordinate ``x0 = (kx, ky, 0)`` of the view (units of Nyquist, :func:`planar_coordinates`)
lies in the 3D transform of the molecule, expressed in the reference view's frame, at

    X = R_i · (x0 + tau_i),      R_i = A_ref · A_iᵀ,      tau_i = (SHIFT_SCALE · 2 o_i / B, 0)

with ``A`` RELION matrices (docs/conventions.md: view ``i``'s transform at ``k`` is the
map's at ``A_iᵀ k``, so in the reference frame, whose own ``A`` is the identity, it is at
``A_ref A_iᵀ k``), ``o_i`` the view's rlnOrigin in model pixels and ``B`` the model box.
``R_i · tau_i`` is the paper's ``h(t)``: a constant offset over the view that carries the
shift, so one Kabsch fit returns rotation and shift. The reference view's own FPM is
``x0 + tau_ref``.

Mirror: a molecule and its mirror image give identical projections, with poses
``A`` and ``J A J`` (``J = diag(1, 1, -1)``); since ``J x0 = x0`` the mirrored FPM is just
``J X`` (z negated). A whole set may be mirrored, never single views.
"""

from __future__ import annotations

import torch

__all__ = ["SHIFT_SCALE", "fourier_planar_map", "mirror_fpm", "origins_to_tau", "relative_rotations", "tau_to_origins"]

SHIFT_SCALE = 2.0
"""Weight of the shift in the FPM: a shift of B/4 pixels moves the FPM by one Nyquist unit."""


def relative_rotations(rotations: torch.Tensor) -> torch.Tensor:
    """`(..., V, 3, 3)` RELION matrices of a set, view 0 the reference -> `(..., V, 3, 3)` ``A_0 A_iᵀ``."""
    return rotations[..., :1, :, :] @ rotations.transpose(-1, -2)


def origins_to_tau(origins_px: torch.Tensor, box: int) -> torch.Tensor:
    """`(..., 2)` rlnOrigin in model pixels -> `(..., 3)` FPM offsets ``tau`` (Nyquist units)."""
    tau = origins_px * (SHIFT_SCALE * 2.0 / box)
    return torch.cat([tau, torch.zeros_like(tau[..., :1])], dim=-1)


def tau_to_origins(tau: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`origins_to_tau` (the z part is dropped): `(..., 3)` -> `(..., 2)` pixels."""
    return tau[..., :2] * (box / (SHIFT_SCALE * 2.0))


def fourier_planar_map(rel_rotations: torch.Tensor, tau: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """FPM of views.

    Parameters
    ----------
    rel_rotations: torch.Tensor
        `(..., 3, 3)` rotations into the reference frame (:func:`relative_rotations`).
    tau: torch.Tensor
        `(..., 3)` shift offsets (:func:`origins_to_tau`).
    x0: torch.Tensor
        `(P..., 3)` planar coordinates of the samples, e.g. `(L, R, 3)`.

    Returns
    -------
    fpm: torch.Tensor
        `(..., P..., 3)`: ``R (x0 + tau)`` for every sample.
    """
    lead, pixel_dims = rel_rotations.shape[:-2], x0.shape[:-1]
    points = x0.reshape(*([1] * len(lead)), -1, 3) + tau[..., None, :]  # (..., P, 3)
    fpm = points @ rel_rotations.transpose(-1, -2)
    return fpm.reshape(*lead, *pixel_dims, 3)


def mirror_fpm(fpm: torch.Tensor) -> torch.Tensor:
    """The FPM of the mirrored set (z negated), `(..., 3)` -> `(..., 3)`."""
    return fpm * fpm.new_tensor([1.0, 1.0, -1.0])
