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
from cryofastar.recon.fsc import fsc, resolution_at_threshold
from cryofastar.recon.insertion import Interpolation
from cryofastar.recon.io import read_particles, write_volume

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


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


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
) -> BackprojectResult:
    """Read, insert in batches, write the map (and half maps); returns figures."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    dev = resolve_device(device)
    table = read_particles(particles, apix=apix)
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
        acc.add(table.images(rows), rotations[rows], origins[rows], halves[rows],
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
    counts = acc.particle_counts.tolist()
    return BackprojectResult(len(table), (counts[0], counts[1]), resolution, curve, seconds, outputs)
