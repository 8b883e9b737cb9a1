"""Reconstruct a map from the poses in a RELION particle STAR file (relion_reconstruct).

Example usage::

    cryofastar-stream backproject session/particles.star -o map.mrc --half-maps
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer

from cryofastar.options import settings_command
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.backprojection import BackprojectSettings
from cryofastar.recon.device import resolve_device
from cryofastar.recon.fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from cryofastar.recon.insertion import Interpolation
from cryofastar.recon.io import ParticleFileError, read_particles, read_volume, write_fsc_table, write_volume
from cryofastar.recon.io.star import ParticleTable

logger = logging.getLogger(__name__)


@dataclass
class BackprojectResult:
    """What one run produced."""

    n_particles: int
    half_counts: tuple[int, int]
    resolution_angstrom: float
    fsc: torch.Tensor
    seconds: float
    outputs: list[Path]
    reference_resolution_angstrom: float | None = None


def main(
    particles: Path,
    output: Path,
    half_maps: bool,
    interpolation: Interpolation,
    oversampling: int,
    batch: int,
    device: str,
    apix: float | None,
    use_ctf: bool,
    reference: Path | None = None,
) -> BackprojectResult:
    """Read, insert in batches, write the map, half maps and FSC table; returns figures."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    table = read_particles(particles, apix=apix)
    reference_map = read_reference_map(reference, table.box)
    ctf = table.ctf() if use_ctf else None
    rotations = table.rotations()
    origins = table.origins_angstrom()
    halves = table.half_sets()
    acc = HalfSetAccumulator(table.box, table.apix, oversampling=oversampling,
                             interpolation=interpolation, device=dev)
    logger.info("%d particles, box %d px, %.3f Å/px, CTF %s, %s on %s", len(table), table.box,
                table.apix, "on" if ctf is not None else "off", interpolation, dev)
    start = time.perf_counter()
    for first in range(0, len(table), batch):
        rows = np.arange(first, min(first + batch, len(table)))
        images = read_finite_images(table, rows)
        acc.add(images, rotations[rows], origins[rows], halves[rows],
                None if ctf is None else ctf[torch.as_tensor(rows)])
    half1, half2 = acc.half_volumes()
    volume = acc.volume()
    seconds = time.perf_counter() - start
    curve = fsc(half1, half2)
    resolution = resolution_at_threshold(curve, table.apix, 0.143)
    outputs = [output]
    write_volume(output, volume, table.apix)
    if half_maps:
        for k, half in ((1, half1), (2, half2)):
            path = output.with_name(f"{output.stem}_half{k}{output.suffix or '.mrc'}")
            write_volume(path, half, table.apix)
            outputs.append(path)
    columns = {"resolution_angstrom": shell_resolutions_angstrom(table.box, table.apix), "fsc_half_maps": curve}
    reference_resolution = None
    if reference_map is not None:
        columns["fsc_vs_reference"] = fsc(volume, reference_map)
        reference_resolution = resolution_at_threshold(columns["fsc_vs_reference"], table.apix, 0.5)
    fsc_path = output.with_name(f"{output.stem}_fsc.tsv")
    write_fsc_table(fsc_path, columns)
    outputs.append(fsc_path)
    counts = acc.particle_counts.tolist()
    return BackprojectResult(len(table), (counts[0], counts[1]), resolution, curve, seconds, outputs,
                             reference_resolution)


def read_finite_images(table: ParticleTable, rows: np.ndarray) -> torch.Tensor:
    """`(len(rows), B, B)` images of these particle rows; a NaN or Inf pixel is a ParticleFileError naming the image."""
    images = table.images(rows)
    finite = torch.isfinite(images).all(dim=(-2, -1))
    if not bool(finite.all()):
        name = table.particles["rlnImageName"].iloc[int(rows[int((~finite).nonzero()[0])])]
        raise ParticleFileError(f"{table.star_path}: image {name} contains NaN or Inf pixels")
    return images


def read_reference_map(reference: Path | None, box: int) -> torch.Tensor | None:
    """The ``--reference`` map, checked to have the particles' box (``None`` if not given)."""
    if reference is None:
        return None
    reference_map, _ = read_volume(reference)
    if reference_map.shape[0] != box:
        raise ValueError(f"--reference {reference} has box {reference_map.shape[0]} px, particles {box} px")
    return reference_map


@settings_command(BackprojectSettings)
def backproject(settings: BackprojectSettings) -> None:
    """Reconstruct a map from the poses in a particle STAR file; print the half-map FSC resolution.

    Writes MAP.mrc (both half sets), MAP_half1/2.mrc with --half-maps, and MAP_fsc.tsv
    (per shell: resolution in Å, half-map FSC, and the FSC against --reference if given).
    """
    s = settings
    result = main(s.particles, s.output, s.half_maps, s.interpolation, s.oversampling, s.batch,  # type: ignore[arg-type]
                  s.device, s.apix, s.use_ctf, s.reference)
    typer.echo(
        f"{result.n_particles} particles (half sets {result.half_counts[0]}/{result.half_counts[1]}) "
        f"in {result.seconds:.1f} s; half-map FSC 0.143 resolution {result.resolution_angstrom:.2f} Å"
    )
    if result.reference_resolution_angstrom is not None:
        typer.echo(f"FSC 0.5 resolution against {s.reference}: {result.reference_resolution_angstrom:.2f} Å")
    for path in result.outputs:
        typer.echo(f"wrote {path}")
