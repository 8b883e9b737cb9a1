"""Atoms -> band-limited 3D Coulomb-potential-like map at a given box and pixel size.

Recipe: atoms are splatted (trilinear, weight = the element's electron scattering
amplitude at zero angle) on a grid ``upsampling`` times finer than the target,
the grid's spectrum is multiplied by ``exp(-B k^2 / 4)`` — one Gaussian that
stands for the atoms' mean B-factor plus the width of the atomic form factor
(``form_factor_b`` Å^2) — and divided by the splatting kernel's transfer
(sinc^2), then the map is Fourier-cropped to the target box with
torch-fourier-rescale (anti-aliased). The map centre (voxel ``B // 2``) is the
atoms' origin; maps are in arbitrary, positive units (protein is bright).
"""

from __future__ import annotations

import torch
from torch_fourier_rescale import fourier_rescale_3d

from ..fourier import irfft3_centered, rfft3_centered
from .atoms import Atoms

__all__ = ["atoms_to_volume", "SCATTERING_AMPLITUDE"]

# Electron scattering amplitudes at zero angle (Å, from Peng et al. 1996 sums of a_i),
# rounded; anything else counts as carbon.
SCATTERING_AMPLITUDE = {"H": 0.53, "C": 2.51, "N": 2.20, "O": 1.98, "S": 5.00, "P": 5.10, "SE": 7.0}


def atoms_to_volume(
    atoms: Atoms,
    box: int,
    apix: float,
    upsampling: int = 2,
    form_factor_b: float = 15.0,
    center: bool = True,
) -> torch.Tensor:
    """Simulate the density map of ``atoms``.

    Parameters
    ----------
    atoms: Atoms
        Positions in Å (x, y, z).
    box: int
        Output box ``B`` in pixels.
    apix: float
        Output pixel size in Å.
    upsampling: int
        Oversampling of the splatting grid (anti-aliasing).
    form_factor_b: float
        B (Å^2) added to the atoms' mean B-factor for the atomic form factor.
    center: bool
        Put the atoms' mean position at the map centre.

    Returns
    -------
    volume: torch.Tensor
        `(B, B, B)` float32 [z, y, x] map, centre at ``B // 2``.
    """
    xyz = atoms.centered().xyz_angstrom if center else atoms.xyz_angstrom
    fine_box, fine_apix = box * upsampling, apix / upsampling
    weights = torch.tensor(
        [SCATTERING_AMPLITUDE.get(e, SCATTERING_AMPLITUDE["C"]) for e in atoms.elements],
        dtype=torch.float32,
    )
    position = xyz.to(torch.float32) / fine_apix + fine_box // 2  # (n, 3) voxels, x y z
    inside = ((position >= 0) & (position <= fine_box - 2)).all(-1)
    position, weights = position[inside], weights[inside]
    floor = torch.floor(position)
    frac = position - floor
    base = floor.long()
    grid = torch.zeros(fine_box**3)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (
                    (frac[:, 0] if dx else 1 - frac[:, 0])
                    * (frac[:, 1] if dy else 1 - frac[:, 1])
                    * (frac[:, 2] if dz else 1 - frac[:, 2])
                )
                flat = ((base[:, 2] + dz) * fine_box + base[:, 1] + dy) * fine_box + base[:, 0] + dx
                grid.index_add_(0, flat, weights * w)
    grid = grid.reshape(fine_box, fine_box, fine_box)

    spectrum = rfft3_centered(grid)
    kz = torch.fft.fftfreq(fine_box)
    kx = torch.fft.rfftfreq(fine_box)
    k2 = (kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx**2) / fine_apix**2  # 1/Å^2
    b_total = float(atoms.b_factors.mean()) + form_factor_b
    kernel = (torch.sinc(kz)[:, None, None] * torch.sinc(kz)[None, :, None] * torch.sinc(kx)) ** 2
    spectrum = spectrum * torch.exp(-b_total * k2 / 4) / kernel
    fine = irfft3_centered(spectrum, fine_box)
    volume, _ = fourier_rescale_3d(fine, target_shape=(box, box, box), preserve_mean=True)
    return volume.to(torch.float32).contiguous()
