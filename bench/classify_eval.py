"""How good is a 2D classification? Class averages, in-plane angles and junk flags against a simulation's truth.

The figures of issue 21 ("Figures to reach"), measured on the files ``cryofastar-stream classify`` writes
(``class_averages.mrcs``, ``classes.star``, ``particles.star``) and the simulated session's truth
(``reference.mrc``, its ``particles.star``):

1. **Class averages vs the true map** (:func:`match_class_averages`). Each class average is compared with
   every projection of the true map over a dense grid of view directions
   (:func:`view_direction_rotations`, from :func:`~cryofastar.recon.orientation_grids.global_rotation_grid`),
   every in-plane rotation and small shifts. The score is the Pearson correlation inside a soft circular mask
   of the particle's diameter (:func:`map_radius_px`, :func:`soft_circular_mask`), weighted by the mask, both
   images low-passed to ``lowpass_angstrom`` (:func:`lowpass_filter`). The search is coarse-to-fine:
   polar resampling + an FFT along the angle for all directions at once (coarse, a Fourier-cropped box), then
   local refinements of the best candidates in SO(3) (down to 0.5° steps) and in shift (down to 0.25 px).
   Projections in the search are central slices (:class:`~cryofastar.recon.map_slices.MapSlicer`, the same
   central-slice theorem); the correlation reported is recomputed at the found pose with
   ``torch_fourier_slice.project_3d_to_2d`` (as the simulator makes its particles), low-passed, unfiltered,
   and band-passed (``highpass_angstrom`` to ``lowpass_angstrom``, default 40-10 Å). The low-passed figure is
   the issue's; it is weak on its own: inside a mask of the particle's diameter the particle-vs-solvent
   contrast dominates it, so one blurred average of all views scores ~0.95 (measured; docs/benchmarks.md).
   The band-passed one drops the envelope and tells a blob from a view. :func:`ceiling_classification` gives
   the reference points: classes made from the true poses (the ceiling) and one class of everything (a floor).
2. **Headline**: the fraction of the real (non-junk) particles whose class correlates >= 0.9
   (:func:`good_class_fraction`).
3. **In-plane error** (:func:`inplane_errors`): a particle in class ``c`` with 2D angle ``psi`` is predicted at
   ``A_pred = Rz(psi) @ A_c`` (``Rz(psi)`` = RELION's matrix of angles ``(0, 0, psi)``, ``A_c`` the pose of the
   class average's best-matching projection); the error is the twist about the beam axis (swing-twist
   decomposition, :func:`swing_twist_degrees`) of ``A_pred @ A_true.T``; the swing (out-of-plane part) is
   reported beside it.
4. **Junk** (:func:`junk_metrics`): precision and recall of ``rlnCryofastarJunk`` against the simulator's
   ``rlnCryofastarSimulatedJunk > 0``, and the recall per junk type.

Conventions (docs/conventions.md): RELION matrices ``A`` (the particle at ``A`` is the projection along z of the
map sampled at ``A.T @ x``), box centre ``B // 2``, images ``[y, x]``, shifts ``(sx, sy)`` in pixels. The 2D
alignment of a particle has RELION's Class2D meaning: the particle is its class average transformed like a
projection at pose ``(rot, tilt, psi) = (0, 0, psi)`` with origin ``(x, y)``. Rotating a projection in plane
is composing poses: the image at ``Rz(psi) @ A`` is the image at ``A`` resampled at ``R x``, ``R`` the
top-left 2x2 block of ``Rz(psi).T`` (:func:`rotate_images`; tested on real projections).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch
import torch.nn.functional as F
from cryofastar.recon.ctf import ctf_at
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered, rfft_frequencies_2d
from cryofastar.recon.io import read_particles
from cryofastar.recon.io.class_files import write_class_files
from cryofastar.recon.io.mrc import open_mrc, read_images, read_volume, voxel_size
from cryofastar.recon.map_slices import MapSlicer
from cryofastar.recon.orientation_grids import global_rotation_grid, local_rotation_grid
from torch_fourier_slice import project_3d_to_2d

__all__ = [
    "GOOD_CORRELATION",
    "JUNK_COLUMN",
    "JUNK_TYPE_NAMES",
    "SIMULATED_JUNK_COLUMN",
    "ClassMatch",
    "ceiling_classification",
    "evaluate_classification",
    "good_class_fraction",
    "inplane_errors",
    "inplane_rotations",
    "junk_metrics",
    "lowpass_filter",
    "map_radius_px",
    "match_class_averages",
    "masked_pearson",
    "rotate_images",
    "soft_circular_mask",
    "swing_twist_degrees",
    "view_direction_rotations",
]

GOOD_CORRELATION = 0.9
"""A class average is good when its best-matching projection correlates at least this much (issue 21)."""
JUNK_COLUMN = "rlnCryofastarJunk"
"""The classifier's flag (0/1) in its ``particles.star`` and ``classes.star``."""
SIMULATED_JUNK_COLUMN = "rlnCryofastarSimulatedJunk"
"""The simulator's truth: 0 real particle, else the junk type (:data:`JUNK_TYPE_NAMES`)."""
JUNK_TYPE_NAMES = {1: "noise", 2: "carbon_edge", 3: "aggregate", 4: "off_centre"}
"""The simulator's junk types (recon/simulate/junk.py)."""


# --------------------------------------------------------------------------------------------- filters, masks


def lowpass_filter(box: int, apix: float, lowpass_angstrom: float | None, width_px: float = 2.0) -> torch.Tensor:
    """`(B, B // 2 + 1)` float32 low-pass in the rfft layout of :func:`~cryofastar.recon.fourier.rfft2_centered`.

    1 below ``|k| = apix / lowpass_angstrom - width_px / (2 B)`` cycles/px, 0 above
    ``apix / lowpass_angstrom + width_px / (2 B)``, a raised cosine between (``width_px`` Fourier pixels wide,
    centred on the cut-off). ``lowpass_angstrom=None`` (or a cut-off beyond Nyquist) gives all ones.
    """
    ky = torch.fft.fftfreq(box, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, dtype=torch.float64)
    radius_px = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt() * box  # Fourier pixels
    if lowpass_angstrom is None:
        return torch.ones_like(radius_px, dtype=torch.float32)
    if lowpass_angstrom <= 0:
        raise ValueError(f"low-pass must be positive Å, got {lowpass_angstrom}")
    cut = apix / lowpass_angstrom * box
    t = ((radius_px - (cut - width_px / 2)) / width_px).clamp(0.0, 1.0)
    return (0.5 * (1 + torch.cos(math.pi * t))).float()


def _band_limit(box: int, apix: float, lowpass_angstrom: float | None, width_px: float = 2.0) -> float:
    """Highest frequency (cycles/px, <= 0.5) :func:`lowpass_filter` lets through."""
    if lowpass_angstrom is None:
        return 0.5
    return min(0.5, (apix / lowpass_angstrom * box + width_px / 2 + 0.5) / box)


