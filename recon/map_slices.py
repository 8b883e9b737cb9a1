"""Central slices of a map, sampled at chosen 2D Fourier pixels only (for projection matching).

:class:`MapSlicer` holds the map's 3D Fourier transform once (2x zero-padded in real
space, centred so the box centre ``B // 2`` is the phase origin, ``fftshift``-ed so DC
is the middle voxel, cropped to the sphere a band limit needs). A central slice at a
RELION matrix ``A`` is then read at 2D frequencies ``k = (kx, ky)`` (cycles per pixel of
the particle box) as the 3D transform at ``A.T @ (kx, ky, 0)`` by trilinear
interpolation (``torch.nn.functional.grid_sample``), which by the central-slice theorem
equals ``rfft2_centered`` of the map's projection along ``A`` at ``k`` (up to a constant
factor; docs/conventions.md, "Fourier grids" use the same rule for insertion).

Only the pixels a comparison needs are interpolated, so a slice costs ``M`` samples
(``M`` ~ ``pi (k_max B)^2 / 2`` at band limit ``k_max``) instead of a full projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MapSlicer", "band_frequencies"]


def band_frequencies(box: int, k_max: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """`(M, 2)` float32 (kx, ky) in cycles/px of the half plane with ``0 < |k| <= k_max``.

    The half plane is ``kx > 0``, plus ``kx == 0, ky > 0``: every other Fourier pixel of
    a real image is the complex conjugate of one of these (Friedel), so sums over these
    pixels count each conjugate pair once. Frequencies are multiples of ``1 / box``.
    """
    if not 0 < k_max <= 0.5:
        raise ValueError(f"band limit must be in (0, 0.5] cycles/px, got {k_max}")
    r = int(math.floor(k_max * box + 1e-9))
    axis = torch.arange(-r, r + 1, dtype=torch.float32)
    ky, kx = torch.meshgrid(axis, axis, indexing="ij")
    k = torch.stack([kx.reshape(-1), ky.reshape(-1)], -1)
    keep = ((k[:, 0] > 0) | ((k[:, 0] == 0) & (k[:, 1] > 0))) & (k.norm(dim=-1) <= k_max * box + 1e-6)
    return (k[keep] / box).to(device)


class MapSlicer:
    """A map's 3D transform, ready to give central slices at chosen frequencies.

    Parameters
    ----------
    volume: torch.Tensor
        `(B, B, B)` real map [z, y, x], centre ``B // 2``.
    k_max: float
        Highest frequency that will be asked for, cycles/px of the box (at most 0.5);
        the transform is cropped to that sphere, and zero beyond it (a low-pass).
    pad: int
        Real-space zero padding factor before the transform (2: RELION's default, keeps
        trilinear interpolation errors small).
    """

    def __init__(self, volume: torch.Tensor, k_max: float = 0.5, pad: int = 2, mode: str = "bilinear") -> None:
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"volume must be a cube (B, B, B), got {tuple(volume.shape)}")
        if not 0 < k_max <= 0.5:
            raise ValueError(f"band limit must be in (0, 0.5] cycles/px, got {k_max}")
        box = volume.shape[0]
        size = pad * box
        self.box, self.k_max, self.size, self.mode = box, float(k_max), size, mode
        before = size // 2 - box // 2  # the box centre lands on the padded centre size // 2
        padded = F.pad(volume.float(), (before, size - box - before) * 3)
        spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))  # DC at [size//2]*3
        # crop to the sphere of radius k_max (in padded voxels) plus one voxel for interpolation
        self.radius = int(math.ceil(k_max * size)) + 1
        c, r = size // 2, self.radius
        lo, hi = max(0, c - r), min(size, c + r + 1)
        cube = spectrum[lo:hi, lo:hi, lo:hi]
        self.centre = float(c - lo)
        self.side = hi - lo
        freq = (torch.arange(lo, hi, device=volume.device) - c).float()
        radius = (freq[:, None, None] ** 2 + freq[None, :, None] ** 2 + freq[None, None, :] ** 2).sqrt()
        cube = cube * (radius <= k_max * size + 1.0)  # a low-pass at the band limit (one voxel of margin)
        self.grid = torch.view_as_real(cube).permute(3, 0, 1, 2).unsqueeze(0).contiguous()  # (1, 2, D, H, W)

    @property
    def device(self) -> torch.device:
        """Where the transform lives (slices are computed there)."""
        return self.grid.device

    def slices(self, rotations: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Central slices of the map at ``rotations``, read at 2D frequencies ``k``.

        Parameters
        ----------
        rotations: torch.Tensor
            `(..., 3, 3)` RELION matrices ``A`` (map frame -> particle frame).
        k: torch.Tensor
            `(M, 2)` (kx, ky) in cycles/px of the box, ``|k| <= k_max``.

        Returns
        -------
        torch.Tensor
            `(..., M)` complex64: ``rfft2_centered(projection along A)`` at ``k``, up to
            a constant factor (the same for every rotation).
        """
        batch = rotations.shape[:-2]
        a = rotations.reshape(-1, 3, 3).to(self.device, torch.float32)
        k = k.to(self.device, torch.float32)
        # (x, y, z) = A.T @ (kx, ky, 0): x_j = sum_i k_i A[i, j], in padded voxels from the centre
        xyz = torch.einsum("mi,nij->nmj", k, a[:, :2, :]) * self.size
        scale = 2.0 / (self.side - 1)  # align_corners=True: index 0 -> -1, side - 1 -> +1
        grid = (xyz + self.centre) * scale - 1.0
        out = torch.empty(a.shape[0], k.shape[0], dtype=torch.complex64, device=self.device)
        step = max(1, 4_000_000 // max(1, k.shape[0]))  # bounds grid_sample's temporaries
        for start in range(0, a.shape[0], step):
            g = grid[start : start + step]
            sampled = F.grid_sample(self.grid, g.reshape(1, 1, -1, 1, 3), mode=self.mode,
                                    padding_mode="zeros", align_corners=True)  # (1, 2, 1, n*M, 1)
            sampled = sampled.reshape(2, g.shape[0], k.shape[0])
            out[start : start + step] = torch.complex(sampled[0], sampled[1])
        return out.reshape(*batch, k.shape[0])
