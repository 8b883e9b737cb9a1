"""Ab initio reconstruction of a RELION particle set: network poses or map-only ab initio, refinement, back-projection.

Example usage::

    cryofastar-stream reconstruct session/particles.star -o recon/
    cryofastar-stream reconstruct session/particles.star -o recon/ --no-refine           # network only
    cryofastar-stream reconstruct session/particles.star -o recon/ --poses-from map-only  # no network

Steps (``--poses-from network``): choose the session reference among up to 64
candidates by confidence; pose every particle in the reference's frame, ``--views``
images per forward pass (:class:`cryofastar.model.session_frame.SessionFrame`); insert
every particle with its pose into two half-set Fourier volumes at the input's own box
and pixel size (CTF-aware when the STAR file has CTF columns). Then (``--refine``, the
default) ``--refine-rounds`` rounds of projection matching against the half maps
(docs/refinement.md), each followed by a fresh back-projection at the input's box:
round 1 compares the network's poses with a global search per particle (``best``).
If the network's neighbourhood won for fewer than half of the particles (an
uninformative network), map-only ab initio (:func:`cryofastar.recon.ab_initio.run_ab_initio`)
replaces the poses before the other rounds; every later round is ``local``: each
particle around its pose, against its own half map.

With ``--poses-from map-only`` there is no network: the starting poses come from ab
initio on the particles Fourier-cropped to the refinement's working box, then
``--refine-rounds`` ``local`` rounds finish them at that box (ab initio works at an
even smaller box of its own, so its poses are good to a few degrees and about a pixel).
Ab initio is not counted among the rounds, and at least one ``local`` round always
follows it.

Writes ``particles.star`` (the input rows with the final rlnAngleRot/Tilt/Psi,
rlnOriginX/YAngst, rlnCryofastarConfidence, the network's own poses in
``rlnCryofastarNetwork*`` columns and the last round's score and angular spread),
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
from cryofastar.recon.ab_initio import run_ab_initio
from cryofastar.recon.device import resolve_device
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.fsc import fsc, resolution_at_threshold, shell_resolutions_angstrom
from cryofastar.recon.io import ParticleSource, write_fsc_table, write_volume
from cryofastar.recon.io.star import ParticleTable, write_particles
from cryofastar.recon.refinement import RefinementReference, RefineSettings, images_to_working_box
from cryofastar.recon.rotations import geodesic_degrees

from .backproject import read_reference_map

logger = logging.getLogger(__name__)

__all__ = ["CONFIDENCE_COLUMN", "NETWORK_COLUMNS", "SCORE_COLUMN", "SPREAD_COLUMN", "ReconstructResult", "main"]

CONFIDENCE_COLUMN = "rlnCryofastarConfidence"
"""Per-particle mean network confidence (> 1, higher is surer), written to particles.star."""
NETWORK_COLUMNS = ("rlnCryofastarNetworkAngleRot", "rlnCryofastarNetworkAngleTilt", "rlnCryofastarNetworkAnglePsi",
                   "rlnCryofastarNetworkOriginXAngst", "rlnCryofastarNetworkOriginYAngst")
"""The network's own pose of each particle (before refinement), in RELION's units."""
SCORE_COLUMN = "rlnCryofastarRefineScore"
SPREAD_COLUMN = "rlnCryofastarAngularSpread"
INFORMATIVE_FRACTION = 0.5
"""The network is informative when its neighbourhood wins the ``best`` probe for at least this fraction of particles."""
AB_INITIO_PASSES = 2
"""Passes over all particles after ab initio's seed stage (as bench/bench_ab_initio.py measures it)."""


@dataclass
class ReconstructResult:
    """What one run produced, with timings in seconds.

    Attributes
    ----------
    refine_seconds: float
        Wall time of everything after the network's poses: rounds, ab initio and back-projections.
    refine_modes: list[str]
        The steps of refinement in order: ``"best"``, ``"ab-initio"``, ``"local"``.
    network_won_fraction: float | None
        Fraction of particles whose ``best`` pose stayed within 1.5 local ranges of the
        network's (``None`` without a network or without refinement).
    ab_initio_seconds: float
        Wall time of ab initio (0 when it did not run).
    """

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
    refine_seconds: float = 0.0
    refine_modes: list[str] = field(default_factory=list)
    network_won_fraction: float | None = None
    ab_initio_seconds: float = 0.0


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
                          confidence: torch.Tensor, extra: dict[str, np.ndarray]) -> pd.DataFrame:
    merged = set(table.optics.columns) - {"rlnOpticsGroup"} if table.optics is not None else set()
    rows = table.particles.drop(columns=[c for c in table.particles.columns if c in merged])
    rows = rows.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in rows.columns])
    if "rlnOpticsGroup" not in rows.columns:
        rows = rows.assign(rlnOpticsGroup=1)
    rot, tilt, psi = matrix_to_euler(rotations)
    return rows.assign(rlnImageName=_image_names_from(table, outdir),
                       rlnAngleRot=rot.numpy(), rlnAngleTilt=tilt.numpy(), rlnAnglePsi=psi.numpy(),
                       rlnOriginXAngst=origins_angstrom[:, 0].numpy(), rlnOriginYAngst=origins_angstrom[:, 1].numpy(),
                       **{CONFIDENCE_COLUMN: confidence.double().numpy()}, **extra)


