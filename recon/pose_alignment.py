"""The global rotation and hand between two pose sets of the same particles.

Maps, and hence poses, are defined only up to a global rotation and the hand: poses
``A`` of a map and ``A @ G`` (or ``J @ A @ J @ G``, ``J = diag(1, 1, -1)``) of the same
map rotated (or mirrored and rotated) describe the same particles equally well. This
module finds that transform between two pose sets (predicted vs true in benchmarks; two
ab initio restarts in :mod:`cryofastar.recon.ab_initio`, to tell whether they found the
same structure). Poses are RELION matrices ``A`` (map frame -> particle frame,
docs/conventions.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rotations import geodesic_degrees, mirror_rotations

__all__ = ["Alignment", "apply_alignment_to_rotations", "as_rotations", "cyclic_symmetry", "global_alignment",
           "median_degrees", "nearest_symmetry_mates"]


def cyclic_symmetry(order: int) -> torch.Tensor:
    """`(order, 3, 3)` float64 rotations about z by ``2 pi k / order``: the operators of Cn (RELION's axis)."""
    if order < 1:
        raise ValueError(f"symmetry order must be >= 1, got {order}")
    a = torch.arange(order, dtype=torch.float64) * (2 * math.pi / order)
    c, s = torch.cos(a), torch.sin(a)
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(order, 3, 3)


def nearest_symmetry_mates(aligned: torch.Tensor, true: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """For each particle, the pose among ``true_i @ S_k`` (all equivalent for a symmetric map) nearest ``aligned_i``.

    A map with symmetry operators ``S_k`` (map frame) projects alike at ``A`` and ``A @ S_k``.
    ``aligned``, ``true`` `(n, 3, 3)`, ``operators`` `(m, 3, 3)`; returns `(n, 3, 3)`.
    """
    mates = true[:, None] @ operators[None]  # (n, m, 3, 3)
    best = geodesic_degrees(aligned[:, None], mates).argmin(1)
    return mates[torch.arange(true.shape[0]), best]


def median_degrees(values: torch.Tensor) -> float:
    """Median (mean of the two middle values for an even count)."""
    return float(torch.quantile(values.to(torch.float64), 0.5))


@dataclass(frozen=True)
class Alignment:
    """The global transform from the predicted frame to the true one.

    Attributes
    ----------
    rotation: torch.Tensor
        `(3, 3)` float64 ``G`` in SO(3); aligned poses are ``A_pred @ G`` (or
        ``J @ A_pred @ J @ G`` when ``mirrored``).
    mirrored: bool
        Whether the predicted frame has the other handedness (``J = diag(1, 1, -1)``).
    median_degrees: tuple[float, float]
        Median geodesic error (degrees) after the fit with the original hand and with
        the mirrored hand; the hand with the smaller one is kept.
    """

    rotation: torch.Tensor
    mirrored: bool
    median_degrees: tuple[float, float]


def as_rotations(rot: torch.Tensor, name: str) -> torch.Tensor:
    """``rot`` as float64 `(n, 3, 3)`, n >= 1 (ValueError naming ``name`` otherwise)."""
    rot = torch.as_tensor(rot).to(torch.float64)
    if rot.ndim != 3 or rot.shape[-2:] != (3, 3) or rot.shape[0] == 0:
        raise ValueError(f"{name} must be (n, 3, 3) rotation matrices with n >= 1, got {tuple(rot.shape)}")
    return rot


def _project_so3(m: torch.Tensor) -> torch.Tensor:
    """Nearest rotation (Frobenius) to the `(3, 3)` matrix ``m``: ``U diag(1, 1, det) V.T``."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.ones(3, dtype=m.dtype, device=m.device)
    d[2] = torch.sign(torch.linalg.det(u @ vh))  # u @ vh is orthogonal: det = +-1
    return (u * d) @ vh


def _fit_rotation(pred: torch.Tensor, true: torch.Tensor, keep_fraction: float, refinements: int) -> torch.Tensor:
    """``G`` minimising ``sum ||pred @ G - true||_F^2`` over the best-fitting particles.

    The first fit uses every particle; each refinement refits on the ``keep_fraction``
    with the smallest geodesic error under the previous ``G``.
    """
    g = _project_so3((pred.transpose(-1, -2) @ true).sum(0))
    n_keep = max(1, math.ceil(keep_fraction * pred.shape[0]))
    for _ in range(refinements):
        best = torch.topk(geodesic_degrees(pred @ g, true), n_keep, largest=False).indices
        g = _project_so3((pred[best].transpose(-1, -2) @ true[best]).sum(0))
    return g


def _fit_rotation_symmetric(pred: torch.Tensor, true: torch.Tensor, operators: torch.Tensor,
                            keep_fraction: float, refinements: int) -> torch.Tensor:
    """``G`` for a symmetric map: the best of one-particle fits (``pred_j.T @ true_j``, up to 64 particles,
    judged by the median angle to the nearest symmetry mates), then trimmed least-squares refits against them."""
    n = pred.shape[0]
    picks = torch.linspace(0, n - 1, min(n, 64)).round().long()
    candidates = pred[picks].transpose(-1, -2) @ true[picks]  # (c, 3, 3)
    scores = torch.stack([geodesic_degrees(pred @ g, nearest_symmetry_mates(pred @ g, true, operators)).median()
                          for g in candidates])
    g = candidates[scores.argmin()]
    n_keep = max(1, math.ceil(keep_fraction * n))
    for _ in range(max(1, refinements) + 2):
        targets = nearest_symmetry_mates(pred @ g, true, operators)
        best = torch.topk(geodesic_degrees(pred @ g, targets), n_keep, largest=False).indices
        g = _project_so3((pred[best].transpose(-1, -2) @ targets[best]).sum(0))
    return g


def global_alignment(
    pred: torch.Tensor, true: torch.Tensor, keep_fraction: float = 0.5, refinements: int = 1, symmetry: int = 1
) -> Alignment:
    """The global rotation (and handedness) taking predicted poses to true ones.

    For each hand (predicted poses as given, and mirrored ``J @ A @ J``) ``G`` in SO(3)
    is the least-squares fit of ``A_pred @ G = A_true`` (``G = U diag(1, 1, ±1) V.T``
    from the SVD of ``sum A_pred.T @ A_true``), refitted ``refinements`` times on the
    ``keep_fraction`` best-fitting particles (robust to outliers). The hand with the
    smaller median geodesic error wins.

    Parameters
    ----------
    pred, true: torch.Tensor
        `(n, 3, 3)` RELION matrices of the same particles, in the same order.
    keep_fraction: float
        Fraction of particles (0 < f <= 1) used in each refinement.
    refinements: int
        Number of trimmed refits (0: plain least squares on all particles).
    symmetry: int
        Order ``n`` of the map's Cn symmetry about z (1: none). Poses are then equivalent up
        to ``A @ S_k``; errors are measured to the nearest equivalent pose, and ``G`` starts
        from the best of one-particle fits (a single least-squares fit fails when particles
        took different equivalent poses).

    Returns
    -------
    alignment: Alignment
        ``G`` (float64), the handedness and the median error of each hand.
    """
    pred, true = as_rotations(pred, "pred"), as_rotations(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true must have the same shape, got {tuple(pred.shape)} and {tuple(true.shape)}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    operators = cyclic_symmetry(symmetry)
    fits, medians = [], []
    for candidate in (pred, mirror_rotations(pred)):
        if symmetry == 1:
            g = _fit_rotation(candidate, true, keep_fraction, refinements)
            targets = true
        else:
            g = _fit_rotation_symmetric(candidate, true, operators, keep_fraction, refinements)
            targets = nearest_symmetry_mates(candidate @ g, true, operators)
        fits.append(g)
        medians.append(median_degrees(geodesic_degrees(candidate @ g, targets)))
    mirrored = medians[1] < medians[0]
    return Alignment(rotation=fits[int(mirrored)], mirrored=bool(mirrored), median_degrees=(medians[0], medians[1]))


def apply_alignment_to_rotations(rot: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """Express predicted poses in the true frame.

    Parameters
    ----------
    rot: torch.Tensor
        `(..., 3, 3)` predicted RELION matrices.
    alignment: Alignment
        From :func:`global_alignment`.

    Returns
    -------
    aligned: torch.Tensor
        `(..., 3, 3)` float64 ``A @ G``, or ``J @ A @ J @ G`` when ``alignment.mirrored``.
    """
    rot = torch.as_tensor(rot).to(torch.float64)
    if alignment.mirrored:
        rot = mirror_rotations(rot)
    return rot @ alignment.rotation.to(rot.device)


