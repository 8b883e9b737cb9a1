"""Reconstruct a map from the poses in a RELION particle STAR file (relion_reconstruct).

Example usage::

    cryofastar-stream backproject session/particles.star -o map.mrc --half-maps
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.device import resolve_device
from cryofastar.recon.fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from cryofastar.recon.insertion import Interpolation
from cryofastar.recon.io import ParticleSource, read_volume, write_fsc_table, write_volume

logger = logging.getLogger(__name__)


@dataclass
class BackprojectResult:
    """What one run produced (``skipped``: image names left out for NaN or Inf pixels)."""

    n_particles: int
    half_counts: tuple[int, int]
    resolution_angstrom: float
    fsc: torch.Tensor
    seconds: float
    outputs: list[Path]
    reference_resolution_angstrom: float | None = None
    skipped: list[str] = field(default_factory=list)


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
    """Read, insert in batches, write the map, half maps and FSC table; returns figures.

    Images with NaN or Inf pixels are left out (one warning line names them; they are
    listed in ``result.skipped``); a set with no finite image is a ParticleFileError.
    """
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    source = ParticleSource.from_star(particles, apix=apix)
    reference_map = read_reference_map(reference, source.box)
    source, skipped = source.finite(batch)
    table = source.table
    ctf = source.ctf if use_ctf else None
    rotations = table.rotations()
    origins = table.origins_angstrom()
    halves = source.half_sets
    acc = HalfSetAccumulator(table.box, table.apix, oversampling=oversampling,
                             interpolation=interpolation, device=dev)
    logger.info("%d particles, box %d px, %.3f Å/px, CTF %s, %s on %s", len(table), table.box,
                table.apix, "on" if ctf is not None else "off", interpolation, dev)
    start = time.perf_counter()
    for first in range(0, len(table), batch):
        rows = np.arange(first, min(first + batch, len(table)))
        images = source.images(rows).all_images()
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
                             reference_resolution, skipped.names.tolist())


def read_reference_map(reference: Path | None, box: int) -> torch.Tensor | None:
    """The ``--reference`` map, checked to have the particles' box (``None`` if not given)."""
    if reference is None:
        return None
    reference_map, _ = read_volume(reference)
    if reference_map.shape[0] != box:
        raise ValueError(f"--reference {reference} has box {reference_map.shape[0]} px, particles {box} px")
    return reference_map