def soft_circular_mask(box: int, radius_px: float, edge_px: float = 3.0) -> torch.Tensor:
    """`(B, B)` float32 mask: 1 within ``radius_px`` of the centre ``B // 2``, a cosine edge to 0 at ``+ edge_px``."""
    c = torch.arange(box, dtype=torch.float32) - box // 2
    return _radial_mask((c[:, None] ** 2 + c[None, :] ** 2).sqrt(), radius_px, edge_px)


def _radial_mask(r: torch.Tensor, radius_px: float, edge_px: float) -> torch.Tensor:
    """The profile of :func:`soft_circular_mask` at radii ``r`` (px)."""
    t = ((r - radius_px) / max(edge_px, 1e-6)).clamp(0.0, 1.0)
    return 0.5 * (1 + torch.cos(math.pi * t))


def map_radius_px(volume: torch.Tensor, threshold: float = 0.05) -> float:
    """The particle's radius (px): the farthest voxel from the centre ``B // 2`` at ``>= threshold`` of the maximum.

    A projection's support lies within it whatever the view. (Not a share of the total density: a simulated
    map carries a faint ringing, ~1 % of the peak, out to the box edge, which holds a few % of its mass.) The
    comparison's soft mask is 1 out to this radius plus 1 px (:func:`match_class_averages`).
    """
    box = volume.shape[-1]
    peak = float(volume.max())
    if not peak > 0:
        raise ValueError("the map has no positive density: cannot tell the particle's radius")
    c = torch.arange(box, dtype=torch.float64) - box // 2
    r = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).sqrt()
    return float(r[volume >= threshold * peak].max())


