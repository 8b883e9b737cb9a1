"""Vectorised insertion of 2D central slices into an oversampled 3D Fourier grid.

Grid layout (docs/conventions.md, "Fourier grids"): an *un-shifted* rfft grid of
side ``N`` (the oversampled box, ``N = oversampling * B``; images are zero-padded
to ``N`` before their FFT, as RELION does) stored as `(N, N, N // 2 + 2, 3)`
[z, y, x, channel] with DC at ``[0, 0, 0]``; negative z/y frequencies wrap modulo ``N``. One extra x column
(beyond the rfft's ``N // 2 + 1``) receives the far trilinear corners of samples
at Nyquist so nothing needs clipping; it is dropped when the volume is made.

Samples are rotated into the grid with RELION's rule (3D frequency ``A.T @ k``),
samples landing at negative x are replaced by their Friedel mates (negated
coordinate, conjugated value). The x = 0 plane is therefore only "half" filled;
:func:`hermitian_symmetrize_x0` completes it when the volume is computed, which
makes the result identical to inserting every sample and its mate into a full grid.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .fourier import rfft_frequencies_2d

__all__ = ["Interpolation", "grid_shape", "hermitian_symmetrize_x0", "insert_slices"]

Interpolation = Literal["trilinear", "nearest"]

_CORNER_OFFSETS = [(dx, dy, dz) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def grid_shape(size: int) -> tuple[int, int, int, int]:
    """Shape `(N, N, N // 2 + 2, 3)` of an accumulation grid of side ``N``.

    The last axis holds (real part of data, imaginary part of data, weight), so
    one scatter updates a voxel's data and weight together.
    """
    return (size, size, size // 2 + 2, 3)


@functools.lru_cache(maxsize=8)
def _in_sphere_frequencies(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """rfft pixels of an ``N x N`` slice inside the Nyquist sphere.

    Returns
    -------
    index: torch.Tensor
        `(P,)` long flat indices into the `(N, N // 2 + 1)` rfft.
    k: torch.Tensor
        `(P, 2)` float32 (kx, ky) of those pixels in grid voxels (cycles per box).
    """
    k = rfft_frequencies_2d(size, device=device).reshape(-1, 2) * size
    index = torch.nonzero((k**2).sum(-1) <= (size / 2) ** 2).squeeze(-1)
    return index, k[index].contiguous()


def insert_slices(
    grid: torch.Tensor,
    slices_rfft: torch.Tensor,
    rotations: torch.Tensor,
    slice_weights: torch.Tensor | None = None,
    interpolation: Interpolation = "trilinear",
) -> None:
    """Add many central slices to an accumulation grid, in place.

    Parameters
    ----------
    grid: torch.Tensor
        `(N, N, N // 2 + 2, 3)` float32 grid from :func:`grid_shape`: data
        (real, imaginary) and weight per voxel.
    slices_rfft: torch.Tensor
        `(n, N, N // 2 + 1)` complex rfft of the (padded) images, DC at index 0,
        already re-centred (shifted) and, with CTF, multiplied by the CTF.
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices ``A`` of the slices: the sample at 2D
        frequency ``k`` lands at ``A.T @ (kx, ky, 0)``.
    slice_weights: torch.Tensor | None
        `(n, N, N // 2 + 1)` real per-sample weights (CTF^2 for Wiener-style
        insertion); ``None`` means 1 per sample.
    interpolation: Interpolation
        ``"trilinear"`` spreads each sample over its 8 neighbouring voxels;
        ``"nearest"`` adds it to the closest voxel (8x fewer scatters).
    """
    n_img, size = slices_rfft.shape[0], grid.shape[0]
    if n_img == 0:
        return
    if slices_rfft.shape[-2:] != (size, size // 2 + 1):
        raise ValueError(f"slices {tuple(slices_rfft.shape)} do not fit a grid of side {size}")
    index, k = _in_sphere_frequencies(size, grid.device)
    values = slices_rfft.reshape(n_img, -1)[:, index].to(torch.complex64)  # (n, P)
    if slice_weights is None:
        sample_weight = torch.ones(values.shape, device=grid.device)
    else:
        sample_weight = slice_weights.reshape(n_img, -1)[:, index].to(torch.float32)

    # xyz = A.T @ (kx, ky, 0): xyz_j = sum_i k_i A[i, j] over i in {x, y}
    coordinates = torch.einsum("pi,nij->npj", k, rotations.to(grid.device, torch.float32)[:, :2, :])
    flip = coordinates[..., 0] < 0  # (n, P): insert the Friedel mate instead
    coordinates = torch.where(flip[..., None], -coordinates, coordinates).reshape(-1, 3)
    values = torch.where(flip, values.conj(), values).reshape(-1)
    rows = torch.stack([values.real, values.imag, torch.ones_like(values.real)], dim=-1)
    rows = rows * sample_weight.reshape(-1, 1)  # (M, 3): w*re, w*im, w
    rows[:, 2] = sample_weight.reshape(-1)
    strides = torch.tensor([1, grid.shape[2], size * grid.shape[2]], device=grid.device)

    if interpolation == "nearest":
        voxel = torch.round(coordinates).long()
        voxel[:, 1:] = torch.remainder(voxel[:, 1:], size)
        flat = voxel @ strides
    elif interpolation == "trilinear":
        floor = torch.floor(coordinates)
        frac = coordinates - floor
        offsets = torch.tensor(_CORNER_OFFSETS, device=grid.device)  # (8, 3)
        corners = floor.long()[:, None, :] + offsets  # (M, 8, 3)
        corners[..., 1:] = torch.remainder(corners[..., 1:], size)
        flat = (corners @ strides).reshape(-1)
        fx, fy, fz = frac.unbind(-1)
        wx = torch.stack([1 - fx, fx], -1)
        wy = torch.stack([1 - fy, fy], -1)
        wz = torch.stack([1 - fz, fz], -1)
        tri = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(-1, 8)
        rows = (rows[:, None, :] * tri[..., None]).reshape(-1, 3)
    else:
        raise ValueError(f"unknown interpolation {interpolation!r}")
    grid.view(-1, 3).index_add_(0, flat, rows)


def hermitian_symmetrize_x0(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and weight of a grid with the x = 0 plane completed by Friedel mates.

    Parameters
    ----------
    grid: torch.Tensor
        `(N, N, N // 2 + 2, 3)` accumulation grid (untouched).

    Returns
    -------
    data, weight: tuple[torch.Tensor, torch.Tensor]
        `(N, N, N // 2 + 2)` complex64 data and float32 weight where, on the
        x = 0 plane, ``data(z, y) + conj(data(-z, -y))`` and
        ``weight(z, y) + weight(-z, -y)``; elsewhere as accumulated.
    """
    data = torch.complex(grid[..., 0], grid[..., 1])
    weight = grid[..., 2].clone()

    def mirror(plane: torch.Tensor) -> torch.Tensor:
        return torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))

    plane, wplane = data[:, :, 0].clone(), weight[:, :, 0].clone()
    data[:, :, 0] = plane + mirror(plane).conj()
    weight[:, :, 0] = wplane + mirror(wplane)
    return data, weight
