"""Common lines between views and the rotations they fix: the parameter-free half of the geometric decoder.

Frames (docs/conventions.md, "Network poses"): a view's *relative rotation*
``R_i = A_ref @ A_i.T`` maps a direction in view ``i``'s image plane, ``(x, y, 0)``, into
the reference view's frame; the reference itself has ``R = I``. Ray ``l`` of a view points
along ``u_l = (cos theta_l, sin theta_l, 0)`` (:mod:`cryofastar.recon.fourier_rays`).

Two views ``i, j`` share the central line ``q`` along ``n_i x n_j`` (``n = R e_z``, the view
directions): ``R_i u_l = R_j u_m = q`` for the matching rays ``l, m``, and the opposite rays
``l + L/2, m + L/2`` match as well (the conjugate half of the line). Views with parallel or
antiparallel directions share their whole plane: no line is defined.

A match is described by a probability ``P_ij(l, m)`` over ray pairs (from a network or from
correlation). Everything downstream uses only its **pair covariance**
``M_ij = sum_lm P_ij(l, m) u_l u_mᵀ`` (3 x 3, zero third row and column):

* the agreement of rotations with the matches is ``sum_ij trace(R_i M_ij R_jᵀ)``;
* a view whose partners' rotations are known is placed by Kabsch on
  ``C_i = sum_p M_ip R_pᵀ`` (:func:`place_views`). This is the confidence-weighted Kabsch
  of the view's dense ray FPM (:func:`ray_fpm`): every ray's matched 3D direction with its
  match probability as confidence; rays pass through the origin, so there is no offset;
* the reference and its anchors are placed together by :func:`synchronise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kabsch import rotation_from_covariance

__all__ = ["TrueCommonLines", "dihedral_rotations", "pair_covariance", "place_views", "ray_fpm",
           "synchronise", "true_common_lines", "trace_agreement"]


@dataclass
class TrueCommonLines:
    """Where two views' common line lies, from their true rotations.

    Attributes
    ----------
    ray_a, ray_b: torch.Tensor
        `(...)` fractional ray indices in ``[0, L)`` of the line in view a and view b
        (``R_a u(ray_a) = R_b u(ray_b)``); the opposite rays ``+ L/2`` match too.
    angle_degrees: torch.Tensor
        `(...)` angle between the two view directions folded to ``[0, 90]``: 0 for
        parallel or antiparallel views (no line defined).
    """

    ray_a: torch.Tensor
    ray_b: torch.Tensor
    angle_degrees: torch.Tensor


def true_common_lines(rotations_a: torch.Tensor, rotations_b: torch.Tensor, n_rays: int) -> TrueCommonLines:
    """The common lines of view pairs from their relative rotations.

    Parameters
    ----------
    rotations_a, rotations_b: torch.Tensor
        `(..., 3, 3)` relative rotations (module docstring), broadcastable.
    n_rays: int
        ``L`` rays per view over a full turn.
    """
    normal_a, normal_b = rotations_a[..., :, 2], rotations_b[..., :, 2]
    cross = torch.linalg.cross(normal_a, normal_b)
    sine = cross.norm(dim=-1)
    line = cross / sine.clamp_min(1e-12)[..., None]

    def ray_index(rotation: torch.Tensor) -> torch.Tensor:
        in_plane = (rotation.transpose(-1, -2) @ line[..., None])[..., 0]
        angle = torch.atan2(in_plane[..., 1], in_plane[..., 0]) % (2 * math.pi)
        return (angle * (n_rays / (2 * math.pi))) % n_rays

    cosine = (normal_a * normal_b).sum(-1).abs().clamp(max=1.0)
    return TrueCommonLines(ray_index(rotations_a), ray_index(rotations_b),
                           torch.rad2deg(torch.atan2(sine, cosine)))


def pair_covariance(probabilities: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``M = sum_lm P(l, m) u_l u_mᵀ`` of ray-pair probabilities.

    Parameters
    ----------
    probabilities: torch.Tensor
        `(..., L, L)` non-negative weights of ray ``l`` of the first view matching ray
        ``m`` of the second (need not sum to 1: the mass left out is "no common line").
    directions: torch.Tensor
        `(L, 3)` ray directions ``u_l`` (:func:`~cryofastar.recon.fourier_rays.ray_directions`).

    Returns
    -------
    torch.Tensor
        `(..., 3, 3)` pair covariances, the probabilities' dtype.
    """
    u = directions.to(probabilities.dtype)
    return u.transpose(0, 1) @ probabilities @ u


def trace_agreement(rotations_a: torch.Tensor, covariance: torch.Tensor, rotations_b: torch.Tensor) -> torch.Tensor:
    """`(...)` ``trace(R_a M_ab R_bᵀ)``: the match-weighted cosine between matched rays once placed."""
    return torch.einsum("...ij,...jk,...ik->...", rotations_a, covariance, rotations_b)


def _rz(angles: torch.Tensor) -> torch.Tensor:
    c, s = angles.cos(), angles.sin()
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).reshape(*angles.shape, 3, 3)


