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

from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.device import resolve_device
from cryofastar.recon.insertion import Interpolation
from cryofastar.recon.io import read_particles
from cryofastar.recon.io.finite import read_finite_images
from cryofastar.recon.map_set import map_set, read_reference_map, write_map_set

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
    maps = map_set(acc, reference_map)
    seconds = time.perf_counter() - start
    outputs = write_map_set(output, maps, half_maps=half_maps)
    counts = acc.particle_counts.tolist()
    return BackprojectResult(len(table), (counts[0], counts[1]), maps.resolution_angstrom, maps.fsc, seconds, outputs,
                             maps.reference_resolution_angstrom)
