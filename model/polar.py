"""Particle images as central lines of their Fourier transform: the network's input.

Cryo-EM views of one molecule are related through **common lines**: by the Fourier
slice theorem any two views share one central line of the map's 3D transform. So the
network does not see pixels: it sees each image's transform resampled on ``L`` rays
from the origin (angles ``theta_l = 2 pi l / L`` from +x towards +y, a full turn), each
sampled at ``R`` radii ``r_j = (j + 1) * r_max / R`` (pixels of frequency, the DC term
excluded). An in-plane rotation of the particle is then exactly a cyclic shift of the
rays (a half-turn set of lines would wrap with a reversal), and a common line is a 1-D
match between two rays (or a ray and the opposite, conjugate, ray).

Normalisation, per image: zero mean and unit variance in real space, then every
radius is divided by the image's RMS amplitude at that radius (spectral whitening),
so low and high frequencies have equal weight whatever the CTF or B-factor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["line_angles", "line_radii", "planar_coordinates", "polar_lines"]


def line_angles(n_lines: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`(L,)` ray angles in radians, ``2 pi l / L``."""
    return torch.arange(n_lines, device=device, dtype=torch.float32) * (2 * math.pi / n_lines)


def line_radii(n_radii: int, max_radius_px: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """`(R,)` sample radii: ``1..R`` times ``max_radius_px / R``."""
    return torch.arange(1, n_radii + 1, device=device, dtype=torch.float32) * (max_radius_px / n_radii)


def planar_coordinates(n_lines: int, n_radii: int, max_radius_fraction: float,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """The planar Fourier coordinates ``X0`` of every line sample.

    Parameters
    ----------
    n_lines, n_radii: int
        ``L`` rays of ``R`` samples.
    max_radius_fraction: float
        Outermost radius as a fraction of Nyquist.
    device: torch.device | str
        Where to build the tensor.

    Returns
    -------
    x0: torch.Tensor
        `(L, R, 3)` vectors ``(kx, ky, 0)`` in units of Nyquist (|x0| <= max_radius_fraction),
        vector order (x, y, z); the view's own frame.
    """
    theta = line_angles(n_lines, device)
    s = line_radii(n_radii, max_radius_fraction, device)
    kx = s[None, :] * torch.cos(theta)[:, None]
    ky = s[None, :] * torch.sin(theta)[:, None]
    return torch.stack([kx, ky, torch.zeros_like(kx)], dim=-1)


def polar_lines(images: torch.Tensor, n_lines: int, n_radii: int, max_radius_fraction: float) -> torch.Tensor:
    """Resample images' Fourier transforms on rays (bilinear), normalised.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` real images [y, x], centre ``B // 2``, at the model box.
    n_lines, n_radii: int
        ``L`` rays over a full turn, ``R`` radii per ray.
    max_radius_fraction: float
        Outermost radius as a fraction of Nyquist (``B / 2`` frequency pixels).

    Returns
    -------
    lines: torch.Tensor
        `(n, 2, L, R)` float32: real and imaginary parts (channel 0, 1), whitened per
        radius. Phase origin at the box centre, so a shift of the particle is a phase ramp.
    """
    n, box = images.shape[0], images.shape[-1]
    x = images.float()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    x = x / x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
    planes = torch.view_as_real(spectrum).permute(0, 3, 1, 2)  # (n, 2, B, B), DC at [B//2, B//2]
    x0 = planar_coordinates(n_lines, n_radii, max_radius_fraction, images.device)[..., :2] * (box / 2)
    # grid_sample with align_corners=True maps -1..1 onto pixel indices 0..B-1.
    grid = (x0 + box // 2) * (2.0 / (box - 1)) - 1.0
    sampled = F.grid_sample(planes, grid[None].expand(n, -1, -1, -1), mode="bilinear", align_corners=True)
    power = sampled.square().sum(dim=1, keepdim=True).mean(dim=2, keepdim=True)  # (n, 1, 1, R)
    return sampled / power.sqrt().clamp_min(1e-6)
