"""A map from the poses in a particle STAR file (``cryofastar-stream backproject``, relion_reconstruct).

:class:`BackprojectSettings` holds what can be set, each field's default and help text
once; :func:`backproject_particles` reads the particles, inserts them in batches at their
poses (CTF-aware when the file has CTF columns) and writes the map set
(:func:`~cryofastar.recon.map_set.write_map_set`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryofastar.options import argument, option

from .accumulator import HalfSetAccumulator
from .ctf import CtfParams
from .device import resolve_device
from .io import ParticleSource
from .map_set import map_set, read_known_map, write_map_set

logger = logging.getLogger(__name__)

__all__ = ["INTERPOLATIONS", "BackprojectResult", "BackprojectSettings", "backproject", "backproject_particles"]

INTERPOLATIONS = ("trilinear", "nearest")
"""Insertion kernels (:mod:`cryofastar.recon.insertion`)."""


@dataclass
class BackprojectSettings:
    """A map from the poses in a particle STAR file.

    Attributes
    ----------
    particles: Path
        RELION 3.1 (or 3.0) particle STAR file with poses.
    output: Path
        Output map; half maps and the FSC table are written beside it.
    half_maps: bool
        Also write ``MAP_half1.mrc`` and ``MAP_half2.mrc``.
    interpolation: str
        ``trilinear`` or ``nearest`` insertion.
    oversampling: int
        Fourier grid oversampling (RELION padding factor).
    batch: int
        Particles inserted per step.
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    apix: float | None
        Pixel size (Å) if the STAR file gives none.
    use_ctf: bool
        Use the CTF columns when present.
    known_map: Path | None
        ``--reference``: a known map (same box) to report the FSC-0.5 resolution against.

    Raises
    ------
    ValueError
        An unknown ``interpolation``.
    """

    particles: Path = argument(help="RELION 3.1 (or 3.0) particle STAR file with poses.")
    output: Path = option(flags=("-o", "--output"), help="Output map (.mrc).")
    half_maps: bool = option(False, flags=("--half-maps",), help="Also write MAP_half1.mrc and MAP_half2.mrc.")
    interpolation: str = option("trilinear",
                                help="Insertion kernel: trilinear (accurate) or nearest (~8x faster).")
    oversampling: int = option(2, help="Fourier grid oversampling (RELION padding factor).")
    batch: int = option(256, help="Particles inserted per step.")
    device: str = option("auto", help="auto, cpu or cuda.")
    apix: float | None = option(None, help="Pixel size in Å if the STAR file gives none.")
    use_ctf: bool = option(True, flags=("--ctf/--no-ctf",),
                           help="Use the CTF columns when present (Wiener-style insertion).")
    known_map: Path | None = option(None, flags=("--reference",), help="Known map (MRC, same box): also report "
                                    "the FSC-0.5 resolution against it.")

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be trilinear or nearest, got {self.interpolation!r}")
        if self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")


@dataclass
class BackprojectResult:
    """What one run produced (``skipped``: image names left out for NaN or Inf pixels)."""

    n_particles: int
    half_counts: tuple[int, int]
    resolution_angstrom: float
    fsc: torch.Tensor
    seconds: float
    outputs: list[Path]
    known_map_resolution_angstrom: float | None = None
    skipped: list[str] = field(default_factory=list)


def backproject_particles(settings: BackprojectSettings) -> BackprojectResult:
    """Read, insert in batches, write the map set (module docstring); return the figures.

    Images with NaN or Inf pixels are left out (one warning line names them; they are
    listed in ``result.skipped``); a set with no finite image is a ParticleFileError.
    """
    s = settings
    dev = resolve_device(s.device)
    source = ParticleSource.from_star(s.particles, apix=s.apix)
    known_map = read_known_map(s.known_map, source.box)
    source, skipped = source.finite(s.batch)
    table = source.table
    ctf = source.ctf if s.use_ctf else None
    logger.info("%d particles, box %d px, %.3f Å/px, CTF %s, %s on %s", len(table), table.box,
                table.apix, "on" if ctf is not None else "off", s.interpolation, dev)
    start = time.perf_counter()
    acc = backproject(source, table.rotations(), table.origins_angstrom(), ctf, batch=s.batch, device=dev,
                      interpolation=s.interpolation, oversampling=s.oversampling)
    maps = map_set(acc, known_map)
    seconds = time.perf_counter() - start
    outputs = write_map_set(s.output, maps, half_maps=s.half_maps)
    counts = acc.particle_counts.tolist()
    return BackprojectResult(len(table), (counts[0], counts[1]), maps.resolution_angstrom, maps.fsc, seconds, outputs,
                             maps.known_map_resolution_angstrom, skipped.names.tolist())


def backproject(source: ParticleSource, rotations: torch.Tensor, origins_angstrom: torch.Tensor,
                ctf: CtfParams | None = None, batch: int = 2048, device: torch.device | str = "cpu",
                interpolation: str = "trilinear", oversampling: int = 2) -> HalfSetAccumulator:
    """Every particle of ``source`` inserted at its pose into a fresh half-set accumulator, ``batch`` at a time.

    Parameters
    ----------
    source: ParticleSource
        The particles (every image must read and be finite: :meth:`ParticleSource.finite`
        first; a left-out image is a ParticleFileError). Their half sets are the source's.
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices ``A``, one per particle of ``source``.
    origins_angstrom: torch.Tensor
        `(n, 2)` rlnOriginX/YAngst (Å).
    ctf: CtfParams | None
        Per-particle CTF (Wiener-style insertion), or ``None``.
    batch: int
        Particles read and inserted at a time (bounds memory).
    device: torch.device | str
        Where the grids live.
    interpolation, oversampling: str, int
        Insertion kernel and Fourier grid oversampling (:class:`HalfSetAccumulator`).

    Returns
    -------
    HalfSetAccumulator
        At the source's box and pixel size.
    """
    acc = HalfSetAccumulator(source.box, source.apix, oversampling=oversampling,
                             interpolation=interpolation, device=device)  # type: ignore[arg-type]
    for first in range(0, len(source), batch):
        rows = np.arange(first, min(first + batch, len(source)))
        acc.add(source.images(rows).all_images(), rotations[rows], origins_angstrom[rows], source.half_sets[rows],
                None if ctf is None else ctf[torch.as_tensor(rows)])
    return acc
