"""Ab initio reconstruction of a RELION particle set: network poses, then back-projection.

Example usage::

    cryofastar-stream reconstruct session/particles.star -o recon/

Steps: choose the session reference among up to 64 candidates by confidence; pose
every particle in the reference's frame, ``--views`` images per forward pass
(:class:`cryofastar.model.session_frame.SessionFrame`); insert every particle with its
pose into two half-set Fourier volumes at the input's own box and pixel size (CTF-aware
when the STAR file has CTF columns); write ``particles.star`` (the input rows with the
predicted rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst and rlnCryofastarConfidence),
``volume.mrc``, ``volume_half1.mrc``, ``volume_half2.mrc`` and ``volume_fsc.tsv``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofastar.model.preprocess import model_pixel_size, to_model_box
from cryofastar.model.reference import select_reference
from cryofastar.model.session_frame import SessionFrame
from cryofastar.model.weights import load_model
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.device import resolve_device
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from cryofastar.recon.io import read_particles, write_fsc_table, write_volume
from cryofastar.recon.io.star import ParticleTable, write_particles

from .backproject import read_finite_images, read_reference_map

logger = logging.getLogger(__name__)

__all__ = ["CONFIDENCE_COLUMN", "ReconstructResult", "main"]

CONFIDENCE_COLUMN = "rlnCryofastarConfidence"
"""Per-particle mean network confidence (> 1, higher is surer), written to particles.star."""


@dataclass
class ReconstructResult:
    """What one run produced, with timings in seconds."""

    n_particles: int
    reference_row: int
    resolution_angstrom: float
    reference_resolution_angstrom: float | None
    pose_seconds: float
    insert_seconds: float
    total_seconds: float
    mirrored_passes: int
    anchor_disagreement_degrees: float
    outputs: list[Path] = field(default_factory=list)


def _optics_for_output(table: ParticleTable) -> pd.DataFrame:
    if table.optics is not None:
        return table.optics
    optics = {"rlnOpticsGroup": [1], "rlnImagePixelSize": [table.apix], "rlnImageSize": [table.box],
              "rlnImageDimensionality": [2]}
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if column in table.particles.columns:
            optics[column] = [float(table.particles[column].iloc[0])]
    return pd.DataFrame(optics)


def _image_names_from(table: ParticleTable, outdir: Path) -> list[str]:
    """rlnImageName of every particle with its stack path relative to ``outdir`` (so the file resolves there)."""
    relative = {stack: os.path.relpath(Path(stack).resolve(), outdir.resolve())
                for stack in np.unique(table.stack_paths)}
    return [f"{int(i):06d}@{relative[stack]}" for i, stack in zip(table.image_indices, table.stack_paths, strict=True)]


def _particles_for_output(table: ParticleTable, outdir: Path, rotations: torch.Tensor, origins_angstrom: torch.Tensor,
                          confidence: torch.Tensor) -> pd.DataFrame:
    merged = set(table.optics.columns) - {"rlnOpticsGroup"} if table.optics is not None else set()
    rows = table.particles.drop(columns=[c for c in table.particles.columns if c in merged])
    rows = rows.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in rows.columns])
    if "rlnOpticsGroup" not in rows.columns:
        rows = rows.assign(rlnOpticsGroup=1)
    rot, tilt, psi = matrix_to_euler(rotations)
    return rows.assign(rlnImageName=_image_names_from(table, outdir),
                       rlnAngleRot=rot.numpy(), rlnAngleTilt=tilt.numpy(), rlnAnglePsi=psi.numpy(),
                       rlnOriginXAngst=origins_angstrom[:, 0].numpy(), rlnOriginYAngst=origins_angstrom[:, 1].numpy(),
                       **{CONFIDENCE_COLUMN: confidence.double().numpy()})


def main(particles: Path, outdir: Path, device: str = "auto", views: int = 128, weights: Path | None = None,
         apix: float | None = None, use_ctf: bool = True, chunk: int = 2048, candidates: int = 64,
         reference: Path | None = None, progress: bool = False, seed: int = 0) -> ReconstructResult:
    """Run the offline job (see module docstring) and return its figures."""
    if views < 3:
        raise ValueError(f"--views must be at least 3, got {views}")
    start = time.perf_counter()
    dev = resolve_device(device)
    table = read_particles(particles, apix=apix)
    reference_map = read_reference_map(reference, table.box)
    model = load_model(weights, dev)
    model_box = model.config.box
    apix_model = model_pixel_size(table.box, table.apix, model_box)
    n = len(table)
    generator = torch.Generator().manual_seed(seed)
    candidate_rows = np.sort(torch.randperm(n, generator=generator)[: min(candidates, n)].numpy())
    candidate_images = to_model_box(read_finite_images(table, candidate_rows), model_box)
    best, _ = select_reference(model, candidate_images) if len(candidate_rows) >= 2 else (0, None)
    reference_row = int(candidate_rows[best])
    frame = SessionFrame(model, candidate_images[best], views=views, sets_per_pass=4 if dev.type == "cuda" else 1)
    logger.info("%d particles, box %d px at %.3f Å/px -> model box %d px at %.3f Å/px; reference %s",
                n, table.box, table.apix, model_box, apix_model, table.particles["rlnImageName"].iloc[reference_row])

    ctf = table.ctf() if use_ctf else None
    halves = table.half_sets()
    acc = HalfSetAccumulator(table.box, table.apix, device=dev)
    rotations = torch.empty(n, 3, 3, dtype=torch.float64)
    origins = torch.empty(n, 2, dtype=torch.float64)
    confidence = torch.empty(n)
    disagreement, mirrored = [], 0
    pose_s = insert_s = 0.0
    bar = _progress_bar(progress, n)
    others = np.setdiff1d(np.arange(n), [reference_row])
    try:
        for first in range(0, len(others), chunk):
            rows = others[first : first + chunk]
            images = read_finite_images(table, rows)
            t0 = time.perf_counter()
            batch = frame.pose(to_model_box(images, model_box))
            t1 = time.perf_counter()
            rotations[rows], confidence[rows] = batch.rotations, batch.confidence
            origins[rows] = batch.origins_px * apix_model
            disagreement.append(batch.anchor_disagreement_degrees)
            mirrored += int(batch.mirrored.sum())
            acc.add(images, rotations[rows], origins[rows], halves[rows],
                    None if ctf is None else ctf[torch.as_tensor(rows)])
            insert_s += time.perf_counter() - t1
            pose_s += t1 - t0
            if bar is not None:
                bar[0].update(bar[1], advance=len(rows))
        # the reference itself: identity rotation, its shift as the network sees it in a pass of its own
        ref_rows = np.array([reference_row])
        ref_images = read_finite_images(table, ref_rows)
        rotations[reference_row] = torch.eye(3, dtype=torch.float64)
        ref_pose = frame.pose(to_model_box(ref_images, model_box))
        origins[reference_row] = ref_pose.origins_px[0] * apix_model
        confidence[reference_row] = ref_pose.confidence[0]
        acc.add(ref_images, rotations[ref_rows], origins[ref_rows], halves[ref_rows],
                None if ctf is None else ctf[torch.as_tensor(ref_rows)])
    finally:
        if bar is not None:
            bar[0].stop()

    outdir.mkdir(parents=True, exist_ok=True)
    star_out = outdir / "particles.star"
    rows_out = _particles_for_output(table, outdir, rotations, origins, confidence)
    write_particles(star_out, rows_out, _optics_for_output(table))
    half1, half2 = acc.half_volumes()
    volume = acc.volume()
    outputs = [star_out, outdir / "volume.mrc", outdir / "volume_half1.mrc", outdir / "volume_half2.mrc"]
    for path, data in zip(outputs[1:], (volume, half1, half2), strict=True):
        write_volume(path, data, table.apix)
    curve = fsc(half1, half2)
    columns = {"resolution_angstrom": shell_resolutions_angstrom(table.box, table.apix), "fsc_half_maps": curve}
    reference_resolution = None
    if reference_map is not None:
        columns["fsc_vs_reference"] = fsc(volume, reference_map)
        reference_resolution = resolution_at_threshold(columns["fsc_vs_reference"], table.apix, 0.5)
    write_fsc_table(outdir / "volume_fsc.tsv", columns)
    outputs.append(outdir / "volume_fsc.tsv")
    all_disagreement = torch.cat(disagreement) if disagreement else torch.empty(0)
    finite = all_disagreement[torch.isfinite(all_disagreement)]
    return ReconstructResult(
        n_particles=n, reference_row=reference_row,
        resolution_angstrom=resolution_at_threshold(curve, table.apix, 0.143),
        reference_resolution_angstrom=reference_resolution, pose_seconds=pose_s, insert_seconds=insert_s,
        total_seconds=time.perf_counter() - start, mirrored_passes=mirrored,
        anchor_disagreement_degrees=float(finite.mean()) if len(finite) else float("nan"), outputs=outputs)


def _progress_bar(enabled: bool, total: int):  # noqa: ANN202 - rich is imported lazily
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("posing + inserting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = bar.add_task("reconstruct", total=total)
    bar.start()
    return bar, task