def _rx(angles: torch.Tensor) -> torch.Tensor:
    c, s = angles.cos(), angles.sin()
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([one, zero, zero, zero, c, -s, zero, s, c], -1).reshape(*angles.shape, 3, 3)


def dihedral_rotations(alpha: torch.Tensor, beta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Relative rotations of a view whose common line with the reference is known.

    The view's ray at angle ``alpha`` matches the reference's ray at angle ``beta``; the
    one freedom left is the dihedral angle ``phi`` of the two planes about that line:
    ``R = Rz(beta) Rx(phi) Rz(-alpha)`` (active rotations), so ``R u(alpha) = u(beta)``.

    Parameters
    ----------
    alpha, beta, phi: torch.Tensor
        `(...)` radians, broadcastable.

    Returns
    -------
    torch.Tensor
        `(..., 3, 3)` relative rotations.
    """
    alpha, beta, phi = torch.broadcast_tensors(alpha, beta, phi)
    return _rz(beta) @ _rx(phi) @ _rz(-alpha)


def _line_angles(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-plane angles (first view, second view) of the dominant match in `(..., 3, 3)` covariances."""
    u, _, vh = torch.linalg.svd(covariance[..., :2, :2])
    first, second = u[..., :, 0], vh[..., 0, :]
    return torch.atan2(first[..., 1], first[..., 0]), torch.atan2(second[..., 1], second[..., 0])


ROBUST_DEGREES = 10.0
"""Scale of the robust pair weights of :func:`synchronise`: a pair whose matched rays, once placed, are
this far apart counts ``exp(-1/2)`` as much as one that agrees exactly (a property of the method, the same
for every molecule)."""


def _robust_weights(cosine: torch.Tensor, robust_degrees: float) -> torch.Tensor:
    """``exp(-theta^2 / (2 robust_degrees^2))`` of the angle ``theta`` (degrees) whose cosine is given."""
    return torch.exp(-torch.rad2deg(torch.arccos(cosine)).square() / (2 * robust_degrees ** 2))


def synchronise(covariance: torch.Tensor, n_dihedral: int = 120, sweeps: int = 8, starts: int = 4,
                robust_degrees: float = ROBUST_DEGREES) -> torch.Tensor:
    """Relative rotations of a reference (view 0) and its anchors from all their pair covariances.

    1. Each anchor's common line with the reference fixes its rotation up to the dihedral
       angle (:func:`dihedral_rotations`). One anchor goes first: its dihedral is tried on a
       grid of ``n_dihedral / 2`` values in ``[0, pi)`` (the other half is the mirror image,
       which common lines cannot tell apart); for each, the other anchors in turn take the
       dihedral on the full grid that agrees best with the views placed before them. Each
       of the first ``starts`` anchors is tried first; the placement with the largest
       total agreement wins (one wrong line to the reference then cannot sink the set).
    2. Block-coordinate ascent of the robustly weighted agreement
       ``sum w_ij trace(R_i M_ij R_jᵀ)``: each anchor in turn is re-fitted by Kabsch
       against all other views (the reference stays the identity). Before each sweep every
       pair is weighted by how well its match agrees with the current rotations,
       ``w = exp(-theta^2 / (2 robust_degrees^2))``, ``theta`` the angle between its matched
       rays once placed (mismatched pairs fade out). Gradients flow through these sweeps
       (the choices of step 1 and the weights are constants).

    Parameters
    ----------
    covariance: torch.Tensor
        `(N, N, 3, 3)` pair covariances ``M_ij`` (:func:`pair_covariance`; ``M_ji = M_ijᵀ``,
        the diagonal is ignored). View 0 is the reference.
    n_dihedral: int
        Grid of dihedral angles for step 1 (even).
    sweeps: int
        Kabsch sweeps of step 2.
    starts: int
        Anchors tried first in step 1.
    robust_degrees: float
        Scale of the pair weights of step 2.

    Returns
    -------
    torch.Tensor
        `(N, 3, 3)` relative rotations, ``[0] = I``; up to the mirror ``J R J``,
        ``J = diag(1, 1, -1)``.
    """
    n = covariance.shape[0]
    if covariance.shape != (n, n, 3, 3) or n < 2:
        raise ValueError(f"covariance must be (N, N, 3, 3) with N >= 2, got {tuple(covariance.shape)}")
    dtype, device = covariance.dtype, covariance.device
    eye = torch.eye(3, dtype=dtype, device=device)
    with torch.no_grad():
        start = _greedy_dihedrals(covariance.detach(), n_dihedral, starts)
    rotations = [eye] + [start[k] for k in range(1, n)]
    mass = covariance.detach().diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)  # (N, N) total match weight
    for _ in range(sweeps):
        with torch.no_grad():
            placed = torch.stack(rotations).detach()
            cosine = (trace_agreement(placed[:, None], covariance.detach(), placed[None]) / mass).clamp(-1.0, 1.0)
            weight = _robust_weights(cosine, robust_degrees)
        for k in range(1, n):
            others = [j for j in range(n) if j != k]
            partners = torch.stack([rotations[j] for j in others])
            target = (weight[k, others, None, None] * covariance[k, others] @ partners.transpose(-1, -2)).sum(0)
            rotations[k] = rotation_from_covariance(target)
    return torch.stack(rotations)


