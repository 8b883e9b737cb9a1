"""Noisy particle images of a map at known, RELION-convention poses.

Rotations are SO(3)-uniform (uniform random unit quaternions); projections are
central slices of the map's 3D transform (torch-fourier-slice, 2x padded), so the
particle at RELION matrix ``A`` is the projection along z of the map sampled at
``A.T @ (x, y, z)``. Each projection is then displaced by ``d`` pixels (uniform
in ``[-max_shift_px, max_shift_px]`` per axis) and its origin recorded as
``rlnOriginX/YAngst = -d * apix`` (the shift that re-centres it). Optional CTF
(RELION formula, defocus uniform in a range, random astigmatism) multiplies the
spectrum of a field of view twice the box, from which the particle is then boxed
out, as on a micrograph. Gaussian noise is added at the requested SNR, defined as
``SNR = mean over particles of var(clean image) / sigma_noise^2`` with the
variance taken over the whole box (docs/conventions.md, "SNR").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch_fourier_slice import project_3d_to_2d

from ..ctf import CtfParams, ctf_rfft
from ..euler import matrix_to_euler
from ..fourier import irfft2_centered, phase_shift_rfft2, rfft2_centered
from ..rotations import random_rotations

__all__ = ["CtfRange", "SimulatedParticles", "random_rotations", "simulate_particles"]


@dataclass(frozen=True)
class CtfRange:
    """Distribution of simulated CTF parameters (RELION units)."""

    defocus_min_angstrom: float = 8000.0
    defocus_max_angstrom: float = 25000.0
    max_astigmatism_angstrom: float = 500.0
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.1

    def sample(self, n: int, generator: torch.Generator) -> CtfParams:
        """`n` random parameter sets."""
        u = torch.rand(3, n, generator=generator, dtype=torch.float64)
        defocus_u = self.defocus_min_angstrom + u[0] * (self.defocus_max_angstrom - self.defocus_min_angstrom)
        return CtfParams.from_arrays(
            defocus_u_angstrom=defocus_u,
            defocus_v_angstrom=defocus_u - u[1] * self.max_astigmatism_angstrom,
            defocus_angle_degrees=u[2] * 180.0,
            voltage_kv=self.voltage_kv,
            spherical_aberration_mm=self.spherical_aberration_mm,
            amplitude_contrast=self.amplitude_contrast,
            phase_shift_degrees=0.0,
        )


@dataclass
class SimulatedParticles:
    """Images and the true poses that made them.

    Attributes
    ----------
    images: torch.Tensor
        `(n, B, B)` float32 particle images [y, x].
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices.
    angles_degrees: torch.Tensor
        `(n, 3)` rlnAngleRot, rlnAngleTilt, rlnAnglePsi.
    origins_angstrom: torch.Tensor
        `(n, 2)` rlnOriginXAngst, rlnOriginYAngst.
    ctf: CtfParams | None
        CTF parameters, if a CTF was applied.
    noise_sigma: float
        Standard deviation of the added noise (0 without noise).
    """

    images: torch.Tensor
    rotations: torch.Tensor
    angles_degrees: torch.Tensor
    origins_angstrom: torch.Tensor
    ctf: CtfParams | None
    noise_sigma: float

    @classmethod
    def drawn(cls, images: torch.Tensor, rotations: torch.Tensor, displacement_px: torch.Tensor, apix: float,
              ctf: CtfParams | None, noise_sigma: float) -> SimulatedParticles:
        """The record of images drawn at RELION matrices ``rotations``, displaced by `(n, 2)` ``displacement_px``
        (x, y): Euler angles from the matrices, origins ``-displacement * apix`` (the shift that re-centres)."""
        rot, tilt, psi = matrix_to_euler(rotations)
        return cls(images=images.to(torch.float32), rotations=rotations,
                   angles_degrees=torch.stack([rot, tilt, psi], -1), origins_angstrom=-displacement_px * apix,
                   ctf=ctf, noise_sigma=float(noise_sigma))


def simulate_particles(
    volume: torch.Tensor,
    n: int,
    apix: float,
    snr: float | None,
    generator: torch.Generator,
    max_shift_px: float = 4.0,
    ctf: CtfRange | None = None,
    noise_sigma: float | None = None,
    rotations: torch.Tensor | None = None,
) -> SimulatedParticles:
    """Simulate ``n`` particles of ``volume``.

    Parameters
    ----------
    volume: torch.Tensor
        `(B, B, B)` map [z, y, x], centre ``B // 2``.
    n: int
        Number of particles.
    apix: float
        Pixel size in Å.
    snr: float | None
        Signal-to-noise ratio (see module docstring); ``None`` for noise-free.
    generator: torch.Generator
        Source of randomness (seed it for reproducible sets).
    max_shift_px: float
        Largest displacement per axis, pixels.
    ctf: CtfRange | None
        CTF distribution; ``None`` for no CTF.
    noise_sigma: float | None
        Use this noise level instead of deriving it from ``snr`` (lets a session
        written in chunks keep one noise level).
    rotations: torch.Tensor | None
        `(n, 3, 3)` RELION matrices to use instead of SO(3)-uniform ones (e.g. the
        restricted pose distributions of a training curriculum).
    """
    box = volume.shape[-1]
    if rotations is None:
        rotations = random_rotations(n, generator)
    elif rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations must be ({n}, 3, 3), got {tuple(rotations.shape)}")
    rotations = rotations.to(torch.float64)
    projections = project_3d_to_2d(volume.to(torch.float32), rotations.transpose(-1, -2).float(), pad_factor=2.0)
    displacement = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * max_shift_px
    params = None
    if ctf is None:
        clean = irfft2_centered(phase_shift_rfft2(rfft2_centered(projections), displacement, box), box)
    else:
        # As on a micrograph: the CTF acts on a field of view twice the box, then
        # the particle is boxed out (signal delocalised beyond the box is lost).
        params = ctf.sample(n, generator)
        big, lo = 2 * box, box // 2
        padded = F.pad(projections, (lo, big - box - lo, lo, big - box - lo))
        spectrum = phase_shift_rfft2(rfft2_centered(padded), displacement, big) * ctf_rfft(params, big, apix)
        clean = irfft2_centered(spectrum, big)[:, lo : lo + box, lo : lo + box]
    sigma = 0.0
    if noise_sigma is not None:
        sigma = float(noise_sigma)
    elif snr is not None and math.isfinite(snr):
        if snr <= 0:
            raise ValueError(f"SNR must be positive, got {snr}")
        sigma = math.sqrt(float(clean.var(dim=(-2, -1)).mean()) / snr)
    images = clean + sigma * torch.randn(clean.shape, generator=generator)
    return SimulatedParticles.drawn(images, rotations, displacement, apix, params, sigma)
