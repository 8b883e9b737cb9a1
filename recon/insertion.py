"""Vectorised insertion of 2D central slices into an oversampled 3D Fourier grid.

Grid layout (docs/conventions.md, "Fourier grids"). ``N`` is the oversampled box
(``N = oversampling * B``; images are zero-padded to ``N`` before their FFT, as
RELION does). The accumulation grid is `(N + 2, N + 2, N // 2 + 2, 3)`
[z, y, x, channel]: along z and y, index ``i`` holds frequency ``i - N // 2``
(so DC is at ``[N//2, N//2, 0]`` and every scatter index is non-negative, with
one spare row at each end for the far trilinear corners); along x, index = kx
(the non-redundant rfft half plus one spare column). Channels are (real part of
data, imaginary part of data, weight), so one scatter updates a voxel's data and
weight together. :func:`fold_grid` turns it into the usual un-shifted
`(N, N, N // 2 + 1)` rfft layout (DC at index 0) by adding rows that alias
modulo ``N``.

Samples are rotated into the grid with RELION's rule (3D frequency ``A.T @ k``);
samples landing at negative x are replaced by their Friedel mates (negated
coordinate, conjugated value). The x = 0 plane is therefore only "half" filled;
:func:`fold_grid` completes it, which makes the result identical to inserting
every sample and its mate into a full grid.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from .fourier import rfft_frequencies_2d

__all__ = ["Interpolation", "fold_grid", "grid_shape", "insert_slices"]

Interpolation = Literal["trilinear", "nearest"]

_CORNER_OFFSETS = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def grid_shape(size: int) -> tuple[int, int, int, int]:
    """Shape `(N + 2, N + 2, N // 2 + 2, 3)` of the accumulation grid for side ``N``."""
    return (size + 2, size + 2, size // 2 + 2, 3)


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
        `(N + 2, N + 2, N // 2 + 2, 3)` float32 grid from :func:`grid_shape`.
    slices_rfft: torch.Tensor
        `(n, N, N // 2 + 1)` complex rfft of the (padded) images, DC at index 0,
        already re-centred (shifted) and, with CTF, multiplied by the CTF.
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices ``A`` of the slices: the sample at 2D
        frequency ``k`` lands at ``A.T @ (kx, ky, 0)``.
    slice_weights: torch.Tensor | None
        `(n, N, N // 2 + 1)` real per-sample weights added to the weight channel
        (CTF^2 for Wiener-style insertion, the data being already ``CTF * F``);
        ``None`` means 1 per sample. The data are not multiplied by them.
    interpolation: Interpolation
        ``"trilinear"`` spreads each sample over its 8 neighbouring voxels;
        ``"nearest"`` adds it to the closest voxel (8x fewer scatters).
    """
    n_img = slices_rfft.shape[0]
    size = grid.shape[0] - 2
    if n_img == 0:
        return
    if slices_rfft.shape[-2:] != (size, size // 2 + 1):
        raise ValueError(f"slices {tuple(slices_rfft.shape)} do not fit a grid of side {size}")
    index, k = _in_sphere_frequencies(size, grid.device)
    n_samples = n_img * index.numel()

    # zyx = flip(A.T @ (kx, ky, 0)): z_j = sum_i k_i A[i, j] for j = z, y, x
    a_zyx = torch.flip(rotations.to(grid.device, torch.float32)[:, :2, :], dims=(-1,))
    coordinates = torch.einsum("pi,nij->npj", k, a_zyx).reshape(n_samples, 3)
    sign = torch.where(coordinates[:, 2] < 0, -1.0, 1.0)  # Friedel mate where x < 0
    coordinates *= sign[:, None]

    values = torch.view_as_real(slices_rfft.reshape(n_img, -1)[:, index].to(torch.complex64))
    rows = torch.empty(n_samples, 3, device=grid.device)
    rows[:, :2] = values.reshape(n_samples, 2)
    rows[:, 1] *= sign  # conjugate the mates
    if slice_weights is None:
        rows[:, 2] = 1.0
    else:
        w = slice_weights.reshape(n_img, -1)[:, index].to(torch.float32).reshape(n_samples)
        rows[:, 2] = w
    strides = (grid.shape[1] * grid.shape[2], grid.shape[2], 1)
    # shifted z/y rows: index = k + N // 2 >= 0, so no wrapping is needed
    origin = (size // 2) * (strides[0] + strides[1])

    if interpolation == "nearest":
        flat = _flat_index(torch.round(coordinates), strides, origin, grid)
    elif interpolation == "trilinear":
        floor = torch.floor(coordinates)
        frac = coordinates - floor
        base = _flat_index(floor, strides, origin, grid)
        offsets = torch.tensor([dz * strides[0] + dy * strides[1] + dx for dz, dy, dx in _CORNER_OFFSETS],
                               device=grid.device)
        flat = (base[:, None] + offsets).reshape(-1)
        fz, fy, fx = frac.unbind(-1)
        wz = torch.stack([1 - fz, fz], -1)
        wy = torch.stack([1 - fy, fy], -1)
        wx = torch.stack([1 - fx, fx], -1)
        tri = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(-1, 8)
        rows = (rows[:, None, :] * tri[..., None]).reshape(-1, 3)  # corner order = _CORNER_OFFSETS
    else:
        raise ValueError(f"unknown interpolation {interpolation!r}")
    # One flat scatter over the interleaved channels: on the CPU, 1-D scatter_add_
    # runs ~2.3x faster than index_add_ over 3-wide rows (measured, torch 2.13).
    channel = torch.arange(3, device=grid.device)
    grid.view(-1).scatter_add_(0, (flat[:, None] * 3 + channel).reshape(-1), rows.reshape(-1))


def _flat_index(
    voxels: torch.Tensor, strides: tuple[int, int, int], origin: int, grid: torch.Tensor
) -> torch.Tensor:
    """`(M,)` int64 flat grid index of integer-valued `(M, 3)` zyx voxel coordinates.

    Computed as one matrix-vector product in floating point, exact because every
    index is an integer below 2^24 (float32) or 2^53 (float64, large grids).
    """
    dtype = torch.float32 if grid.numel() // 3 < 2**24 else torch.float64
    weights = torch.tensor(strides, dtype=dtype, device=voxels.device)
    offset = torch.full((voxels.shape[0],), float(origin), dtype=dtype, device=voxels.device)
    return torch.addmv(offset, voxels.to(dtype), weights).to(torch.int64)


def fold_grid(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and weight in the un-shifted rfft layout, x = 0 plane completed.

    Parameters
    ----------
    grid: torch.Tensor
        `(N + 2, N + 2, N // 2 + 2, 3)` accumulation grid (untouched).

    Returns
    -------
    data, weight: tuple[torch.Tensor, torch.Tensor]
        `(N, N, N // 2 + 1)` complex64 data and float32 weight, DC at index 0.
        Rows that alias modulo ``N`` are summed; the spare x column (beyond
        Nyquist) is dropped; on the x = 0 plane ``data(z, y) + conj(data(-z, -y))``
        and ``weight(z, y) + weight(-z, -y)``.
    """
    size = grid.shape[0] - 2
    target = (torch.arange(size + 2, device=grid.device) - size // 2) % size
    folded = torch.zeros((size, size + 2, *grid.shape[2:]), device=grid.device, dtype=grid.dtype)
    folded.index_add_(0, target, grid)
    out = torch.zeros((size, size, *grid.shape[2:]), device=grid.device, dtype=grid.dtype)
    out.index_add_(1, target, folded)
    out = out[:, :, : size // 2 + 1]
    data = torch.complex(out[..., 0], out[..., 1])
    weight = out[..., 2].clone()

    def mirror(plane: torch.Tensor) -> torch.Tensor:
        return torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))

    plane, wplane = data[:, :, 0].clone(), weight[:, :, 0].clone()
    data[:, :, 0] = plane + mirror(plane).conj()
    weight[:, :, 0] = wplane + mirror(wplane)
    return data, weight
