"""From class sums to what the search compares particles with, and to what users see.

* :func:`class_frc`: the Fourier ring correlation of each class's two half-set
  averages, per ring (index = rounded radius in Fourier pixels, ``0 .. B // 2``);
  its 0.143 crossing is the class's resolution, as for 3D maps.
* :func:`class_averages`: Wiener-filtered, CTF-corrected averages with each class's
  own spectral SNR (``SSNR = 2 FRC / (1 - FRC)`` of the full set), so a class knows
  only what its particles support: a class of noise stays flat, a sharp class is sharp.
* :func:`soft_circular_mask`: the particle's disc with a cosine edge.
* :func:`centre_of_mass`: how far each average's density sits from the box centre.

Real-space images are `(K, B, B)` [class, y, x] with the centre at pixel ``B // 2``.
"""

from __future__ import annotations

import math

import torch

from .class_sums import ClassSums

__all__ = ["centre_of_mass", "class_averages", "class_frc", "frc_resolution", "soft_circular_mask", "weighted_median"]


def class_frc(sums: ClassSums) -> torch.Tensor:
    """`(K, B//2+1)` float64 FRC between the half-set averages of each class (0 where undefined)."""
    a, b = sums.wiener(half=1), sums.wiener(half=2)
    # the rfft half plane counts each non-self-conjugate pixel once: the ratio is unaffected
    cross = sums.ring_sum((a * b.conj()).real)
    power = sums.ring_sum(a.abs().square()) * sums.ring_sum(b.abs().square())
    frc = torch.where(power > 0, cross / power.clamp(min=1e-300).sqrt(), torch.zeros_like(cross))
    return frc.clamp(-1.0, 1.0)


def frc_resolution(frc: torch.Tensor, box: int, apix: float, threshold: float = 0.143) -> torch.Tensor:
    """`(K,)` float64 resolution in Å of each class: the last ring before the FRC first drops below ``threshold``.

    ``inf`` when ring 1 is already below it (no measurable signal).
    """
    rings = frc.shape[-1]
    below = frc[:, 1:] < threshold  # rings 1 .. B//2
    first_below = torch.where(below.any(-1), below.float().argmax(-1) + 1, torch.full((frc.shape[0],), rings))
    last_good = first_below - 1  # ring index of the last ring above the threshold
    res = torch.where(last_good >= 1, box * apix / last_good.clamp(min=1).to(torch.float64),
                      torch.full((frc.shape[0],), math.inf, dtype=torch.float64))
    return res


def class_averages(sums: ClassSums, frc: torch.Tensor, r_max: float | None = None) -> torch.Tensor:
    """`(K, B, B//2+1)` complex128 spectra of the Wiener class averages (module docstring).

    Parameters
    ----------
    sums: ClassSums
        The class sums.
    frc: torch.Tensor
        `(K, B//2+1)` from :func:`class_frc`.
    r_max: float | None
        Zero every frequency beyond this radius (Fourier pixels); ``None``: keep all.
    """
    f = frc.clamp(1e-3, 0.999)
    ssnr = 2 * f / (1 - f)
    spectra = sums.wiener(ssnr)
    if r_max is not None:
        spectra = torch.where(sums.radius <= r_max, spectra, 0)
    return spectra


def soft_circular_mask(box: int, diameter_px: float, edge_px: float = 3.0) -> torch.Tensor:
    """`(B, B)` float32: 1 within ``diameter_px / 2`` of the centre ``B // 2``, a cosine fall to 0 over ``edge_px``."""
    c = torch.arange(box, dtype=torch.float32) - box // 2
    r = (c[:, None].square() + c[None, :].square()).sqrt()
    inner = diameter_px / 2
    t = ((r - inner) / max(edge_px, 1e-6)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def centre_of_mass(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(K, 2)` (x, y) pixels from the centre of each image's positive density within ``mask`` (0 if none)."""
    box = images.shape[-1]
    density = (images * mask).clamp(min=0)
    c = torch.arange(box, dtype=torch.float32) - box // 2
    total = density.sum(dim=(-2, -1))
    x = (density * c[None, None, :]).sum(dim=(-2, -1))
    y = (density * c[None, :, None]).sum(dim=(-2, -1))
    com = torch.stack([x, y], -1) / total.clamp(min=1e-30)[:, None]
    return torch.where(total[:, None] > 0, com, torch.zeros_like(com))


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float | None:
    """The value below which half of the `(K,)` ``weights`` lie (classes weighted by their particles);
    ``None`` when the weights sum to 0."""
    order = torch.argsort(values)
    cumulative = torch.cumsum(weights[order].to(torch.float64), 0)
    if float(cumulative[-1]) <= 0:
        return None
    return float(values[order][int(torch.searchsorted(cumulative, 0.5 * cumulative[-1]))])
