"""One cell of bench/compare_peers.py: running a tool timed, the cell's truth, and the one scoring of every
pose set (ours, the peers', the true-pose ceiling and the random-pose floor)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from cryofastar.model.evaluation import apply_alignment_to_rotations, pose_errors
from cryofastar.recon import HalfSetAccumulator, fsc, resolution_at_threshold
from cryofastar.recon.io import ParticleSource, ParticleTable, read_particles, read_volume
from cryofastar.recon.map_alignment import translate_onto
from cryofastar.recon.rotations import random_rotations


def timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` to completion with its output in ``log``; wall seconds. A failure stops the run."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t0



# ---------------------------------------------------------------------------- truth and scoring
@dataclass
class Truth:
    """One simulated cell: its particles in memory and the true answer."""

    table: ParticleTable
    images: torch.Tensor  # (n, B, B) float32
    rotations: torch.Tensor  # (n, 3, 3) float64 RELION matrices A
    shifts_px: torch.Tensor  # (n, 2) float64 (rlnOriginX, rlnOriginY) in px
    halves: torch.Tensor  # (n,) 1 or 2
    true_map: torch.Tensor  # (B, B, B)
    apix: float

    @classmethod
    def load(cls, sim: Path) -> Truth:
        table = read_particles(sim / "particles.star")
        true_map, _ = read_volume(sim / "reference.mrc")
        images = ParticleSource.from_star(table.star_path, table=table).images().all_images()
        return cls(table, images, table.rotations().double(),
                   table.origins_angstrom().double() / table.apix, table.half_sets(), true_map, table.apix)


def score(truth: Truth, rotations: torch.Tensor, shifts_px: torch.Tensor | None, with_map: bool = True) -> dict:
    """Pose errors after one global alignment (incl. hand) and the FSC of the aligned map vs the truth.

    The alignment is the map's gauge: a rotation, the hand and a translation (shift errors
    are measured after removing the fitted map translation, ``map_translation_px``, since
    an ab-initio map may sit off-centre; the FSC is likewise measured after centring).
    ``rotations`` `(n, 3, 3)` RELION matrices, ``shifts_px`` `(n, 2)` rlnOrigin in px, both in
    the row order of ``truth``. Resolutions in Å (``inf`` where the FSC never rises above it).
    """
    errors = pose_errors(rotations, truth.rotations, shifts_px, None if shifts_px is None else truth.shifts_px,
                         fit_translation=True)
    out = {"frobenius_mean": errors.frobenius_mean, "geodesic_median_deg": errors.geodesic_median_degrees,
           "geodesic_mean_deg": errors.geodesic_mean_degrees, "mirrored": errors.alignment.mirrored,
           "translation_median_px": errors.translation_median_px,
           "translation_mean_px": errors.translation_mean_px,
           "map_translation_px": None if errors.map_translation_px is None else errors.map_translation_px.tolist()}
    if with_map:
        aligned = apply_alignment_to_rotations(rotations, errors.alignment)
        origins = torch.zeros(len(truth.table), 2, dtype=torch.float64) if shifts_px is None else shifts_px
        out.update(map_resolution(truth, aligned, origins * truth.apix))
    return out


def map_resolution(truth: Truth, rotations: torch.Tensor, origins_angstrom: torch.Tensor) -> dict:
    acc = HalfSetAccumulator(truth.true_map.shape[0], truth.apix)
    acc.add(truth.images, rotations, origins_angstrom, truth.halves)
    volume = translate_onto(acc.volume(), truth.true_map)
    curve = fsc(volume, truth.true_map)
    return {"fsc05_angstrom": resolution_at_threshold(curve, truth.apix, 0.5),
            "fsc0143_angstrom": resolution_at_threshold(curve, truth.apix, 0.143)}


def ceiling_and_floor(truth: Truth) -> dict:
    """The true poses (ceiling) and SO(3)-uniform random poses with zero shifts (floor), scored."""
    n = len(truth.table)
    t = time.perf_counter()
    ceiling = score(truth, truth.rotations, truth.shifts_px)
    generator = torch.Generator().manual_seed(7)
    floor = score(truth, random_rotations(n, generator).double(), torch.zeros(n, 2, dtype=torch.float64))
    return {"true_poses": {"wall_s": time.perf_counter() - t, **ceiling}, "random_poses": {"wall_s": 0.0, **floor}}

