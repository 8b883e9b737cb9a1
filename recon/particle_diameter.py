"""The particle's diameter, estimated from the particle images themselves.

Ab initio ties its resolution schedule and its solvent mask to the particle's size
(:mod:`cryofastar.recon.ab_initio`); when the user does not give the diameter (RELION's
``--particle_diameter``), it is measured here. Noise is white and the same in every
pixel, so the variance across particles of a pixel is ``sigma^2`` plus the signal's
variance there; the signal's variance is confined to the particle (images are phase
flipped first when a CTF is given, which undoes most of its delocalisation). The excess
variance over the box corners' (beyond ``0.48 B`` from the centre, taken as signal-free),
summed ring by ring, gives the radius ``r95`` that holds 95 % of the signal's variance;
projections are smaller than the 3D extent and shifts blur the edge, so the diameter is
``DIAMETER_PER_R95 * r95`` — a constant measured once on 16 held-out molecules of
bench/panel_molecules.py (r95 was 0.70-0.93 of the largest radius, median 0.8) and not per
molecule. It is clamped to ``[0.25, 0.96]`` of the box.
"""

from __future__ import annotations

import torch

from .ctf import CtfParams, ctf_rfft
from .fourier import irfft2_centered, rfft2_centered

__all__ = ["DIAMETER_PER_R95", "estimate_particle_diameter"]

DIAMETER_PER_R95 = 2.5
"""Diameter (the largest extent, with a margin) per radius holding 95 % of the signal variance."""
_CORNER = 0.48
_MIN_FRACTION, _MAX_FRACTION = 0.25, 0.96


def estimate_particle_diameter(images: torch.Tensor, apix: float, ctf: CtfParams | None = None) -> float:
    """Estimated particle diameter in Å (module docstring).

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles [y, x], centre ``B // 2``, n >= 2 (a few hundred or more
        for a stable estimate at SNR 0.1; 2,000 are plenty).
    apix: float
        Pixel size (Å).
    ctf: CtfParams | None
        Per-particle CTF of ``images`` (they are phase flipped first), or ``None``.

    Returns
    -------
    float
        Diameter in Å, within ``[0.25, 0.96] * B * apix``.
    """
    if images.ndim != 3 or images.shape[-1] != images.shape[-2] or images.shape[0] < 2:
        raise ValueError(f"images must be (n >= 2, B, B), got {tuple(images.shape)}")
    box = images.shape[-1]
    x = images.detach().to(torch.float32)
    if ctf is not None:
        if len(ctf) != x.shape[0]:
            raise ValueError(f"{len(ctf)} CTF parameter sets for {x.shape[0]} images")
        x = irfft2_centered(rfft2_centered(x) * torch.sign(ctf_rfft(ctf, box, apix, device=x.device)), box)
    power = x.square().mean(dim=0)  # (B, B): signal power + sigma^2 (+ a uniform background)
    c = torch.arange(box, device=x.device, dtype=torch.float32) - box // 2
    radius = (c[:, None] ** 2 + c[None, :] ** 2).sqrt()
    excess = power - power[radius >= _CORNER * box].mean()
    limit = int(_CORNER * box)
    rings = torch.zeros(box, device=x.device).index_add_(0, radius.round().long().clamp(max=box - 1).flatten(),
                                                         excess.flatten())[:limit]
    cumulative = rings.cumsum(0)
    total = float(cumulative[-1])
    if not total > 0:  # no measurable signal: the largest particle the box holds
        r95 = _MAX_FRACTION * box / DIAMETER_PER_R95
    else:
        r95 = float((cumulative < 0.95 * total).sum()) + 0.5
    fraction = min(_MAX_FRACTION, max(_MIN_FRACTION, DIAMETER_PER_R95 * r95 / box))
    return fraction * box * float(apix)
