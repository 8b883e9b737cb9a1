"""How much of a particle's CTF-delocalised signal its box still holds, as the data say.

The CTF moves the signal at spatial frequency ``k`` sideways by about
``d(k) = lambda dF |k| - Cs lambda^3 |k|^3`` Å (the gradient of its phase over ``2 pi``):
at 300 kV and 2.5 µm defocus, 41 Å at 12 Å resolution. On a micrograph the particle is
then boxed out, and what was moved beyond the box is lost; a CTF evaluated on the box's
own Fourier grid (``ctf_rfft``) still predicts it there. For a small box at high defocus
that prediction is wrong for much of the band, and matching against it scatters the poses
(panel, 1GBT at SNR 0.05: from the truth 3.4° in the lowest and 6.8° in the highest
defocus quartile; docs/ab-initio-panel.md, sixth finding).

:func:`kept_fraction` is the geometric model: a particle of radius ``r`` at the box centre,
moved by ``d(k)`` along ``k``, keeps the fraction of its extent ``[d - r, d + r]`` that
lies within the box's half-extent ``L`` along ``k``. Whether the loss happened is not
assumed: data simulated with the CTF applied on the box's own grid, as some simulators do,
lost nothing, and weighting as if they had throws signal away (1GBT: 3.6° → 4.4°). So
:func:`fit_loss` measures it: the regression of the particles' spectra on their
predicted ones, binned by the model's kept fraction, gives the amplitude the data hold
in each bin; a line ``c (1 - a (1 - kept))`` through them gives the loss ``a`` (0: nothing
lost, 1: as the model says). The effective CTF is ``ctf * (1 - a (1 - kept))``
(:func:`effective_ctf`). The predicted spectra come from the map, which averages over the
particles' defoci: what every particle lost alike is missing from the map too and does not
show (nor mislead the matching); the fit sees the loss that differs between particles,
which is what a defocus range of 0.8–2.5 µm makes large. The map itself is still
reconstructed with the plain CTF (docs/refinement.md).

Units: Å, 1/Å, kV, mm; grids in the layout of :func:`~cryofastar.recon.ctf.ctf_rfft`
(rfft, DC at index 0).
"""

from __future__ import annotations

import torch
from torch_ctf import calculate_relativistic_electron_wavelength

from .ctf import CtfParams

__all__ = ["LOSS_BINS", "RADIUS_PER_FIELD", "effective_ctf", "fit_loss", "kept_fraction"]

RADIUS_PER_FIELD = 0.35
"""Particle radius assumed by :func:`kept_fraction`, per side of the field of view (the
model is insensitive to it: radii of 25 Å and 45 Å in an 80-Å box gave the same poses)."""
LOSS_BINS = 10
"""Bins of the model's kept fraction in :func:`fit_loss`."""


def kept_fraction(params: CtfParams, box: int, apix: float, field_of_view_angstrom: float,
                  radius_angstrom: float | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """`(n, box, box // 2 + 1)` float32 fraction (0..1) of each frequency's signal the boxed particle keeps.

    Parameters
    ----------
    params: CtfParams
        `n` particles' CTF (defocus along ``k`` from U, V and the angle, RELION's convention;
        voltage; Cs).
    box, apix: int, float
        The rfft grid the fraction is evaluated on (``box`` px of ``apix`` Å; a working box
        of the same field of view, or a padded one, are both fine).
    field_of_view_angstrom: float
        Side of the particle's box as extracted (Å): ``B * apix`` of the particle images.
    radius_angstrom: float | None
        The particle's radius (Å); ``None``: ``RADIUS_PER_FIELD`` of the field of view.
    device: torch.device | str
        Where to compute.
    """
    if field_of_view_angstrom <= 0:
        raise ValueError(f"field of view must be positive, got {field_of_view_angstrom} Å")
    r = float(radius_angstrom) if radius_angstrom is not None else RADIUS_PER_FIELD * field_of_view_angstrom
    ky = torch.fft.fftfreq(box, d=float(apix), device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, d=float(apix), device=device, dtype=torch.float64)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    k = torch.sqrt(grid_x.square() + grid_y.square())
    theta = torch.atan2(grid_y, grid_x)

    def per_particle(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float64)[:, None, None]

    wavelength = calculate_relativistic_electron_wavelength(per_particle(params.voltage_kv) * 1e3) * 1e10  # Å
    u, v = per_particle(params.defocus_u_angstrom), per_particle(params.defocus_v_angstrom)
    angle = torch.deg2rad(per_particle(params.defocus_angle_degrees))
    defocus = (u + v) / 2 + (u - v) / 2 * torch.cos(2 * (theta - angle))
    cs = per_particle(params.spherical_aberration_mm) * 1e7
    moved = (wavelength * defocus * k - cs * wavelength**3 * k**3).abs()
    half_extent = (field_of_view_angstrom / 2) / torch.maximum(theta.cos().abs(), theta.sin().abs())
    return ((half_extent - (moved - r)) / (2 * r)).clamp(0, 1).float()


def fit_loss(cross: torch.Tensor, power: torch.Tensor, kept: torch.Tensor, bins: int = LOSS_BINS) -> float:
    """The share ``a`` (0..1) of the model's delocalisation loss the data show (module docstring).

    Parameters
    ----------
    cross, power, kept: torch.Tensor
        Same shape, one entry per particle and frequency: ``Re(F conj(T))`` of the
        particle's spectrum ``F`` and its predicted spectrum ``T = ctf P`` at its current
        pose, ``|T|^2``, and the model's kept fraction there.
    bins: int
        Bins of the kept fraction (equal widths over [0, 1]).

    Returns
    -------
    float
        ``a`` of the weighted line ``R_b = c (1 - a (1 - kept_b))`` through the bins'
        regression coefficients ``R_b = sum cross / sum power`` (weights: ``sum power``),
        clipped to [0, 1]; 0 when the kept fractions do not vary or ``c <= 0`` (no signal).
    """
    if not (cross.shape == power.shape == kept.shape):
        raise ValueError(f"cross, power and kept must have one shape, got {tuple(cross.shape)}, "
                         f"{tuple(power.shape)}, {tuple(kept.shape)}")
    which = (kept.reshape(-1).double() * bins).long().clamp(0, bins - 1)
    sums = torch.zeros(3, bins, dtype=torch.float64, device=cross.device)
    for row, values in enumerate((cross, power, power * kept)):
        sums[row].index_add_(0, which, values.reshape(-1).double())
    used = sums[1] > 0
    if used.sum() < 2:
        return 0.0
    weight = sums[1][used]
    ratio = sums[0][used] / weight
    x = 1 - sums[2][used] / weight  # mean lost fraction in the bin
    mean_x, mean_r = (weight * x).sum() / weight.sum(), (weight * ratio).sum() / weight.sum()
    var_x = (weight * (x - mean_x).square()).sum()
    if var_x <= 1e-12:
        return 0.0
    slope = (weight * (x - mean_x) * (ratio - mean_r)).sum() / var_x
    intercept = mean_r - slope * mean_x
    if intercept <= 0:
        return 0.0
    return float((-slope / intercept).clamp(0, 1))


def effective_ctf(ctf: torch.Tensor, kept: torch.Tensor, loss: float) -> torch.Tensor:
    """``ctf * (1 - loss (1 - kept))``: the CTF with the share ``loss`` of the modelled delocalisation loss."""
    if not 0 <= loss <= 1:
        raise ValueError(f"loss must be within [0, 1], got {loss}")
    return ctf if loss == 0 else ctf * (1 - loss * (1 - kept))