def _greedy_dihedrals(covariance: torch.Tensor, n_dihedral: int, starts: int) -> torch.Tensor:
    """Step 1 of :func:`synchronise`: `(N, 3, 3)` starting rotations (``[0] = I``)."""
    n, dtype, device = covariance.shape[0], covariance.dtype, covariance.device
    alpha, beta = _line_angles(covariance[1:, 0])  # anchor k's line: its ray alpha_k, the reference's beta_k
    grid = torch.arange(n_dihedral, dtype=dtype, device=device) * (2 * math.pi / n_dihedral)
    # every anchor's candidate rotations on the whole grid at once: (N - 1, G, 3, 3)
    candidates_all = _rz(beta)[:, None] @ _rx(grid)[None] @ _rz(-alpha)[:, None]
    best, best_total = None, -math.inf
    for first in range(1, min(starts, n - 1) + 1):
        order = [first] + [k for k in range(1, n) if k != first]
        runs = n_dihedral // 2  # the first anchor's dihedral in [0, pi); the rest is its mirror
        placed = {0: torch.eye(3, dtype=dtype, device=device).expand(runs, 3, 3),
                  first: candidates_all[first - 1, :runs]}
        total = torch.zeros(runs, dtype=dtype, device=device)
        for k in order[1:]:
            candidates = candidates_all[k - 1]  # (G, 3, 3)
            done = list(placed)
            partners = torch.stack([placed[j] for j in done], 1)  # (runs, placed, 3, 3)
            target = (covariance[k, done] @ partners.transpose(-1, -2)).sum(1)  # (runs, 3, 3): sum_j M_kj R_jᵀ
            score = torch.einsum("gab,rba->rg", candidates, target)
            choice = score.argmax(dim=1)
            total = total + score.gather(1, choice[:, None])[:, 0]
            placed[k] = candidates[choice]
        run = int(total.argmax())
        if float(total[run]) > best_total:
            best_total = float(total[run])
            best = torch.stack([placed[k][run] for k in range(n)])
    return best


def place_views(covariance: torch.Tensor, partner_rotations: torch.Tensor, iterations: int = 3,
                robust_degrees: float = ROBUST_DEGREES) -> torch.Tensor:
    """Rotations of views from their matches with partners of known rotation (robust Kabsch).

    The first fit maximises ``sum_p trace(R_v M_vp R_pᵀ)``; each of the next ``iterations``
    weights every partner as :func:`synchronise` does, by how well its match agrees with
    the fit so far, so one wrong common line does not pull the view away.

    Parameters
    ----------
    covariance: torch.Tensor
        `(V, P, 3, 3)` pair covariances ``M_vp`` of each view (first) with each partner.
    partner_rotations: torch.Tensor
        `(P, 3, 3)` the partners' relative rotations.
    iterations: int
        Reweighted fits after the first.
    robust_degrees: float
        Scale of the partner weights.

    Returns
    -------
    torch.Tensor
        `(V, 3, 3)` relative rotations.
    """
    placed = covariance @ partner_rotations.transpose(-1, -2)  # (V, P, 3, 3): M_vp R_pᵀ
    rotations = rotation_from_covariance(placed.sum(1))
    mass = covariance.detach().diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12)  # (V, P)
    for _ in range(iterations):
        with torch.no_grad():
            cosine = (torch.einsum("vij,vpji->vp", rotations.detach(), placed.detach()) / mass).clamp(-1.0, 1.0)
            weight = _robust_weights(cosine, robust_degrees)
        rotations = rotation_from_covariance((weight[..., None, None] * placed).sum(1))
    return rotations


def ray_fpm(probabilities: torch.Tensor, partner_rotations: torch.Tensor,
            directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ray's matched 3D direction and its confidence: the dense Fourier Planar Map of rays.

    Parameters
    ----------
    probabilities: torch.Tensor
        `(V, P, L, L)` ray-pair probabilities of each view with each partner.
    partner_rotations: torch.Tensor
        `(P, 3, 3)` the partners' relative rotations.
    directions: torch.Tensor
        `(L, 3)` ray directions.

    Returns
    -------
    fpm: torch.Tensor
        `(V, L, 3)` unit-radius position of each ray in the reference frame, the
        probability-weighted mean of its matched partner rays (zero where unmatched).
    confidence: torch.Tensor
        `(V, L)` the ray's total match probability. A Kabsch fit of ``fpm`` to the rays'
        directions with these confidences and no offset equals :func:`place_views`.
    """
    u = directions.to(probabilities.dtype)
    placed = partner_rotations.to(probabilities.dtype) @ u.transpose(0, 1)  # (P, 3, L): R_p u_m
    summed = torch.einsum("vplm,pim->vli", probabilities, placed)
    confidence = probabilities.sum(dim=(1, 3))
    return summed / confidence.clamp_min(1e-12)[..., None], confidence
