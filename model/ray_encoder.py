"""Ray encoder: each Fourier ray of a view -> a feature vector, with in-plane rotation kept exact.

Input: a view's Fourier rays (:mod:`cryofastar.recon.fourier_rays`), ``L`` rays x ``R`` radii,
divided by the noise level ``sigma * B`` (a white-noise image of std ``sigma`` has Fourier
samples of std ``sigma * B``), so 1 means "as large as the noise" at every radius whatever
the image's scale; not whitened per radius (whitening hurts under noise).

Per ray the channels are the real part, imaginary part and amplitude at each radius,
compressed by ``asinh`` (linear near the noise level, logarithmic far above it). Only
circular 1-D convolutions along the ray angle follow, with weights shared over angles, so
an in-plane rotation by ``k`` rays (a cyclic shift of the input rays) shifts the output
features by exactly ``k`` rays. The radii are channels: each ray is described by its
whole profile and by its neighbours' within the kernel span.

The :class:`ClassicalRayEncoder` has no parameters: each ray's real and imaginary profile,
normalised to unit length, so the dot product of two rays' features is their normalised
complex correlation (the classical common-line score). Both encoders return features whose
dot products are the ray-pair scores of :mod:`cryofastar.model.ray_pairs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassicalRayEncoder", "RayEncoder", "ray_channels"]


def ray_channels(rays: torch.Tensor, noise_scale: torch.Tensor | float) -> torch.Tensor:
    """`(n, L, R)` complex rays -> `(n, 3 R, L)` real channels (Re, Im, amplitude), noise-scaled, asinh.

    Parameters
    ----------
    rays: torch.Tensor
        `(n, L, R)` complex Fourier rays.
    noise_scale: torch.Tensor | float
        `(n,)` or scalar: the standard deviation of one Fourier sample's noise
        (``sigma * B`` for real-space noise of std ``sigma`` in a box of ``B``).
    """
    scale = torch.as_tensor(noise_scale, dtype=rays.real.dtype, device=rays.device).reshape(-1, 1, 1)
    x = rays / scale.clamp_min(1e-12)
    channels = torch.cat([x.real, x.imag, x.abs()], dim=-1)  # (n, L, 3R)
    return torch.asinh(channels).transpose(1, 2)


class _CircularBlock(nn.Module):
    """Residual block: circular conv along the angle, GELU, circular conv; pre-norm over channels."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.conv1 = nn.Conv1d(width, width, kernel, padding=kernel // 2, padding_mode="circular")
        self.conv2 = nn.Conv1d(width, width, kernel, padding=kernel // 2, padding_mode="circular")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.gelu(self.conv1(self.norm(x))))


class RayEncoder(nn.Module):
    """Learned ray features: circular convolutions along the angle.

    Parameters
    ----------
    n_radii: int
        ``R`` radii per ray.
    width: int
        Channels of the hidden layers.
    depth: int
        Residual blocks.
    kernel: int
        Odd kernel size along the angle, in rays.
    features: int
        ``D`` output features per ray.
    """

    def __init__(self, n_radii: int, width: int = 96, depth: int = 3, kernel: int = 5, features: int = 48):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {kernel}")
        self.n_radii = n_radii
        self.stem = nn.Conv1d(3 * n_radii, width, 1)
        self.blocks = nn.ModuleList(_CircularBlock(width, kernel) for _ in range(depth))
        self.head = nn.Conv1d(width, features, 1)

    def forward(self, rays: torch.Tensor, noise_scale: torch.Tensor | float) -> torch.Tensor:
        """`(n, L, R)` complex rays -> `(n, L, D)` features (cyclic-shift equivariant in ``L``)."""
        if rays.shape[-1] != self.n_radii:
            raise ValueError(f"rays have {rays.shape[-1]} radii, the encoder {self.n_radii}")
        x = self.stem(ray_channels(rays, noise_scale))
        for block in self.blocks:
            x = block(x)
        return self.head(x).transpose(1, 2)


class ClassicalRayEncoder(nn.Module):
    """No parameters: each ray's (Re, Im) profile over radii, unit length (normalised correlation)."""

    def forward(self, rays: torch.Tensor, noise_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """`(n, L, R)` complex rays -> `(n, L, 2 R)` unit features."""
        features = torch.cat([rays.real, rays.imag], dim=-1)
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