def main(particles: Path, outdir: Path, device: str = "auto", views: int = 128, weights: Path | None = None,
         apix: float | None = None, use_ctf: bool = True, chunk: int = 2048, candidates: int = 64,
         reference: Path | None = None, progress: bool = False, seed: int = 0, poses_from: str = "network",
         refine: bool = True, refine_rounds: int = 4, refine_box: int = 64) -> ReconstructResult:
    """Run the offline job (see module docstring) and return its figures."""
    if views < 3:
        raise ValueError(f"--views must be at least 3, got {views}")
    if poses_from not in ("network", "map-only"):
        raise ValueError(f"--poses-from must be network or map-only, got {poses_from!r}")
    if poses_from == "map-only" and not refine:
        raise ValueError("--poses-from map-only needs refinement (it is the only source of poses): drop --no-refine")
    if refine and refine_rounds < 1:
        raise ValueError(f"--refine-rounds must be at least 1, got {refine_rounds}")
    if not 16 <= refine_box <= 512:
        raise ValueError(f"--refine-box must be 16..512 px, got {refine_box}")
    start = time.perf_counter()
    dev = resolve_device(device)
    source = ParticleSource.from_star(particles, apix=apix)
    reference_map = read_reference_map(reference, source.box)
    source, _ = source.finite(chunk)  # images with NaN or Inf pixels: one warning line, left out of every output
    table = source.table
    n = len(table)
    ctf = table.ctf() if use_ctf else None
    halves = table.half_sets()
    work = min(refine_box, table.box)
    work_images = torch.empty(n, work, work) if refine else None
    acc: HalfSetAccumulator | None = None  # map-only: no map before ab initio
    if poses_from == "network":
        acc, poses = _network_poses(source, dev, views, weights, chunk, candidates, seed, ctf, halves, work_images,
                                    progress)
    else:
        poses = _read_working_images(source, chunk, work_images)
    rotations, origins, confidence = poses.rotations, poses.origins, poses.confidence
    extra: dict[str, np.ndarray] = {}
    if poses_from == "network":
        rot, tilt, psi = matrix_to_euler(rotations)
        extra = dict(zip(NETWORK_COLUMNS, (rot.numpy(), tilt.numpy(), psi.numpy(), origins[:, 0].numpy().copy(),
                                           origins[:, 1].numpy().copy()), strict=True))
    refine_s, ab_initio_s, modes, won = 0.0, 0.0, [], None
    if refine:
        t0 = time.perf_counter()
        settings = RefineSettings(working_box=work)
        local_rounds = refine_rounds
        if poses_from == "network":  # round 1: the network's neighbourhood against a global search
            matched = _match_all(acc, table.apix, settings, dev, chunk, work_images, halves, rotations, origins, "best")
            moved = geodesic_degrees(matched[0], rotations)
            won = float((moved <= 1.5 * settings.local_range_degrees).double().mean())
            rotations, origins, scores, spread = matched
            acc = _next_map("best", modes, source, dev, chunk, rotations, origins, halves, ctf)
            local_rounds -= 1
        if won is None or won < INFORMATIVE_FRACTION:  # no network, or an uninformative one
            t1 = time.perf_counter()
            work_apix = table.apix * table.box / work
            result = run_ab_initio(work_images, halves, work_apix, passes=AB_INITIO_PASSES, ctf=ctf, seed=seed,
                                   device=dev, callback=lambda label, *_: logger.info("ab initio: %s done", label))
            rotations, origins = result.poses.rotations.clone(), result.poses.origins_angstrom.clone()
            ab_initio_s = time.perf_counter() - t1
            # result.accumulator is the back-projection of the working-box images at their best poses
            acc = _next_map("ab-initio", modes, source, dev, chunk, rotations, origins, halves, ctf,
                            done=result.accumulator if work == table.box else None)
            local_rounds = max(1, local_rounds)  # ab initio's poses are capped at its own small box
        for _ in range(local_rounds):
            rotations, origins, scores, spread = _match_all(acc, table.apix, settings, dev, chunk, work_images,
                                                            halves, rotations, origins, "local")
            acc = _next_map("local", modes, source, dev, chunk, rotations, origins, halves, ctf)
        extra[SCORE_COLUMN], extra[SPREAD_COLUMN] = scores.double().numpy(), spread.double().numpy()
        refine_s = time.perf_counter() - t0

    outdir.mkdir(parents=True, exist_ok=True)
    star_out = outdir / "particles.star"
    rows_out = _particles_for_output(table, outdir, rotations, origins, confidence, extra)
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
    finite = poses.disagreement[torch.isfinite(poses.disagreement)]
    return ReconstructResult(
        n_particles=n, reference_row=poses.reference_row,
        resolution_angstrom=resolution_at_threshold(curve, table.apix, 0.143),
        reference_resolution_angstrom=reference_resolution, pose_seconds=poses.pose_seconds,
        insert_seconds=poses.insert_seconds, total_seconds=time.perf_counter() - start,
        mirrored_passes=poses.mirrored,
        anchor_disagreement_degrees=float(finite.mean()) if len(finite) else float("nan"), outputs=outputs,
        refine_seconds=refine_s, refine_modes=modes, network_won_fraction=won, ab_initio_seconds=ab_initio_s)


