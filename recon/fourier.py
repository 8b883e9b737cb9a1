"""Real <-> Fourier transforms with the project's centring convention.

Convention (docs/conventions.md, "Centring"): the real-space centre of a box of
side ``B`` is array index ``B // 2`` on every axis (RELION's). Forward transforms
move that centre to index 0 (``ifftshift``) before ``torch.fft.rfftn``, so the
phase origin is the box centre and the Fourier DC term sits at index ``[..., 0, 0]``
(un-shifted, "DC at the origin"); the last axis is the non-redundant rfft half of
length ``B // 2 + 1``. Frequencies are in cycles per pixel, vector order (x, y[, z]).
"""

from __future__ import annotations

import torch

__all__ = [
    "irfft2_centered",
    "irfft3_centered",
    "phase_shift_rfft2",
    "rfft2_centered",
    "rfft3_centered",
    "rfft_frequencies_2d",
]


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """`(..., B, B)` real images -> `(..., B, B // 2 + 1)` rfft, DC at index 0."""
    return torch.fft.rfftn(torch.fft.ifftshift(images, dim=(-2, -1)), dim=(-2, -1))


def irfft2_centered(image_rfft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered`: `(..., B, B//2+1)` -> `(..., B, B)` real."""
    images = torch.fft.irfftn(image_rfft, s=(box, box), dim=(-2, -1))
    return torch.fft.fftshift(images, dim=(-2, -1))


def rfft3_centered(volume: torch.Tensor) -> torch.Tensor:
    """`(..., B, B, B)` real [z, y, x] -> `(..., B, B, B//2+1)` rfft, DC at 0."""
    dims = (-3, -2, -1)
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=dims), dim=dims)


def irfft3_centered(volume_rfft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`rfft3_centered`: -> `(..., B, B, B)` real, centre B//2."""
    dims = (-3, -2, -1)
    volume = torch.fft.irfftn(volume_rfft, s=(box, box, box), dim=dims)
    return torch.fft.fftshift(volume, dim=dims)


def rfft_frequencies_2d(
    box: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Frequencies of every rfft pixel of a ``B x B`` image.

    Returns
    -------
    frequencies: torch.Tensor
        `(B, B // 2 + 1, 2)` (kx, ky) in cycles per pixel, laid out like the
        output of :func:`rfft2_centered` (row = ky, column = kx).
    """
    ky = torch.fft.fftfreq(box, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def phase_shift_rfft2(
    image_rfft: torch.Tensor, shifts_px: torch.Tensor, box: int
) -> torch.Tensor:
    """Translate images by a Fourier phase ramp.

    The ramp ``exp(-2 pi i (kx sx + ky sy))`` is separable, so it is built as the
    outer product of one phase per column and one per row (two small ``polar``
    calls instead of a cosine and a sine per pixel).

    Parameters
    ----------
    image_rfft: torch.Tensor
        `(..., B, B // 2 + 1)` rfft from :func:`rfft2_centered`.
    shifts_px: torch.Tensor
        `(..., 2)` shifts (sx, sy) in pixels, vector order x, y. The image content
        moves by ``+s``: the result is the rfft of ``image(r - s)``.
    box: int
        Image side ``B`` in pixels.

    Returns
    -------
    shifted: torch.Tensor
        `(..., B, B // 2 + 1)` rfft of the shifted images.
    """
    device = image_rfft.device
    s = shifts_px.to(device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, device=device, dtype=torch.float64)
    ky = torch.fft.fftfreq(box, device=device, dtype=torch.float64)
    angle_x = (-2 * torch.pi * s[..., 0:1] * kx).to(torch.float32)  # (..., B//2+1)
    angle_y = (-2 * torch.pi * s[..., 1:2] * ky).to(torch.float32)  # (..., B)
    phase_x = torch.polar(torch.ones_like(angle_x), angle_x)
    phase_y = torch.polar(torch.ones_like(angle_y), angle_y)
    return image_rfft * (phase_y[..., :, None] * phase_x[..., None, :])
