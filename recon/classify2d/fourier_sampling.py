"""Particle spectra sampled at arbitrary frequencies: the one interpolation of 2D classification.

Both the in-plane search (a polar grid of frequencies) and the class sums (the class's
rfft grid, rotated into each particle's frame) read a particle's 2D Fourier transform
off the integer grid. Images are zero-padded to twice their side before the transform,
so the spectrum is sampled every half Fourier pixel and bilinear interpolation of the
complex values is accurate for particles that fill up to half the box.

Conventions (docs/conventions.md): the real-space centre of a ``B x B`` image is pixel
``B // 2``; it is the phase origin of every transform here, as in
:func:`~cryofastar.recon.fourier.rfft2_centered`. Frequencies are in **Fourier pixels of
the unpadded box** (cycles per box, ``k / (B * apix)`` in 1/Å), vector order (x, y); at
integer frequencies the padded spectrum equals ``rfft2_centered`` of the unpadded image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PaddedSpectra", "padded_spectra", "sample_spectra"]


class PaddedSpectra:
    """Full, centred 2D spectra of zero-padded images.

    Attributes
    ----------
    planes: torch.Tensor
        `(n, 2, P, P)` float32 real and imaginary parts, ``P = 2 B``, contiguous (as
        interpolation reads them); frequency ``(fx, fy)`` (unpadded Fourier pixels) sits at
        index ``[:, :, P // 2 + 2 fy, P // 2 + 2 fx]``.
    box: int
        ``B``, the images' side in pixels.
    """

    def __init__(self, values: torch.Tensor, box: int) -> None:
        self.planes = torch.view_as_real(values).permute(0, 3, 1, 2).contiguous()
        self.box = box

    def __len__(self) -> int:
        return int(self.planes.shape[0])


def padded_spectra(images: torch.Tensor) -> PaddedSpectra:
    """Spectra of `(n, B, B)` real images [y, x], zero-padded to ``2B`` (see :class:`PaddedSpectra`)."""
    n, box, _ = images.shape
    lo = box // 2
    padded = F.pad(images.to(torch.float32), (lo, box - lo, lo, box - lo))  # centre B//2 -> P//2
    spectrum = torch.fft.fft2(torch.fft.ifftshift(padded, dim=(-2, -1)))
    return PaddedSpectra(torch.fft.fftshift(spectrum, dim=(-2, -1)), box)


def sample_spectra(spectra: PaddedSpectra, frequencies: torch.Tensor,
                   which: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear samples of the spectra at arbitrary frequencies.

    Parameters
    ----------
    spectra: PaddedSpectra
        `n` padded spectra.
    frequencies: torch.Tensor
        `(M, 2)` frequencies (fx, fy) shared by every spectrum, or `(m, M, 2)` one set per
        sampled row; unpadded Fourier pixels, ``|f| < B`` (outside the grid reads 0).
    which: torch.Tensor | None
        `(m,)` int64 spectrum of each row (default: every spectrum in order, ``m = n``,
        without copying them).

    Returns
    -------
    torch.Tensor
        `(n or m, M)` complex64 samples.
    """
    planes = spectra.planes  # (n, 2, P, P) real and imaginary parts
    n, _, size, _ = planes.shape
    half = size // 2
    if which is None:
        rows = planes
        if frequencies.ndim == 2:
            frequencies = frequencies.expand(n, -1, -1)
    else:
        rows = planes.index_select(0, which)
        if frequencies.ndim == 2:
            frequencies = frequencies.expand(which.shape[0], -1, -1)
    # grid_sample's coordinates, align_corners=True: -1 and 1 are the centres of the first and last pixels
    scale = 2.0 / (size - 1)
    grid = (half + 2.0 * frequencies.to(torch.float32)) * scale - 1.0  # (m, M, 2) as (x, y)
    out = torch.nn.functional.grid_sample(rows, grid[:, None], mode="bilinear", padding_mode="zeros",
                                          align_corners=True)  # (m, 2, 1, M)
    return torch.complex(out[:, 0, 0], out[:, 1, 0])
