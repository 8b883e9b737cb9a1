"""From accumulated Fourier data and weights to a real-space map.

``F = data / max(weight, min_weight)`` (regularised division: voxels with less
than ``min_weight`` particle-equivalents of weight are damped rather than blown up),
inverse rfft of the oversampled grid, crop of the central ``B^3`` box, and the
gridding correction: division by the Fourier transform of the insertion kernel
(``sinc^2`` per axis for trilinear, ``sinc`` for nearest neighbour), evaluated on
the oversampled grid.
"""

from __future__ import annotations

import torch

from .fourier import irfft3_centered
from .insertion import Interpolation, fold_grid

__all__ = ["gridding_correction", "grid_to_volume"]


def gridding_correction(
    box: int, size: int, interpolation: Interpolation, device: torch.device | None = None
) -> torch.Tensor:
    """`(B, B, B)` real-space apodisation of the insertion kernel, centre at B // 2.

    Voxel ``i`` of the cropped box sits at ``(i - B//2) / N`` cycles of the
    oversampled grid of side ``N = size``.
    """
    n = size
    u = (torch.arange(box, device=device, dtype=torch.float64) - box // 2) / n
    per_axis = torch.sinc(u)
    if interpolation == "trilinear":
        per_axis = per_axis**2
    return (per_axis[:, None, None] * per_axis[None, :, None] * per_axis[None, None, :]).float()


def grid_to_volume(
    grid: torch.Tensor,
    box: int,
    interpolation: Interpolation,
    min_weight: float = 1.0,
) -> torch.Tensor:
    """Real-space map from one accumulation grid.

    Parameters
    ----------
    grid: torch.Tensor
        `(N + 2, N + 2, N // 2 + 2, 3)` accumulation grid filled by
        :func:`~cryofastar.recon.insertion.insert_slices`.
    box: int
        Output box ``B`` (pixels); the grid's side ``N`` may be larger (oversampling).
    interpolation: Interpolation
        Kernel used for insertion (selects the gridding correction).
    min_weight: float
        Floor of the weight in the division (particle-equivalents; with CTF,
        a sample's weight is its CTF^2).

    Returns
    -------
    volume: torch.Tensor
        `(B, B, B)` float32 [z, y, x] map, centre at ``B // 2``, in the units of
        the input images (a map whose projections are the images).
    """
    n = grid.shape[0] - 2
    data, weight = fold_grid(grid)
    spectrum = data / torch.clamp(weight, min=min_weight)
    volume = irfft3_centered(spectrum, n)
    start = n // 2 - box // 2
    volume = volume[start : start + box, start : start + box, start : start + box]
    correction = gridding_correction(box, n, interpolation, device=volume.device)
    return (volume / correction).to(torch.float32).contiguous()