def _match_all(acc: HalfSetAccumulator, apix: float, settings: RefineSettings, dev: torch.device, chunk: int,
               work_images: torch.Tensor, halves: torch.Tensor, rotations: torch.Tensor, origins: torch.Tensor,
               mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of projection matching of every particle against the half maps of ``acc``.

    Parameters
    ----------
    acc: HalfSetAccumulator
        The current half maps (at the input's box, pixel size ``apix`` Å).
    apix: float
        Pixel size of the maps (Å).
    settings: RefineSettings
        Matching settings (working box ``W``).
    dev: torch.device
        Where matching runs.
    chunk: int
        Particles matched at once (bounds memory).
    work_images: torch.Tensor
        `(n, W, W)` float32 particles at the working box.
    halves: torch.Tensor
        `(n,)` half sets (1 or 2).
    rotations, origins: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices and `(n, 2)` float64 rlnOriginX/YAngst (Å) to start from
        (not modified).
    mode: str
        ``"local"`` or ``"best"`` (:meth:`RefinementReference.match`).

    Returns
    -------
    rotations, origins, scores, spread: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        New `(n, 3, 3)` matrices, `(n, 2)` origins (Å), `(n,)` best NCC and `(n,)` angular spread (degrees).
    """
    ref = RefinementReference(acc.half_volumes(), apix, acc.resolution_angstrom(), settings, dev)
    n = len(halves)
    rotations, origins = rotations.clone(), origins.clone()
    scores, spread = torch.empty(n), torch.empty(n)
    for first in range(0, n, chunk):  # vectorised within a chunk; chunks bound memory
        part = slice(first, min(n, first + chunk))
        match, new_origins = ref.match(work_images[part], halves[part], rotations[part], origins[part], mode)
        rotations[part], origins[part] = match.rotations, new_origins
        scores[part], spread[part] = match.scores, match.spread_degrees
    return rotations, origins, scores, spread


def _next_map(step: str, modes: list[str], source: ParticleSource, dev: torch.device, chunk: int,
              rotations: torch.Tensor, origins: torch.Tensor, halves: torch.Tensor, ctf,  # noqa: ANN001
              done: HalfSetAccumulator | None = None) -> HalfSetAccumulator:
    """Record refinement step ``step`` in ``modes`` and return the full-box map of its poses (``done`` if given)."""
    modes.append(step)
    acc = done if done is not None else _backproject(source, dev, chunk, rotations, origins, halves, ctf)
    logger.info("refinement step %d (%s): %.2f Å", len(modes), step, acc.resolution_angstrom())
    return acc


@dataclass
class _Poses:
    """Starting poses of every particle and how they were obtained."""

    rotations: torch.Tensor | None  # (n, 3, 3) float64; None: none yet (map-only)
    origins: torch.Tensor | None  # (n, 2) float64 Å
    confidence: torch.Tensor  # (n,) network confidence (0: none)
    reference_row: int = -1
    pose_seconds: float = 0.0
    insert_seconds: float = 0.0
    mirrored: int = 0
    disagreement: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _backproject(source: ParticleSource, dev: torch.device, chunk: int, rotations: torch.Tensor, origins: torch.Tensor,
                 halves: torch.Tensor, ctf) -> HalfSetAccumulator:  # noqa: ANN001 - CtfParams | None
    """A fresh half-set accumulator with every particle at its pose (images read again, ``chunk`` at a time)."""
    acc = HalfSetAccumulator(source.box, source.apix, device=dev)
    for first in range(0, len(source), chunk):
        rows = np.arange(first, min(len(source), first + chunk))
        acc.add(source.images(rows).all_images(), rotations[rows], origins[rows], halves[rows],
                None if ctf is None else ctf[torch.as_tensor(rows)])
    return acc


def _read_working_images(source: ParticleSource, chunk: int, work_images: torch.Tensor) -> _Poses:
    """Read every particle into ``work_images`` `(n, W, W)` (Fourier-cropped), ``chunk`` at a time; no poses yet."""
    n = len(source)
    for first in range(0, n, chunk):
        rows = np.arange(first, min(n, first + chunk))
        work_images[rows] = images_to_working_box(source.images(rows).all_images(), work_images.shape[-1])
    return _Poses(None, None, torch.zeros(n))


def _network_poses(source: ParticleSource, dev: torch.device, views: int, weights: Path | None, chunk: int,
                   candidates: int, seed: int, ctf, halves: torch.Tensor, work_images: torch.Tensor | None,  # noqa: ANN001
                   progress: bool) -> tuple[HalfSetAccumulator, _Poses]:
    """Network poses of every particle in the session frame, inserted; working-box images kept."""
    model = load_model(weights, dev)
    model_box = model.config.box
    apix_model = model_pixel_size(source.box, source.apix, model_box)
    n = len(source)
    generator = torch.Generator().manual_seed(seed)
    candidate_rows = np.sort(torch.randperm(n, generator=generator)[: min(candidates, n)].numpy())
    candidate_images = to_model_box(source.images(candidate_rows).all_images(), model_box)
    best, _ = select_reference(model, candidate_images) if len(candidate_rows) >= 2 else (0, None)
    reference_row = int(candidate_rows[best])
    frame = SessionFrame(model, candidate_images[best], views=views, sets_per_pass=4 if dev.type == "cuda" else 1)
    logger.info("%d particles, box %d px at %.3f Å/px -> model box %d px at %.3f Å/px; reference %s",
                n, source.box, source.apix, model_box, apix_model, source.names[reference_row])
    acc = HalfSetAccumulator(source.box, source.apix, device=dev)
    poses = _Poses(torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64), torch.empty(n),
                   reference_row=reference_row)
    disagreement = []
    bar = _progress_bar(progress, n)
    others = np.setdiff1d(np.arange(n), [reference_row])
    try:
        # the reference itself last: identity rotation, its shift as the network sees it in a pass of its own
        for rows in [*(others[first : first + chunk] for first in range(0, len(others), chunk)),
                     np.array([reference_row])]:
            images = source.images(rows).all_images()
            t0 = time.perf_counter()
            batch = frame.pose(to_model_box(images, model_box))
            t1 = time.perf_counter()
            poses.rotations[rows], poses.confidence[rows] = batch.rotations, batch.confidence
            poses.origins[rows] = batch.origins_px * apix_model
            if rows[0] == reference_row and len(rows) == 1:
                poses.rotations[rows] = torch.eye(3, dtype=torch.float64)
            else:
                disagreement.append(batch.anchor_disagreement_degrees)
                poses.mirrored += int(batch.mirrored.sum())
            if work_images is not None:
                work_images[rows] = images_to_working_box(images, work_images.shape[-1])
            acc.add(images, poses.rotations[rows], poses.origins[rows], halves[rows],
                    None if ctf is None else ctf[torch.as_tensor(rows)])
            poses.insert_seconds += time.perf_counter() - t1
            poses.pose_seconds += t1 - t0
            if bar is not None:
                bar[0].update(bar[1], advance=len(rows))
    finally:
        if bar is not None:
            bar[0].stop()
    poses.disagreement = torch.cat(disagreement) if disagreement else torch.empty(0)
    return acc, poses


def _progress_bar(enabled: bool, total: int):  # noqa: ANN202 - rich is imported lazily
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("posing + inserting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = bar.add_task("reconstruct", total=total)
    bar.start()
    return bar, task
