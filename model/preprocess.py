"""Bring particle images to the network's box (Fourier cropping or padding)."""

from __future__ import annotations

import torch
from torch_fourier_rescale import fourier_rescale_2d

__all__ = ["model_pixel_size", "to_model_box"]


def model_pixel_size(box: int, apix: float, model_box: int) -> float:
    """Pixel size (Å) of images of ``box`` px at ``apix`` Å once rescaled to ``model_box`` px."""
    return apix * box / model_box


def to_model_box(images: torch.Tensor, model_box: int) -> torch.Tensor:
    """`(n, B, B)` images -> `(n, b, b)` at the model box ``b`` by Fourier cropping (or padding).

    The field of view is kept, so the pixel size becomes :func:`model_pixel_size`, and
    shifts in Å are unchanged. Images already at the model box are returned as they are.
    """
    if images.shape[-1] == model_box:
        return images.float()
    rescaled, _ = fourier_rescale_2d(images.float(), target_shape=(model_box, model_box))
    return rescaled.float()
