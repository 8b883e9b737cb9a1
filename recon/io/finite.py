"""Images of a particle table with NaN/Inf pixels refused (the offline commands' reader)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import ParticleFileError
from .star import ParticleTable

__all__ = ["read_finite_images"]


def read_finite_images(table: ParticleTable, rows: np.ndarray) -> torch.Tensor:
    """`(len(rows), B, B)` images of these particle rows; a NaN or Inf pixel is a ParticleFileError naming the image."""
    images = table.images(rows)
    finite = torch.isfinite(images).all(dim=(-2, -1))
    if not bool(finite.all()):
        name = table.particles["rlnImageName"].iloc[int(rows[int((~finite).nonzero()[0])])]
        raise ParticleFileError(f"{table.star_path}: image {name} contains NaN or Inf pixels")
    return images
