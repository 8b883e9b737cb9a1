"""Pose solver: confidence-weighted Kabsch fit of each view's FPM to its planar coordinates.

Given the planar coordinates ``x0`` of a view's Fourier samples and the predicted 3D
positions ``X`` (the FPM) with positive weights ``w``, find the rotation ``R`` (det +1)
and offset ``c`` minimising ``sum w |R x0 + c - X|²`` (Kabsch/Umeyama via SVD). The
samples span a plane, which fixes ``R`` completely once det = +1 is imposed. With the
FPM convention of :mod:`cryofastar.model.fpm`, ``c = R tau``, so ``tau = Rᵀ c`` gives the
shift back. All batched: no loop over views.
"""

from __future__ import annotations

import torch

from .fpm import tau_to_origins

__all__ = ["fpm_to_poses", "rotation_from_covariance", "weighted_kabsch"]


def rotation_from_covariance(covariance: torch.Tensor) -> torch.Tensor:
    """The proper rotation ``R`` maximising ``trace(R @ covariance)`` (Kabsch's SVD step).

    For point pairs ``x1 ≈ R x0`` with weights ``w`` the covariance is ``sum w x0 x1ᵀ``;
    a rank-2 covariance (points in a plane through the origin) still fixes ``R`` once
    ``det R = +1`` is imposed.

    Parameters
    ----------
    covariance: torch.Tensor
        `(..., 3, 3)` ``sum w x0 x1ᵀ`` (any float dtype; differentiable).

    Returns
    -------
    rotation: torch.Tensor
        `(..., 3, 3)` proper rotations, the covariance's dtype.
    """
    u, _, vh = torch.linalg.svd(covariance)
    v = vh.transpose(-1, -2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.ones(*d.shape, 3, dtype=covariance.dtype, device=covariance.device)
    fix[..., 2] = d
    return (v * fix[..., None, :]) @ u.transpose(-1, -2)


def weighted_kabsch(x0: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted rigid fit ``x ≈ R x0 + c``.

    Parameters
    ----------
    x0: torch.Tensor
        `(P, 3)` source points (shared by all fits).
    x: torch.Tensor
        `(..., P, 3)` target points.
    weights: torch.Tensor
        `(..., P)` non-negative weights (not all zero).

    Returns
    -------
    rotation: torch.Tensor
        `(..., 3, 3)` proper rotations (float64).
    offset: torch.Tensor
        `(..., 3)` offsets ``c`` (float64).
    """
    x0, x, w = x0.double(), x.double(), weights.double()
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    mean0 = torch.einsum("...p,pi->...i", w, x0)
    mean1 = torch.einsum("...p,...pi->...i", w, x)
    centred0 = x0 - mean0[..., None, :]
    centred1 = x - mean1[..., None, :]
    covariance = torch.einsum("...p,...pi,...pj->...ij", w, centred0, centred1)  # sum w x0 x1ᵀ
    rotation = rotation_from_covariance(covariance)
    offset = mean1 - (rotation @ mean0[..., :, None])[..., 0]
    return rotation, offset


def fpm_to_poses(fpm: torch.Tensor, confidence: torch.Tensor, x0: torch.Tensor,
                 box: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations and shifts of views from their FPM.

    Parameters
    ----------
    fpm: torch.Tensor
        `(..., P..., 3)` predicted FPM (reference frame, Nyquist units).
    confidence: torch.Tensor
        `(..., P...)` positive confidences (used as Kabsch weights).
    x0: torch.Tensor
        `(P..., 3)` planar coordinates of the samples.
    box: int
        Model box in pixels (to convert the shift offset to pixels).

    Returns
    -------
    rel_rotations: torch.Tensor
        `(..., 3, 3)` float64 ``R_i = A_ref A_iᵀ``; with the reference frame as the map
        frame, view ``i``'s RELION matrix is ``R_iᵀ``.
    origins_px: torch.Tensor
        `(..., 2)` float64 rlnOrigin (x, y) in model pixels.
    """
    n_pix = x0.numel() // 3
    lead = fpm.shape[: fpm.dim() - x0.dim()]
    points = fpm.reshape(*lead, n_pix, 3)
    rotation, offset = weighted_kabsch(x0.reshape(n_pix, 3), points, confidence.reshape(*lead, n_pix))
    tau = (rotation.transpose(-1, -2) @ offset[..., None])[..., 0]
    return rotation, tau_to_origins(tau, box)
