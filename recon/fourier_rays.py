"""Images' Fourier transforms sampled on rays from the origin: the geometric decoder's input.

By the Fourier slice theorem any two views of one molecule share a central line of the
map's 3D transform (their **common line**). On rays the match is one-dimensional and an
in-plane rotation of the image is exactly a cyclic shift of its rays.

Convention (docs/conventions.md, "Fourier rays"): ``L`` rays over a full turn at angles
``theta_l = 2 pi l / L`` measured from +x towards +y of the image (x = column, y = row,
both increasing with the array index), each sampled at ``R`` radii
``r_j = (j + 1) * r_max / R`` frequency pixels, ``r_max = max_radius_fraction * B / 2``
(the DC term is excluded). Values are the image's unnormalised DFT with the phase origin
at the box centre ``B // 2`` (:mod:`cryofastar.recon.fourier`): a real image gives
``ray[l + L/2] = conj(ray[l])``, and a shift of the particle is a phase ramp along each ray.
Sampling between Fourier pixels is bilinear on the centred spectrum.

A view's ray ``l`` lies in 3D (the map's frame) along ``A.T @ (cos theta_l, sin theta_l, 0)``
for its RELION matrix ``A`` (docs/conventions.md, "Rotations").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["image_rays", "ray_angles", "ray_directions", "ray_radii"]


def ray_angles(n_rays: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(L,)` ray angles in radians, ``2 pi l / L``."""
    return torch.arange(n_rays, device=device, dtype=dtype) * (2 * math.pi / n_rays)


def ray_radii(n_radii: int, box: int, max_radius_fraction: float, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(R,)` sample radii in frequency pixels: ``(j + 1) * max_radius_fraction * (B / 2) / R``."""
    return torch.arange(1, n_radii + 1, device=device, dtype=dtype) * (max_radius_fraction * box / 2 / n_radii)


def ray_directions(n_rays: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(L, 3)` unit vectors ``(cos theta_l, sin theta_l, 0)`` of the rays in their view's frame."""
    theta = ray_angles(n_rays, device, dtype)
    return torch.stack([theta.cos(), theta.sin(), torch.zeros_like(theta)], dim=-1)


def image_rays(images: torch.Tensor, n_rays: int, n_radii: int, max_radius_fraction: float) -> torch.Tensor:
    """Sample images' centred DFTs on rays (bilinear), unnormalised.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` real images [y, x], centre ``B // 2``.
    n_rays, n_radii: int
        ``L`` rays over a full turn, ``R`` radii per ray.
    max_radius_fraction: float
        Outermost radius as a fraction of Nyquist (``B / 2`` frequency pixels), at most 1.

    Returns
    -------
    rays: torch.Tensor
        `(n, L, R)` complex64: ``sum_pixels image * exp(-2 pi i k.(x - c) / B)`` at every
        ray point ``k`` (frequency pixels), ``c`` the box centre.
    """
    if images.dim() != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (n, B, B), got {tuple(images.shape)}")
    if not 0 < max_radius_fraction <= 1:
        raise ValueError(f"max_radius_fraction must be in (0, 1], got {max_radius_fraction}")
    n, box = images.shape[0], images.shape[-1]
    spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images.float(), dim=(-2, -1))), dim=(-2, -1))
    planes = torch.view_as_real(spectrum).permute(0, 3, 1, 2)  # (n, 2, B, B), DC at [B//2, B//2]
    radii = ray_radii(n_radii, box, max_radius_fraction, images.device)
    theta = ray_angles(n_rays, images.device)
    points = torch.stack([radii[None, :] * theta.cos()[:, None], radii[None, :] * theta.sin()[:, None]], dim=-1)
    grid = (points + box // 2) * (2.0 / (box - 1)) - 1.0  # align_corners=True: -1..1 onto indices 0..B-1
    sampled = F.grid_sample(planes, grid[None].expand(n, -1, -1, -1), mode="bilinear", align_corners=True)
    return torch.complex(sampled[:, 0], sampled[:, 1])
