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

__all__ = ["Alignment", "PoseAgreement", "apply_alignment_to_rotations", "as_rotations", "cyclic_symmetry",
           "symmetry_group",
           "global_alignment", "median_degrees", "nearest_symmetry_mates", "pose_agreement"]


def cyclic_symmetry(order: int) -> torch.Tensor:
    """`(order, 3, 3)` float64 rotations about z by ``2 pi k / order``: the operators of Cn (RELION's axis)."""
    if order < 1:
        raise ValueError(f"symmetry order must be >= 1, got {order}")
    a = torch.arange(order, dtype=torch.float64) * (2 * math.pi / order)
    c, s = torch.cos(a), torch.sin(a)
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(order, 3, 3)


def symmetry_group(symmetry: int | torch.Tensor) -> torch.Tensor:
    """`(m, 3, 3)` float64 symmetry operators: Cn about z for an order ``n``, or the given operators.

    ``symmetry`` is an order (1: none) or an `(m, 3, 3)` tensor of rotations in the map's
    frame (a map with them projects alike at ``A`` and ``A @ S_k``), the identity among them.
    """
    if isinstance(symmetry, int):
        return cyclic_symmetry(symmetry)
    ops = as_rotations(torch.as_tensor(symmetry), "symmetry")
    eye = torch.eye(3, dtype=ops.dtype)
    if not bool(((ops - eye).abs().amax(dim=(-2, -1)) < 1e-6).any()):
        raise ValueError("symmetry operators must include the identity")
    return ops


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
    pred: torch.Tensor, true: torch.Tensor, keep_fraction: float = 0.5, refinements: int = 1,
    symmetry: int | torch.Tensor = 1,
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
    symmetry: int | torch.Tensor
        Order ``n`` of the map's Cn symmetry about z (1: none), or its operators `(m, 3, 3)`
        (:func:`symmetry_group`). Poses are then equivalent up to ``A @ S_k``; errors are
        measured to the nearest equivalent pose, and ``G`` starts from the best of
        one-particle fits (a single least-squares fit fails when particles took different
        equivalent poses).

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
    operators = symmetry_group(symmetry)
    fits, medians = [], []
    for candidate in (pred, mirror_rotations(pred)):
        if len(operators) == 1:
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




@dataclass(frozen=True)
class PoseAgreement:
    """How well two pose sets of the same particles agree, up to a global transform and an unknown Cn symmetry.

    Attributes
    ----------
    agree: bool
        The two describe the same map.
    median_degrees: float
        Median angle between the poses after the alignment, to the nearest equivalent pose
        when ``order`` > 1.
    order: int
        The cyclic symmetry the agreement needed (1: none; n: the particles took different
        of n equivalent poses in the two sets).
    """

    agree: bool
    median_degrees: float
    order: int


def _rotation_about(axis: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """`(m, 3, 3)` rotations by ``angles`` (rad) about the unit ``axis`` (Rodrigues)."""
    k = torch.zeros(3, 3, dtype=torch.float64)
    k[0, 1], k[0, 2], k[1, 2] = -axis[2], axis[1], -axis[0]
    k = k - k.T
    eye = torch.eye(3, dtype=torch.float64)
    return eye + torch.sin(angles)[:, None, None] * k + (1 - torch.cos(angles))[:, None, None] * (k @ k)


def pose_agreement(first: torch.Tensor, second: torch.Tensor, tolerance_degrees: float = 15.0,
                   max_order: int = 6) -> PoseAgreement:
    """Do two pose sets of the same particles (e.g. two ab initio starts) describe the same map?

    Neither the frame, nor the hand, nor the symmetry of the map is known. ``G`` (and the
    hand) is the one-particle fit ``first_j.T @ second_j`` that brings most particles
    within ``tolerance_degrees``, refitted on those. Then each particle's residual
    ``S_i = G.T first_i.T second_i`` is the identity for a map without symmetry, and one
    of the rotations by ``2 pi k / n`` about the symmetry axis for a Cn map whose particles
    took different equivalent poses in the two sets. The sets agree when the median angle
    of ``S_i`` to the identity is within the tolerance (order 1), or, for the smallest
    order n <= ``max_order``, to the nearest of the n rotations about the residuals' common
    axis within half the tolerance with each of the n populated (a particle spinning freely
    about one axis, as a wrong start of an elongated particle can, fills every angle and
    fails this).

    Parameters
    ----------
    first, second: torch.Tensor
        `(n, 3, 3)` RELION matrices of the same particles.
    tolerance_degrees: float
        Largest median angle of agreement (half of it with symmetry).
    max_order: int
        Highest cyclic symmetry tried.
    """
    first, second = as_rotations(first, "first"), as_rotations(second, "second")
    n = first.shape[0]
    picks = torch.linspace(0, n - 1, min(n, 64)).round().long()
    best = None  # (fraction within tolerance, residuals S)
    for hand in (first, mirror_rotations(first)):
        candidates = hand[picks].transpose(-1, -2) @ second[picks]  # (c, 3, 3): hand_j G = second_j
        residual = candidates.transpose(-1, -2)[:, None] @ hand.transpose(-1, -2)[None] @ second[None]  # (c, n, 3, 3)
        eye = torch.eye(3, dtype=torch.float64).expand_as(residual)
        close = geodesic_degrees(residual, eye) <= tolerance_degrees
        c = int(close.sum(1).argmax())
        inliers = close[c]
        g = _project_so3((hand[inliers].transpose(-1, -2) @ second[inliers]).sum(0))  # refit on the inliers
        s = g.T @ hand.transpose(-1, -2) @ second
        fraction = float((geodesic_degrees(s, torch.eye(3, dtype=torch.float64).expand_as(s))
                          <= tolerance_degrees).double().mean())
        if best is None or fraction > best[0]:
            best = (fraction, s)
    s = best[1]
    angle = geodesic_degrees(s, torch.eye(3, dtype=torch.float64).expand_as(s))
    plain = median_degrees(angle)
    if plain <= tolerance_degrees:
        return PoseAgreement(True, plain, 1)
    turned = angle > 2 * tolerance_degrees
    if int(turned.sum()) >= 3:
        v = torch.stack([s[:, 2, 1] - s[:, 1, 2], s[:, 0, 2] - s[:, 2, 0], s[:, 1, 0] - s[:, 0, 1]], -1)[turned]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        axis = torch.linalg.eigh(v.T @ v)[1][:, -1]
        for order in range(2, max_order + 1):
            ops = _rotation_about(axis, torch.arange(order, dtype=torch.float64) * (2 * math.pi / order))
            distance = geodesic_degrees(s[:, None], ops[None])  # (n, order)
            nearest, which = distance.min(1)
            counts = torch.bincount(which, minlength=order)
            if (median_degrees(nearest) <= tolerance_degrees / 2
                    and bool((counts >= n / (3 * order)).all())):
                return PoseAgreement(True, median_degrees(nearest), order)
    return PoseAgreement(False, plain, 1)