def masked_pearson(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`(...)` Pearson correlation of `(..., B, B)` images ``a``, ``b`` (broadcastable), `(B, B)` ``weights``."""
    a, b = torch.broadcast_tensors(a.double(), b.double())
    w = weights.double()
    total = w.sum()
    ma = (a * w).sum((-2, -1), keepdim=True) / total
    mb = (b * w).sum((-2, -1), keepdim=True) / total
    da, db = a - ma, b - mb
    cov = (w * da * db).sum((-2, -1))
    var = (w * da * da).sum((-2, -1)) * (w * db * db).sum((-2, -1))
    return cov / var.clamp(min=1e-300).sqrt()


# ---------------------------------------------------------------------------------------- poses and rotations


def view_direction_rotations(step_degrees: float = 3.5) -> torch.Tensor:
    """`(D, 3, 3)` float64 RELION matrices at ``psi = 0``, one per distinct view direction of the package's grid.

    The view directions (``A[2, :]``, docs/conventions.md) of
    :func:`~cryofastar.recon.orientation_grids.global_rotation_grid` at ``step_degrees``, each once: ~3,400
    directions over the whole sphere at 3.5° (a direction's nearest neighbour ~3.5° away), 2,600 at 4°.
    The in-plane angle is searched separately.
    """
    grid = global_rotation_grid(step_degrees)
    directions = grid[:, 2, :]
    _, first = np.unique(np.round(directions.numpy() * 1e6).astype(np.int64), axis=0, return_index=True)
    rot, tilt, _ = matrix_to_euler(grid[torch.as_tensor(np.sort(first))])
    return euler_to_matrix(rot, tilt, torch.zeros_like(rot))


def inplane_rotations(psi_degrees: torch.Tensor) -> torch.Tensor:
    """`(..., 3, 3)` float64 RELION matrices of angles ``(0, 0, psi)``: the 2D alignment as a pose."""
    psi = torch.as_tensor(psi_degrees, dtype=torch.float64)
    zero = torch.zeros_like(psi)
    return euler_to_matrix(zero, zero, psi)


def rotate_images(images: torch.Tensor, psi_degrees: torch.Tensor) -> torch.Tensor:
    """Turn images at pose ``A`` into the images at pose ``Rz(psi) @ A`` (bilinear resampling).

    The particle at ``A`` is ``I_A(x) = ∫ V(A.T (x, z)) dz``; at ``Rz(psi) @ A`` it is
    ``∫ V(A.T Rz(psi).T (x, z)) dz = I_A(R x)`` with ``R`` the top-left 2x2 block of ``Rz(psi).T`` (``Rz(psi)`` =
    :func:`inplane_rotations`). So the output at ``x`` (px from the centre ``B // 2``, ``(x, y)`` = (column,
    row)) is the input at ``R x``. This is also what a class average turned by a particle's 2D ``psi`` is.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` images [y, x].
    psi_degrees: torch.Tensor
        `(n,)` in-plane angles (degrees).
    """
    n, box = images.shape[0], images.shape[-1]
    r = inplane_rotations(torch.as_tensor(psi_degrees, dtype=torch.float64).expand(n))[:, :2, :2].transpose(-1, -2)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    xy = torch.stack([x, y], -1).reshape(-1, 2)  # (B*B, 2)
    source = torch.einsum("nij,pj->npi", r, xy)  # (n, B*B, 2) = R x
    grid = ((source + box // 2) / (box - 1) * 2 - 1).reshape(n, box, box, 2).float()
    out = F.grid_sample(images.float()[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0]


def swing_twist_degrees(relative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twist about z and swing (the rest) of rotations ``M = S @ T``, in degrees.

    ``T`` turns about z (the beam, in the particle frame); ``S`` is the smallest rotation taking z to ``M z``
    (its axis lies in the xy plane). For ``M = A_pred @ A_true.T`` the twist is the in-plane error and the
    swing the out-of-plane one.

    Parameters
    ----------
    relative: torch.Tensor
        `(..., 3, 3)` rotation matrices.

    Returns
    -------
    twist, swing: tuple[torch.Tensor, torch.Tensor]
        `(...)` float64: the twist's signed angle in (-180, 180] and the swing's angle in [0, 180].
        A swing of 180° leaves the twist's axis undefined; there the swing's axis is taken to be x.
    """
    m = relative.double()
    z = m[..., :, 2]  # M e_z
    swing = torch.rad2deg(torch.atan2(torch.linalg.norm(z[..., :2], dim=-1), z[..., 2]))
    axis = torch.stack([-z[..., 1], z[..., 0], torch.zeros_like(z[..., 0])], -1)  # e_z x (M e_z)
    norm = axis.norm(dim=-1, keepdim=True)
    x_axis = torch.zeros_like(axis)
    x_axis[..., 0] = 1.0
    axis = torch.where(norm > 1e-12, axis / norm.clamp(min=1e-300), x_axis)
    angle = torch.deg2rad(swing)[..., None]
    k = torch.zeros(*axis.shape[:-1], 3, 3, dtype=torch.float64)
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    k = k - k.transpose(-1, -2)
    s = torch.eye(3, dtype=torch.float64) + torch.sin(angle)[..., None] * k
    s = s + (1 - torch.cos(angle))[..., None] * (k @ k)  # Rodrigues
    t = s.transpose(-1, -2) @ m
    twist = torch.rad2deg(torch.atan2(t[..., 1, 0], t[..., 0, 0]))
    return twist, swing


def inplane_errors(psi_degrees: torch.Tensor, class_rotations: torch.Tensor, true_rotations: torch.Tensor,
                   symmetry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-plane (twist) and out-of-plane (swing) errors of particles posed through their class, degrees.

    Parameters
    ----------
    psi_degrees: torch.Tensor
        `(n,)` the particles' 2D angles (rlnAnglePsi of the classification).
    class_rotations: torch.Tensor
        `(n, 3, 3)` ``A_c`` of each particle's class (:attr:`ClassMatch.rotations`).
    true_rotations: torch.Tensor
        `(n, 3, 3)` true RELION matrices.
    symmetry: torch.Tensor | None
        `(m, 3, 3)` rotations that map the molecule onto itself (identity included); the particle at ``A`` and at
        ``A @ S`` look alike, so the mate of ``A_pred`` nearest to ``A_true`` is scored.

    Returns
    -------
    twist, swing: tuple[torch.Tensor, torch.Tensor]
        `(n,)` float64: ``|twist|`` in [0, 180] and the swing in [0, 180] of ``A_pred @ A_true.T``,
        ``A_pred = Rz(psi) @ A_c``.
    """
    predicted = inplane_rotations(psi_degrees) @ class_rotations.double()
    truth = true_rotations.double()
    if symmetry is not None and len(symmetry) > 1:
        mates = predicted[:, None] @ symmetry.double()[None]  # (n, m, 3, 3)
        trace = (mates * truth[:, None]).sum((-2, -1))  # trace(mate @ truth.T): largest = nearest
        predicted = mates[torch.arange(len(predicted)), trace.argmax(1)]
    twist, swing = swing_twist_degrees(predicted @ truth.transpose(-1, -2))
    return twist.abs(), swing


# -------------------------------------------------------------------------------- matching class averages


@dataclass(frozen=True)
class ClassMatch:
    """The best-matching projection of the true map for each class average.

    Attributes
    ----------
    correlation: np.ndarray
        `(K,)` masked Pearson correlation, both images low-passed, at the best pose (projection by
        ``torch_fourier_slice.project_3d_to_2d``).
    correlation_unfiltered: np.ndarray
        `(K,)` the same at the same pose, without the low-pass.
    correlation_bandpass: np.ndarray
        `(K,)` the same at the same pose, both images band-passed (``highpass_angstrom`` to
        ``lowpass_angstrom``): without the lowest frequencies, a featureless blob of the particle's size no
        longer scores high (it does with the low-pass alone: the particle-vs-solvent contrast inside the
        mask dominates; docs/benchmarks.md, "2D classification").
    search_correlation: np.ndarray
        `(K,)` the search's own score (central slices, sub-pixel shifts by Fourier interpolation).
    rotations: np.ndarray
        `(K, 3, 3)` float64 RELION matrices ``A_c``, in-plane rotation included: the class average is the
        projection at ``A_c``, displaced by :attr:`shifts_px`.
    shifts_px: np.ndarray
        `(K, 2)` (sx, sy): the projection's content sits at ``+shift`` px in the class average (its
        rlnOrigin would be ``-shift * apix``).
    mask_radius_px: float
        The mask is 1 out to this radius, then a 3-px cosine edge.
    lowpass_angstrom: float | None
        The low-pass of :attr:`correlation`.
    highpass_angstrom: float | None
        The high-pass of :attr:`correlation_bandpass`.
    n_directions: int
        View directions searched.
    """

    correlation: np.ndarray
    correlation_unfiltered: np.ndarray
    correlation_bandpass: np.ndarray
    search_correlation: np.ndarray
    rotations: np.ndarray
    shifts_px: np.ndarray
    mask_radius_px: float
    lowpass_angstrom: float | None
    highpass_angstrom: float | None
    n_directions: int


def _fourier_crop(images: torch.Tensor, new_box: int) -> torch.Tensor:
    """`(n, B, B)` -> `(n, b, b)` same field of view (the spectrum's central ``b x b``), values kept."""
    box = images.shape[-1]
    if new_box == box:
        return images
    spectrum = rfft2_centered(images)
    h = new_box // 2
    cropped = torch.cat([spectrum[..., :h, : h + 1], spectrum[..., box - h :, : h + 1]], dim=-2)
    return irfft2_centered(cropped, new_box) * (new_box / box) ** 2


def _slice_spectra(slicer: MapSlicer, rotations: torch.Tensor, out_box: int, filt: torch.Tensor) -> torch.Tensor:
    """`(n, b, b // 2 + 1)` complex64 low-passed central slices at `(n, 3, 3)` ``rotations``, rfft of a ``b``-px box.

    The box has the map's field of view (``b = out_box`` px; its frequencies, in cycles/px of the map's box,
    are read from ``slicer``), times ``filt`` (`(b, b // 2 + 1)`, the low-pass on that box); the scale is
    arbitrary. ``irfft2_centered(spectra, b)`` gives the projections.
    """
    box = slicer.box
    ky = torch.fft.fftfreq(out_box, dtype=torch.float32) * out_box / box
    kx = torch.fft.rfftfreq(out_box, dtype=torch.float32) * out_box / box
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    keep = ((grid_x**2 + grid_y**2).sqrt() <= slicer.k_max) & (filt > 0)
    keep[:, -1] = False  # the Nyquist column of an even box
    k = torch.stack([grid_x[keep], grid_y[keep]], -1)
    spectra = torch.zeros(rotations.shape[0], out_box, out_box // 2 + 1, dtype=torch.complex64)
    spectra[:, keep] = slicer.slices(rotations.float(), k) * filt[keep]
    return spectra


def _polar_grid(box: int, radii: torch.Tensor, n_angles: int) -> torch.Tensor:
    """`(1, R, Na, 2)` grid_sample coordinates of rings ``radii`` (px) at angles ``2 pi j / Na`` from +x towards +y."""
    phi = torch.arange(n_angles, dtype=torch.float64) * 2 * math.pi / n_angles
    x = radii.double()[:, None] * torch.cos(phi)[None] + box // 2
    y = radii.double()[:, None] * torch.sin(phi)[None] + box // 2
    return (torch.stack([x, y], -1) / (box - 1) * 2 - 1)[None].float()


def _polar_normalised(images: torch.Tensor, grid: torch.Tensor, ring_weights: torch.Tensor) -> torch.Tensor:
    """`(n, R, Na)` polar samples, weighted-mean-free, times ``sqrt(weight)``, unit norm: dot products are Pearson."""
    n = images.shape[0]
    polar = F.grid_sample(images.float()[:, None], grid.expand(n, -1, -1, -1), mode="bilinear",
                          padding_mode="zeros", align_corners=True)[:, 0]  # (n, R, Na)
    w = ring_weights[None, :, None]
    mean = (polar * w).sum((1, 2), keepdim=True) / (w.sum() * polar.shape[-1])
    out = (polar - mean) * w.sqrt()
    return out / out.norm(dim=(1, 2), keepdim=True).clamp(min=1e-30)


def _shift_grid(radius: float, step: float) -> torch.Tensor:
    """`(S, 2)` float64 shifts (sx, sy) on a square grid of ``step`` within ``±radius`` per axis, (0, 0) included."""
    m = int(math.floor(radius / step + 1e-9))
    axis = torch.arange(-m, m + 1, dtype=torch.float64) * step
    sy, sx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([sx.reshape(-1), sy.reshape(-1)], -1)


def _work_box(box: int, band: float) -> int:
    """An even box (px) with the same field of view whose Nyquist is >= 1.25 x the band limit (cycles/px), >= 24."""
    return min(box, max(24, 2 * math.ceil(1.25 * band * box)))


def _n_angles(outer_radius_px: float) -> int:
    """In-plane angles of the coarse search: a multiple of 4, about 1 px of arc at the outer ring, at least 36."""
    return max(36, 4 * math.ceil(2 * math.pi * outer_radius_px / 4))


def _coarse_search(averages: torch.Tensor, slicer: MapSlicer, directions: torch.Tensor, apix: float,
                   lowpass_angstrom: float | None, mask_radius_px: float, max_shift_px: float, n_candidates: int,
                   chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best direction x in-plane angle x shift per class on a Fourier-cropped box: polar + FFT along the angle.

    Returns ``(rotations (K, T, 3, 3), shifts (K, T, 2) px of the full box, angle step (degrees), shift step
    (px))`` for the ``T`` best directions of each class (each with its best angle and shift).
    """
    k_classes, box = averages.shape[0], averages.shape[-1]
    small = _work_box(box, slicer.k_max)
    scale = small / box
    filt_small = lowpass_filter(small, apix / scale, lowpass_angstrom)
    radius = (mask_radius_px + 3.0) * scale  # out to the end of the mask's edge
    radii = torch.arange(1, math.floor(min(radius, small / 2 - 1)) + 1, dtype=torch.float64)
    weights = (_radial_mask(radii, mask_radius_px * scale, 3.0 * scale) * radii).float()  # polar area element
    n_angles = _n_angles(float(radii[-1]))
    grid = _polar_grid(small, radii, n_angles)
    shift_step = 1.0 / scale if scale < 1 else 1.0  # one pixel of the cropped box
    shifts = _shift_grid(max_shift_px, shift_step)  # full-box px
    # the classes moved by -s (c(x + s)), then cropped: (K * S, b, b)
    spectra = rfft2_centered(averages.float()) * lowpass_filter(box, apix, lowpass_angstrom)
    moved = irfft2_centered(phase_shift_rfft2(spectra[:, None], -shifts[None], box), box)
    moved = _fourier_crop(moved.reshape(-1, box, box), small)
    class_f = torch.fft.rfft(_polar_normalised(moved, grid, weights), dim=-1).conj()  # (K*S, R, Nf)
    class_f = class_f.permute(2, 0, 1).contiguous()  # (Nf, K*S, R)
    n_shifts = shifts.shape[0]
    best = torch.full((k_classes, directions.shape[0]), -2.0)
    best_angle = torch.zeros(k_classes, directions.shape[0], dtype=torch.long)
    best_shift = torch.zeros(k_classes, directions.shape[0], dtype=torch.long)
    for start in range(0, directions.shape[0], chunk):
        rot = directions[start : start + chunk]
        projections = irfft2_centered(_slice_spectra(slicer, rot, small, filt_small), small)
        proj_f = torch.fft.rfft(_polar_normalised(projections, grid, weights), dim=-1).permute(2, 1, 0)  # (Nf, R, D)
        scores = torch.fft.irfft(torch.matmul(class_f, proj_f.contiguous()), n=n_angles, dim=0)  # (Na, K*S, D)
        scores = scores.reshape(n_angles, k_classes, n_shifts, -1).permute(1, 3, 0, 2).reshape(k_classes, len(rot), -1)
        value, index = scores.max(-1)
        best[:, start : start + len(rot)] = value
        best_angle[:, start : start + len(rot)] = index // n_shifts
        best_shift[:, start : start + len(rot)] = index % n_shifts
    top = best.topk(min(n_candidates, directions.shape[0]), dim=1)
    psi = best_angle.gather(1, top.indices).double() * 360.0 / n_angles
    rotations = inplane_rotations(psi) @ directions[top.indices]
    return rotations, shifts[best_shift.gather(1, top.indices)], 360.0 / n_angles, shift_step


def _window_correlation(spectra_a: torch.Tensor, spectra_b: torch.Tensor, box: int,
                        offsets: torch.Tensor) -> torch.Tensor:
    """`(..., S)` ``sum_x a(x) b(x + s)`` for shifts ``s`` (`(S, 2)` px, any real values) by Fourier interpolation.

    ``spectra_a``, ``spectra_b``: `(..., B, B // 2 + 1)` rfft (:func:`~cryofastar.recon.fourier.rfft2_centered`).
    """
    dtype = torch.promote_types(spectra_a.dtype, spectra_b.dtype)  # complex64 or complex128
    ky = torch.fft.fftfreq(box, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, dtype=torch.float64)
    alpha = torch.full((box // 2 + 1,), 2.0, dtype=torch.float64)
    alpha[0] = 1.0
    alpha[-1] = 1.0  # the Nyquist column of an even box appears once
    product = spectra_a.conj().to(dtype) * spectra_b.to(dtype) * alpha.to(dtype)
    ramp = torch.exp(2j * math.pi * (offsets[:, 1, None] * ky[None, :])).to(dtype)  # (S, B)
    ramp_x = torch.exp(2j * math.pi * (offsets[:, 0, None] * kx[None, :])).to(dtype)  # (S, Bf)
    # sum over ky, kx of product * ramp_y(s) * ramp_x(s): one (S) value per shift
    along_y = torch.einsum("...yx,sy->...sx", product, ramp)
    return (along_y * ramp_x).sum(-1).real.double() / (box * box)


def _refine(averages: torch.Tensor, slicer: MapSlicer, rotations: torch.Tensor, shifts: torch.Tensor, apix: float,
            lowpass_angstrom: float | None, mask_radius_px: float, work_box: int, range_degrees: float,
            step_degrees: float, shift_range: float, shift_step: float,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local search around each class's candidates: rotations ``A @ Δ`` (``|Δ| <= range_degrees``), shifts near ``s0``.

    ``rotations`` `(K, T, 3, 3)`, ``shifts`` `(K, T, 2)`, ``shift_range``, ``shift_step`` and ``mask_radius_px``
    in px of the full box. The comparison runs on a box of ``work_box`` px with the same field of view (Fourier
    crop; both images are low-passed, so nothing is lost while ``work_box`` holds the band). The score is the
    mask-weighted Pearson correlation of the projection and the class average moved by ``-s``, for every
    rotation and every shift of the window at once (Fourier interpolation, :func:`_window_correlation`).
    Returns the best ``(scores (K, T), rotations (K, T, 3, 3), shifts (K, T, 2) full-box px)`` of each
    candidate's neighbourhood.
    """
    k_classes, n_cand, box = rotations.shape[0], rotations.shape[1], averages.shape[-1]
    scale = work_box / box
    filt = lowpass_filter(work_box, apix / scale, lowpass_angstrom)
    local = local_rotation_grid(range_degrees, step_degrees)  # (M, 3, 3)
    offsets = _shift_grid(shift_range * scale, shift_step * scale)  # (S, 2) work-box px
    start = shifts.double() * scale
    w = soft_circular_mask(work_box, mask_radius_px * scale, 3.0 * scale).double()
    total = float(w.sum())
    w_spec = rfft2_centered(w)
    w_unshifted = torch.fft.ifftshift(w, dim=(-2, -1)).float()  # masks the projections where they are made
    avg = _fourier_crop(irfft2_centered(rfft2_centered(averages.double()) * lowpass_filter(box, apix, lowpass_angstrom),
                                        box), work_box)
    avg_spec = rfft2_centered(avg)
    avg_sq_spec = rfft2_centered(avg**2)
    out_score = torch.empty(k_classes, n_cand, dtype=torch.float64)
    out_rot = torch.empty(k_classes, n_cand, 3, 3, dtype=torch.float64)
    out_shift = torch.empty(k_classes, n_cand, 2, dtype=torch.float64)
    for k in range(k_classes):  # a loop over classes (tens), each vectorised over candidates x rotations x shifts
        cand = rotations[k][:, None] @ local[None]  # (T, M, 3, 3)
        spectra = _slice_spectra(slicer, cand.reshape(-1, 3, 3), work_box, filt)
        # irfft without the centring shift: multiplying by the equally un-shifted mask is the same product
        raw = torch.fft.irfftn(spectra, s=(work_box, work_box), dim=(-2, -1))
        weighted = raw * w_unshifted
        sum_p = weighted.sum((-2, -1)).double().reshape(n_cand, -1)  # (T, M)
        sum_pp = (weighted * raw).sum((-2, -1)).double().reshape(n_cand, -1)
        wp_spec = torch.fft.rfftn(weighted, dim=(-2, -1)).reshape(n_cand, local.shape[0], work_box, -1)
        # the class moved to its candidate's shift s0 first (c(x + s0)); the grid of offsets is shared
        moved = phase_shift_rfft2(avg_spec[k].expand(n_cand, -1, -1), -start[k], work_box)  # (T, b, bf)
        moved_sq = phase_shift_rfft2(avg_sq_spec[k].expand(n_cand, -1, -1), -start[k], work_box)
        sum_c = _window_correlation(w_spec.expand(n_cand, -1, -1), moved, work_box, offsets)  # (T, S)
        sum_cc = _window_correlation(w_spec.expand(n_cand, -1, -1), moved_sq, work_box, offsets)
        sum_pc = _window_correlation(wp_spec, moved[:, None].to(torch.complex64), work_box, offsets)  # (T, M, S)
        cov = sum_pc - sum_p[..., None] * sum_c[:, None] / total
        var_p = (sum_pp - sum_p**2 / total)[..., None]
        var_c = (sum_cc - sum_c**2 / total)[:, None]
        score = cov / (var_p * var_c).clamp(min=1e-300).sqrt()  # (T, M, S)
        value, index = score.reshape(n_cand, -1).max(1)
        out_score[k] = value
        out_rot[k] = cand[torch.arange(n_cand), index // offsets.shape[0]]
        out_shift[k] = (start[k] + offsets[index % offsets.shape[0]]) / scale
    return out_score, out_rot, out_shift


def match_class_averages(averages: torch.Tensor, volume: torch.Tensor, apix: float,
                         lowpass_angstrom: float | None = 10.0, direction_step_degrees: float = 3.5,
                         max_shift_px: float = 3.0, mask_radius_px: float | None = None,
                         n_candidates: int = 8, highpass_angstrom: float | None = 40.0) -> ClassMatch:
    """Each class average's best-matching projection of the true map (module docstring, metric 1).

    Parameters
    ----------
    averages: torch.Tensor
        `(K, B, B)` class averages [y, x], centre ``B // 2``.
    volume: torch.Tensor
        `(B, B, B)` true map [z, y, x], same box and pixel size.
    apix: float
        Pixel size (Å).
    lowpass_angstrom: float | None
        Both images low-passed to this resolution (Å) for the search and :attr:`ClassMatch.correlation`.
    direction_step_degrees: float
        View-direction grid (:func:`view_direction_rotations`; 3.5° gives ~3,400 directions).
    max_shift_px: float
        Shifts searched: ``±max_shift_px`` per axis (refinement may go a little beyond).
    mask_radius_px: float | None
        The mask's radius (px); default :func:`map_radius_px` of ``volume`` plus 1 px (the mask then has a
        3-px cosine edge, within the box).
    n_candidates: int
        Directions per class carried from the coarse search into the local refinement.
    highpass_angstrom: float | None
        The high-pass of :attr:`ClassMatch.correlation_bandpass` (Å; ``None``: no high-pass).

    Returns
    -------
    ClassMatch
    """
    if averages.ndim != 3 or averages.shape[-1] != averages.shape[-2]:
        raise ValueError(f"class averages must be (K, B, B), got {tuple(averages.shape)}")
    box = averages.shape[-1]
    if tuple(volume.shape) != (box, box, box):
        raise ValueError(f"the map is {tuple(volume.shape)} but the class averages are {box} px")
    if not torch.isfinite(averages).all():
        bad = (~torch.isfinite(averages)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"class averages {[b + 1 for b in bad]} have non-finite pixels")
    if mask_radius_px is None:
        mask_radius_px = map_radius_px(volume) + 1.0
    mask_radius_px = float(min(mask_radius_px, box / 2 - 4.0))
    mask = soft_circular_mask(box, mask_radius_px, 3.0)
    slicer = MapSlicer(volume.float(), k_max=_band_limit(box, apix, lowpass_angstrom))
    directions = view_direction_rotations(direction_step_degrees)
    averages = averages.float()
    rot, shift, angle_step, shift_step = _coarse_search(averages, slicer, directions, apix, lowpass_angstrom,
                                                        mask_radius_px, max_shift_px, n_candidates)
    # the coarse pose is within about half a step of each grid of the best one: search a ball that covers both
    first_range = math.hypot(0.75 * direction_step_degrees, 0.5 * angle_step) + 0.5
    score, rot, shift = _refine(averages, slicer, rot, shift, apix, lowpass_angstrom, mask_radius_px,
                                _work_box(box, slicer.k_max),
                                first_range, 1.5, max(1.0, 0.5 * shift_step + 0.5), 0.5)
    keep = score.topk(min(2, score.shape[1]), dim=1).indices
    rot = torch.stack([rot[k, keep[k]] for k in range(len(rot))])
    shift = torch.stack([shift[k, keep[k]] for k in range(len(shift))])
    score, rot, shift = _refine(averages, slicer, rot, shift, apix, lowpass_angstrom, mask_radius_px, box,
                                1.5, 0.5, 0.5, 0.25)
    best = score.argmax(1)
    index = torch.arange(len(best))
    score, rot, shift = score[index, best], rot[index, best], shift[index, best]
    # the reported figure: the simulator's projector at the found pose, low-passed and not
    projections = project_3d_to_2d(volume.float(), rot.transpose(-1, -2).float(), pad_factor=2.0)
    moved = rfft2_centered(averages.double())
    moved = phase_shift_rfft2(moved, -shift, box)
    filt = lowpass_filter(box, apix, lowpass_angstrom).double()
    lp = masked_pearson(irfft2_centered(rfft2_centered(projections.double()) * filt, box),
                        irfft2_centered(moved * filt, box), mask)
    raw = masked_pearson(projections.double(), irfft2_centered(moved, box), mask)
    band = filt
    if highpass_angstrom is not None:
        band = filt * (1 - lowpass_filter(box, apix, highpass_angstrom).double())
    bp = masked_pearson(irfft2_centered(rfft2_centered(projections.double()) * band, box),
                        irfft2_centered(moved * band, box), mask)
    return ClassMatch(correlation=lp.numpy(), correlation_unfiltered=raw.numpy(), correlation_bandpass=bp.numpy(),
                      search_correlation=score.numpy(), rotations=rot.numpy(), shifts_px=shift.numpy(),
                      mask_radius_px=mask_radius_px, lowpass_angstrom=lowpass_angstrom,
                      highpass_angstrom=highpass_angstrom, n_directions=int(directions.shape[0]))


# ------------------------------------------------------------------------------------------ particle figures


def good_class_fraction(class_index: np.ndarray, correlation: np.ndarray, real: np.ndarray,
                        threshold: float = GOOD_CORRELATION) -> float:
    """Fraction of the real particles whose class average correlates at least ``threshold`` (metric 2).

    ``class_index`` `(n,)` 0-based row of each particle's class in ``correlation`` `(K,)`; ``real`` `(n,)` bool
    (not junk in the truth). Each class counts as many times as it holds real particles. NaN if none is real.
    """
    real = np.asarray(real, dtype=bool)
    if not real.any():
        return float("nan")
    return float(np.mean(np.asarray(correlation)[np.asarray(class_index)[real]] >= threshold))


def junk_metrics(flagged: np.ndarray, truth_type: np.ndarray) -> dict:
    """Precision and recall of junk flags against the simulator's junk types (metric 4).

    Parameters
    ----------
    flagged: np.ndarray
        `(n,)` the classifier's flag (nonzero = junk).
    truth_type: np.ndarray
        `(n,)` int: 0 a real particle, 1..4 the junk type (:data:`JUNK_TYPE_NAMES`).

    Returns
    -------
    dict
        ``precision`` (flagged that are junk; NaN if nothing flagged), ``recall`` (junk that is flagged; NaN
        without junk), ``recall_by_type`` ({name: recall or NaN}), and the counts ``n``, ``n_junk``,
        ``n_flagged``, ``true_positives``, ``real_flagged`` (real particles thrown away), ``count_by_type``.
    """
    flagged = np.asarray(flagged).astype(bool)
    truth_type = np.asarray(truth_type).astype(np.int64)
    if flagged.shape != truth_type.shape:
        raise ValueError(f"{flagged.shape[0]} flags for {truth_type.shape[0]} particles")
    junk = truth_type > 0
    tp = int((flagged & junk).sum())
    out = {
        "n": int(len(flagged)), "n_junk": int(junk.sum()), "n_flagged": int(flagged.sum()), "true_positives": tp,
        "real_flagged": int((flagged & ~junk).sum()),
        "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
        "recall": tp / int(junk.sum()) if junk.any() else float("nan"),
        "recall_by_type": {}, "count_by_type": {},
    }
    for code, name in JUNK_TYPE_NAMES.items():
        these = truth_type == code
        out["count_by_type"][name] = int(these.sum())
        out["recall_by_type"][name] = float(flagged[these].mean()) if these.any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------- the files


def _read_block(path: Path, preferred: str) -> pd.DataFrame:
    """The block ``preferred`` of a STAR file (or its only block, or ``particles``)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    blocks = starfile.read(path, always_dict=True)
    for name in (preferred, "particles"):
        if name in blocks:
            return blocks[name]
    if len(blocks) == 1:
        return next(iter(blocks.values()))
    raise ValueError(f"{path}: no block {preferred!r} (blocks: {list(blocks)})")


def _image_keys(names: pd.Series, star_dir: Path) -> pd.Index:
    """``N@stack`` names as ``N@/resolved/stack`` (a stack's path is relative to its STAR file's directory)."""
    parts = names.astype(str).str.split("@", n=1, expand=True)
    stacks = {name: os.path.realpath(star_dir / name) for name in parts[1].unique()}  # one per stack
    return pd.Index(parts[0].astype(int).astype(str) + "@" + parts[1].map(stacks))


def _average_index(reference_image: pd.Series) -> np.ndarray:
    """0-based image of ``N@stack`` names."""
    return np.array([int(str(name).split("@")[0]) - 1 for name in reference_image], dtype=np.int64)


def _weighted_median(values: np.ndarray) -> float:
    """Median of per-particle values (each class as often as it holds real particles); NaN if none."""
    return float(np.median(values)) if len(values) else float("nan")


def _spread(match: ClassMatch, rows: np.ndarray) -> ClassMatch:
    """``match`` of the classes ``rows`` (`(K,)` bool) spread over all ``K`` classes, NaN (identity pose) elsewhere."""
    def put(values: np.ndarray, fill: np.ndarray | float) -> np.ndarray:
        out = np.empty((len(rows), *values.shape[1:]), dtype=np.float64)
        out[...] = fill
        out[rows] = values
        return out

    return ClassMatch(correlation=put(match.correlation, np.nan),
                      correlation_unfiltered=put(match.correlation_unfiltered, np.nan),
                      correlation_bandpass=put(match.correlation_bandpass, np.nan),
                      search_correlation=put(match.search_correlation, np.nan),
                      rotations=put(match.rotations, np.eye(3)), shifts_px=put(match.shifts_px, np.nan),
                      mask_radius_px=match.mask_radius_px, lowpass_angstrom=match.lowpass_angstrom,
                      highpass_angstrom=match.highpass_angstrom, n_directions=match.n_directions)


def evaluate_classification(out_dir: str | Path, session_dir: str | Path, lowpass_angstrom: float | None = 10.0,
                            threshold: float = GOOD_CORRELATION, symmetry: torch.Tensor | None = None,
                            direction_step_degrees: float = 3.5, max_shift_px: float = 3.0,
                            highpass_angstrom: float | None = 40.0) -> dict:
    """All the figures of a classification ``out_dir`` of the simulated session ``session_dir`` (module docstring).

    Reads ``out_dir/{class_averages.mrcs, classes.star, particles.star}`` and
    ``session_dir/{reference.mrc, particles.star}``; the two particle tables are matched by rlnImageName.

    Returns
    -------
    dict
        JSON-ready: ``classes`` (per class: number, particles, real particles, correlation (low-passed, not,
        band-passed), junk flag, the classifier's resolution and accuracy, the pose's Euler angles),
        ``good_fraction`` (metric 2; ``_unfiltered`` and ``_bandpass``: the same with those correlations),
        ``median_class_correlation[_bandpass]`` (over the real particles' classes), ``inplane`` (metric 3:
        median and 90th percentile of the twist, median swing, over the real particles of good classes),
        ``junk`` (metric 4, or ``None`` when the truth has no junk column).
    """
    out_dir, session_dir = Path(out_dir), Path(session_dir)
    volume, map_apix = read_volume(session_dir / "reference.mrc")
    averages = read_images(out_dir / "class_averages.mrcs")
    with open_mrc(out_dir / "class_averages.mrcs") as mrc:
        avg_apix = voxel_size(mrc)
    if abs(avg_apix - map_apix) > 1e-3 * map_apix:
        raise ValueError(f"class averages at {avg_apix} Å/px, the true map at {map_apix} Å/px")
    classes = _read_block(out_dir / "classes.star", "model_classes")
    predicted = _read_block(out_dir / "particles.star", "particles")
    truth = _read_block(session_dir / "particles.star", "particles")
    for column in ("rlnImageName", "rlnClassNumber", "rlnAnglePsi"):
        if column not in predicted:
            raise ValueError(f"{out_dir / 'particles.star'}: no column {column}")
    # the same image may be named relative to another directory: match on (index, resolved stack)
    truth.index = _image_keys(truth["rlnImageName"], session_dir)
    keys = _image_keys(predicted["rlnImageName"], out_dir)
    missing = ~keys.isin(truth.index)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} classified particles are not in the session "
                         f"(first: {predicted['rlnImageName'][missing].iloc[0]})")
    truth = truth.loc[keys]

    # class number -> row of classes.star -> image of the stack
    numbers = classes["rlnClassNumber"].to_numpy(dtype=np.int64)
    image_of_row = _average_index(classes["rlnReferenceImage"]) if "rlnReferenceImage" in classes else numbers - 1
    if image_of_row.max() >= averages.shape[0] or image_of_row.min() < 0:
        raise ValueError(f"classes.star names image {int(image_of_row.max()) + 1} of a {averages.shape[0]}-image stack")
    row_of_number = pd.Series(np.arange(len(numbers)), index=numbers)
    particle_class = predicted["rlnClassNumber"].to_numpy(dtype=np.int64)
    unknown = ~np.isin(particle_class, numbers)
    if unknown.any():
        raise ValueError(f"particles in class {int(particle_class[unknown][0])}, which classes.star does not list")
    particle_row = row_of_number.loc[particle_class].to_numpy()

    counts = np.bincount(particle_row, minlength=len(numbers))
    occupied = counts > 0  # an empty class has nothing to be judged by: it is left out (NaN)
    found = match_class_averages(averages[torch.as_tensor(image_of_row[occupied])], volume, map_apix, lowpass_angstrom,
                                 direction_step_degrees, max_shift_px, highpass_angstrom=highpass_angstrom)
    match = _spread(found, occupied)
    junk_type = (truth[SIMULATED_JUNK_COLUMN].to_numpy(dtype=np.int64) if SIMULATED_JUNK_COLUMN in truth
                 else np.zeros(len(truth), dtype=np.int64))
    real = junk_type == 0
    good = match.correlation[particle_row] >= threshold

    inplane = {"n_particles": int((real & good).sum())}
    if (real & good).any():
        sel = real & good
        true_rot = euler_to_matrix(*(torch.as_tensor(truth[c].to_numpy(dtype=np.float64)[sel])
                                     for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
        twist, swing = inplane_errors(torch.as_tensor(predicted["rlnAnglePsi"].to_numpy(dtype=np.float64)[sel]),
                                      torch.as_tensor(match.rotations[particle_row[sel]]), true_rot, symmetry)
        inplane.update(median_degrees=float(twist.median()), p90_degrees=float(torch.quantile(twist, 0.9)),
                       swing_median_degrees=float(swing.median()), swing_p90_degrees=float(torch.quantile(swing, 0.9)),
                       within_5_degrees=float((twist < 5).double().mean()))

    real_counts = np.bincount(particle_row[real], minlength=len(numbers))
    rot, tilt, psi = (t.numpy() for t in matrix_to_euler(torch.as_tensor(match.rotations)))
    per_class = []
    for i, number in enumerate(numbers):
        row = classes.iloc[i]
        per_class.append({
            "class": int(number), "particles": int(counts[i]), "real_particles": int(real_counts[i]),
            "correlation": round(float(match.correlation[i]), 4),
            "correlation_unfiltered": round(float(match.correlation_unfiltered[i]), 4),
            "correlation_bandpass": round(float(match.correlation_bandpass[i]), 4),
            "junk": int(row.get(JUNK_COLUMN, 0)),
            "junk_score": float(row.get("rlnCryofastarJunkScore", float("nan"))),
            "estimated_resolution_angstrom": float(row.get("rlnEstimatedResolution", float("nan"))),
            "accuracy_rotations_degrees": float(row.get("rlnAccuracyRotations", float("nan"))),
            "pose_degrees": [round(float(rot[i]), 2), round(float(tilt[i]), 2), round(float(psi[i]), 2)],
            "shift_px": [round(float(v), 2) for v in match.shifts_px[i]],
        })
    junk = None
    if SIMULATED_JUNK_COLUMN in truth:
        if JUNK_COLUMN not in predicted:
            raise ValueError(f"{out_dir / 'particles.star'}: no column {JUNK_COLUMN}")
        junk = junk_metrics(predicted[JUNK_COLUMN].to_numpy(), junk_type)
    return {
        "n_particles": int(len(predicted)), "n_real": int(real.sum()), "n_classes": int(len(numbers)),
        "n_classes_occupied": int(occupied.sum()),
        "good_threshold": threshold, "lowpass_angstrom": lowpass_angstrom, "mask_radius_px": match.mask_radius_px,
        "n_directions": match.n_directions,
        "good_fraction": good_class_fraction(particle_row, match.correlation, real, threshold),
        "good_fraction_unfiltered": good_class_fraction(particle_row, match.correlation_unfiltered, real, threshold),
        "good_fraction_bandpass": good_class_fraction(particle_row, match.correlation_bandpass, real, threshold),
        "highpass_angstrom": highpass_angstrom,
        "median_class_correlation": _weighted_median(match.correlation[particle_row[real]]),
        "median_class_correlation_bandpass": _weighted_median(match.correlation_bandpass[particle_row[real]]),
        "inplane": inplane, "junk": junk, "classes": per_class,
    }


# ------------------------------------------------------------------------------------ the ceiling (true poses)


def _cluster_directions(directions: torch.Tensor, k: int, generator: torch.Generator,
                        iterations: int = 25) -> torch.Tensor:
    """`(n,)` labels of unit vectors `(n, 3)` in ``k`` clusters (spherical k-means from ``k`` random members)."""
    centres = directions[torch.randperm(len(directions), generator=generator)[:k]].clone()
    for _ in range(iterations):
        labels = (directions @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, directions)
        norm = sums.norm(dim=1, keepdim=True)
        empty = norm[:, 0] < 1e-9
        centres = torch.where(empty[:, None], centres, sums / norm.clamp(min=1e-12))
    return (directions @ centres.T).argmax(1)


def ceiling_classification(session_dir: str | Path, out_dir: str | Path, n_classes: int, seed: int = 0,
                           wiener_constant: float = 1.0) -> Path:
    """Class files made from the TRUE poses: what a classifier with ``n_classes`` classes could at best reach.

    The real particles (junk left out) are clustered by their true view direction (spherical k-means,
    ``n_classes`` clusters); each class's frame is its mean direction at ``psi = 0`` (``A_c``), each particle's
    2D angle is ``psi = -twist(A_true @ A_c.T)`` (so ``Rz(psi) @ A_c`` is ``A_true`` up to the out-of-plane
    spread of the class), its 2D origin the true one. A class average is the Wiener average
    ``sum(CTF F) / (sum(CTF^2) + wiener_constant)`` of its particles, each re-centred by its true origin and
    turned into the class frame (:func:`rotate_images` by ``-psi``; its CTF evaluated at the same turned
    frequencies with :func:`~cryofastar.recon.ctf.ctf_at`). What is left is the blur of the views a class
    spans and the noise: the figures of this ceiling show how far a perfect aligner with ``n_classes`` classes
    gets on the same particles. Written as the classifier writes them (``class_averages.mrcs``,
    ``classes.star`` by :func:`~cryofastar.recon.io.class_files.write_class_files`, ``particles.star`` of the
    real rows, ``rlnCryofastarJunk`` 0); returns ``out_dir``.
    """
    session_dir, out_dir = Path(session_dir), Path(out_dir)
    table = read_particles(session_dir / "particles.star")
    frame = table.particles
    real = (frame[SIMULATED_JUNK_COLUMN].to_numpy() == 0 if SIMULATED_JUNK_COLUMN in frame
            else np.ones(len(frame), dtype=bool))
    table = table.select(np.flatnonzero(real))
    n, box, apix = len(table), table.box, table.apix
    if n < n_classes:
        raise ValueError(f"{n} real particles for {n_classes} classes")
    true_rot = table.rotations().double()
    labels = _cluster_directions(true_rot[:, 2, :], n_classes, torch.Generator().manual_seed(seed))
    centre = torch.zeros(n_classes, 3, dtype=torch.float64).index_add_(0, labels, true_rot[:, 2, :])
    centre = centre / centre.norm(dim=1, keepdim=True).clamp(min=1e-12)
    rot_c = torch.rad2deg(torch.atan2(centre[:, 1], centre[:, 0]))
    tilt_c = torch.rad2deg(torch.acos(centre[:, 2].clamp(-1, 1)))
    class_rot = euler_to_matrix(rot_c, tilt_c, torch.zeros_like(rot_c))
    twist, _ = swing_twist_degrees(true_rot @ class_rot[labels].transpose(-1, -2))
    psi = -twist
    origins = table.origins_angstrom().double()
    ctf = table.ctf()
    numerator = torch.zeros(n_classes, box, box // 2 + 1, dtype=torch.complex128)
    denominator = torch.zeros(n_classes, box, box // 2 + 1, dtype=torch.float64)
    q = rfft_frequencies_2d(box, dtype=torch.float64) / apix  # (B, Bf, 2) 1/Å
    for stack in np.unique(table.stack_paths):  # one read per stack; all else vectorised
        rows = np.flatnonzero(table.stack_paths == stack)
        images = read_images(stack, table.image_indices[rows]).double()
        r = torch.as_tensor(rows)
        centred = irfft2_centered(phase_shift_rfft2(rfft2_centered(images), origins[r] / apix, box), box)
        turned = rfft2_centered(rotate_images(centred, -psi[r]).double())
        if ctf is None:
            weight = torch.ones(len(rows), box, box // 2 + 1, dtype=torch.float64)
        else:
            # the turned image's spectrum at q is the particle's at R(-psi) q: its CTF is read there
            back = inplane_rotations(-psi[r])[:, :2, :2].transpose(-1, -2)  # R(-psi), as rotate_images uses
            weight = ctf_at(ctf[r], torch.einsum("nij,yxj->nyxi", back, q)).double()
        numerator.index_add_(0, labels[r], weight * turned)
        denominator.index_add_(0, labels[r], weight * weight)
    averages = irfft2_centered(numerator / (denominator + wiener_constant), box).float()
    counts = torch.bincount(labels, minlength=n_classes).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_class_files(out_dir / "class_averages.mrcs", out_dir / "classes.star", averages, apix, counts,
                      [None] * n_classes, [None] * n_classes, [False] * n_classes, [0.0] * n_classes)
    blocks = starfile.read(session_dir / "particles.star", always_dict=True)
    rows = blocks["particles"].loc[real].copy()
    if not (rows["rlnImageName"].to_numpy() == frame["rlnImageName"].to_numpy()[real]).all():
        raise ValueError(f"{session_dir / 'particles.star'}: rows read in another order")
    parts = rows["rlnImageName"].astype(str).str.split("@", n=1, expand=True)  # stacks named from out_dir
    relative = {name: os.path.relpath(os.path.realpath(session_dir / name), out_dir) for name in parts[1].unique()}
    rows["rlnImageName"] = parts[0].astype(int).map("{:06d}".format) + "@" + parts[1].map(relative)
    rows["rlnClassNumber"] = labels.numpy() + 1
    rows["rlnAnglePsi"] = psi.numpy()
    rows[JUNK_COLUMN] = 0
    starfile.write({**blocks, "particles": rows}, out_dir / "particles.star", overwrite=True)
    return out_dir

