"""Comparing a map with a known one when its centre and hand are free (ab initio maps).

An ab initio map is defined up to a global rotation, the hand and a translation. The
rotation is fixed from the poses (:mod:`cryofastar.model.evaluation` fits it; the map is
rebuilt with the aligned poses); what is left is done here on the maps themselves:
:func:`translate_onto` moves a map onto a reference by the peak of their cross-correlation
(sub-voxel by a parabola per axis), and :func:`resolution_vs_known_map` takes the FSC
after that, for the reference and its mirror image, keeping the better.
"""

from __future__ import annotations

import math

import torch

from .fsc import fsc, resolution_at_threshold

__all__ = ["resolution_vs_known_map", "translate_onto"]


def translate_onto(volume: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`(B, B, B)` ``volume`` translated (periodically, by a Fourier phase) to best overlap ``reference``."""
    box = volume.shape[0]
    cc = torch.fft.irfftn(torch.fft.rfftn(reference.double()) * torch.fft.rfftn(volume.double()).conj(),
                          s=volume.shape)
    flat = int(cc.argmax())
    peak = (flat // (box * box), (flat // box) % box, flat % box)
    shift = []
    for axis in range(3):
        values = []
        for d in (-1, 0, 1):
            index = list(peak)
            index[axis] = (index[axis] + d) % box
            values.append(float(cc[tuple(index)]))
        curvature = values[0] - 2 * values[1] + values[2]
        offset = 0.5 * (values[0] - values[2]) / curvature if curvature < 0 else 0.0
        s = peak[axis] + max(-0.5, min(0.5, offset))
        shift.append(s - box if s > box / 2 else s)
    k = [torch.fft.fftfreq(box, dtype=torch.float64, device=volume.device),
         torch.fft.fftfreq(box, dtype=torch.float64, device=volume.device),
         torch.fft.rfftfreq(box, dtype=torch.float64, device=volume.device)]
    kz, ky, kx = torch.meshgrid(*k, indexing="ij")
    phase = -2 * torch.pi * (kz * shift[0] + ky * shift[1] + kx * shift[2])
    moved = torch.fft.irfftn(torch.fft.rfftn(volume.double()) * torch.polar(torch.ones_like(phase), phase),
                             s=volume.shape)
    return moved.to(volume.dtype)


def resolution_vs_known_map(volume: torch.Tensor, reference: torch.Tensor, apix: float,
                            threshold: float = 0.5) -> float:
    """FSC resolution (Å) of ``volume`` against ``reference`` or its mirror, whichever is better.

    ``volume`` is first translated onto the map it is compared with (:func:`translate_onto`).
    Both maps `(B, B, B)` [z, y, x] at ``apix`` Å/px. NaN (unknown, e.g. a NaN map) only when
    neither comparison has a resolution.
    """
    found = [resolution_at_threshold(fsc(translate_onto(volume, target), target), apix, threshold)
             for target in (reference, reference.flip(0))]
    known = [r for r in found if not math.isnan(r)]
    return min(known) if known else math.nan
