"""Fourier shell correlation and resolution estimates.

Shells are one Fourier pixel wide: shell ``i`` holds frequencies with
``round(|k| * B) == i`` (k in cycles per pixel), for ``i = 0 .. B // 2``; shell
``i`` is at spatial frequency ``i / (B * apix)`` 1/Å, i.e. resolution
``B * apix / i`` Å. Nyquist is shell ``B // 2`` (``2 * apix`` Å).
"""

from __future__ import annotations

import math

import torch

from .fourier import rfft3_centered

__all__ = ["fsc", "resolution_at_threshold", "resolution_text", "shell_resolutions_angstrom"]


def _shell_index(box: int, device: torch.device) -> torch.Tensor:
    """`(B, B, B // 2 + 1)` long shell index of every rfft voxel of a ``B^3`` map."""
    kz = torch.fft.fftfreq(box, device=device) * box
    kx = torch.fft.rfftfreq(box, device=device) * box
    radius = torch.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx**2)
    return torch.round(radius).long()


def fsc(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """Fourier shell correlation of two cubic maps.

    Parameters
    ----------
    map1, map2: torch.Tensor
        `(B, B, B)` real maps, [z, y, x], same box.

    Returns
    -------
    curve: torch.Tensor
        `(B // 2 + 1,)` float64 FSC per shell (shell 0 = DC). Each rfft voxel
        with 0 < x < B/2 stands for itself and its Friedel mate, so it counts twice.
    """
    if map1.shape != map2.shape or map1.ndim != 3 or len(set(map1.shape)) != 1:
        raise ValueError(f"maps must be cubic and equal: {tuple(map1.shape)} vs {tuple(map2.shape)}")
    box = map1.shape[0]
    f1 = rfft3_centered(map1.to(torch.float64))
    f2 = rfft3_centered(map2.to(torch.float64))
    shells = _shell_index(box, map1.device)
    multiplicity = torch.full(shells.shape, 2.0, dtype=torch.float64, device=map1.device)
    multiplicity[..., 0] = 1.0
    if box % 2 == 0:
        multiplicity[..., -1] = 1.0
    n_shells = box // 2 + 1
    valid = shells < n_shells
    index = shells[valid]
    m = multiplicity[valid]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n_shells, dtype=torch.float64, device=map1.device)
        return out.index_add_(0, index, values[valid] * m)

    cross = shell_sum((f1 * f2.conj()).real)
    p1 = shell_sum(f1.abs() ** 2)
    p2 = shell_sum(f2.abs() ** 2)
    return cross / torch.sqrt(torch.clamp(p1 * p2, min=torch.finfo(torch.float64).tiny))


def shell_resolutions_angstrom(box: int, apix: float) -> torch.Tensor:
    """`(B // 2 + 1,)` resolution in Å of each shell (``inf`` for DC)."""
    shells = torch.arange(box // 2 + 1, dtype=torch.float64)
    return box * apix / shells


def resolution_text(angstrom: float | None) -> str:
    """``"4.00 Å"``, or ``"undefined"`` for a resolution that is ``None``, NaN or infinite."""
    if angstrom is None or not math.isfinite(angstrom):
        return "undefined"
    return f"{angstrom:.2f} Å"


def resolution_at_threshold(curve: torch.Tensor, apix: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first drops below ``threshold``.

    The crossing is linearly interpolated between the last shell at or above the
    threshold and the first below it (in spatial frequency). If the curve never
    drops below the threshold, Nyquist (``2 * apix``) is returned; if it is below
    from shell 1 on, the box size (``B * apix``, no information) is returned. If a
    shell from 1 on is NaN or infinite (maps with NaN or Inf voxels), the resolution is
    unknown and NaN is returned, never Nyquist (docs/conventions.md, FSC).

    Parameters
    ----------
    curve: torch.Tensor
        `(B // 2 + 1,)` FSC from :func:`fsc`.
    apix: float
        Pixel size in Å.
    threshold: float
        0.143 for half maps (gold standard), 0.5 against a reference map.
    """
    values = curve.double().cpu()
    box = 2 * (values.numel() - 1)
    if values.numel() < 2 or not bool(torch.isfinite(values[1:]).all()):
        return float("nan")
    below = torch.nonzero(values[1:] < threshold).squeeze(-1)
    if below.numel() == 0:
        return 2.0 * apix
    first = int(below[0]) + 1  # shell index of the first value below the threshold
    if first == 1:
        return box * apix
    hi, lo = float(values[first - 1]), float(values[first])
    shell = (first - 1) + (hi - threshold) / (hi - lo)
    return box * apix / shell
