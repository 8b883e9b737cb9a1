"""The offline job on a whole particle set: poses, refinement rounds, ab initio, maps.

Steps (``poses_from="network"``): choose the session reference among up to
``candidates`` particles by confidence; pose every particle in the reference's frame,
``views`` images per forward pass (:class:`~cryofastar.engine.posing.NetworkPoser`);
insert every particle with its pose into two half-set Fourier volumes at the input's
own box and pixel size (CTF-aware when the particles have CTF parameters). Then
(``refine``, the default) ``refine_rounds`` rounds of projection matching against the
half maps (docs/refinement.md), each followed by a fresh back-projection at the input's
box: round 1 compares the network's poses with a global search per particle
(``best``). If the network is not informative (:mod:`~cryofastar.engine.policy`),
map-only ab initio (:func:`~cryofastar.recon.ab_initio.run_ab_initio`) replaces the
poses before the other rounds; every later round is ``local``: each particle around
its pose, against its own half map.

With ``poses_from="classes"`` the particles are first classified in 2D (the ``classify``
job's classifier, :func:`~cryofastar.engine.classification.classify_source`); one pass of the
geometric decoder over the class averages poses the classes, and every particle takes its
class's pose composed with its own 2D angle and origin (:mod:`~cryofastar.engine.class_posing`).
From there refinement goes as with the network: round 1 is the ``best`` probe, and map-only
ab initio replaces the poses if the class poses are not informative. Class poses found
informative must also be confirmed by one random ab initio start on a subset
(:func:`~cryofastar.recon.ab_initio.confirm_poses`); map-only ab initio replaces them if it
finds another structure.

With ``poses_from="map-only"`` there is no network: the starting poses come from ab
initio on the particles Fourier-cropped to the refinement's working box, then
``refine_rounds`` ``local`` rounds finish them at that box. Ab initio is not counted
among the rounds, and at least one ``local`` round always follows it.

Outputs (:func:`reconstruct`): ``particles.star`` (the input rows with the final
rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, the network's confidence and own poses, and
the last round's score and angular spread, :mod:`~cryofastar.recon.io.columns`) and the
map set ``volume.mrc``, ``volume_half1/2.mrc``, ``volume_fsc.tsv``
(:func:`~cryofastar.recon.map_set.write_map_set`); when ab initio ran, ``ab_initio.json``
(its verdict, every attempt's, and the final poses' estimated precision,
:mod:`~cryofastar.recon.pose_precision`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ab_initio import AbInitioResult, AbInitioSettings, PoseConfirmation, confirm_poses, run_ab_initio
from cryofastar.recon.backprojection import backproject
from cryofastar.recon.classify2d import particle_columns
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.device import resolve_device
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.io import ParticleSource
from cryofastar.recon.io.columns import NETWORK_COLUMNS
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.io.tables import write_json
from cryofastar.recon.map_set import map_set, read_known_map, write_map_set
from cryofastar.recon.pose_precision import pose_precision
from cryofastar.recon.refinement import RefinementReference, RefineSettings, images_to_working_box

from cryofastar.options import argument, option

from .class_posing import CLASS_WEIGHTS_HELP, ClassPoser, ClassViews, check_class_weights
from .classification import ClassifySettings, classify_source
from .policy import (
    AB_INITIO_PASSES,
    CONFIRM_SEED_OFFSET,
    MIN_LOCAL_ROUNDS_AFTER_AB_INITIO,
    ab_initio_attempts,
    check_pose_source,
    confirmation_rows,
    is_informative,
    network_won_fraction,
    random_rows,
)
from .pose_table import PoseTable
from .posing import NetworkPoser
from .star_output import optics_for_output, particles_for_output

logger = logging.getLogger(__name__)

__all__ = ["ReconstructJob", "ReconstructResult", "ReconstructSettings", "reconstruct"]

Progress = Callable[[int, int], None]
"""Called with the particles just posed and inserted, and the total (a progress bar's ``advance`` and ``total``)."""


@dataclass
class ReconstructSettings:
    """What the offline job can be told (``cryofastar-stream reconstruct``'s options).

    Attributes
    ----------
    device: str
        ``auto``, ``cpu`` or ``cuda``.
    views: int
        Views per forward pass (reference and anchors included), >= 3.
    weights: Path | None
        Network weights (safetensors); ``None``: the shipped weights.
    apix: float | None
        Pixel size (Å) if the STAR file gives none.
    use_ctf: bool
        Use the CTF columns when present: in ab initio and refinement (each particle against its
        CTF-modulated projections) and in back-projection (Wiener weight).
    chunk: int
        Particles read, posed, matched and inserted at a time (bounds memory).
    candidates: int
        Particles scored to choose the session reference.
    known_map: Path | None
        ``--reference``: a known map (MRC, same box), e.g. a simulation's true map; the FSC-0.5
        resolution against it is also reported (no alignment).
    seed: int
        Seed of the reference candidates and of ab initio's random start.
    poses_from: str
        ``network`` (ab initio replaces the network's poses if round 1 finds it
        uninformative), ``map-only`` (no network: poses from map-only ab initio) or
        ``classes`` (2D classes posed by the geometric decoder; ab initio replaces them if
        round 1 finds them uninformative).
    classes: int
        2D classes with ``poses_from="classes"``.
    class_weights: str
        Geometric decoder for ``poses_from="classes"``: a weights file, ``shipped`` (the shipped
        decoder) or ``classical`` (normalised correlation, no parameters).
    refine: bool
        Refine poses against the half maps; ``False`` keeps the network's poses.
    refine_rounds: int
        Rounds of refinement (with a network the first is a ``best`` probe, the others
        ``local``), each followed by a fresh back-projection; ab initio comes on top.
    refine_box: int
        Working box (px) of refinement (particles and maps Fourier-cropped to it).
    """

    device: str = option("auto", help="auto, cpu or cuda.")
    views: int = option(128, help="Views per forward pass (reference and anchors included).")
    weights: Path | None = option(None, help="Network weights (safetensors); default: the shipped weights.")
    apix: float | None = option(None, help="Pixel size in Å if the STAR file gives none.")
    use_ctf: bool = option(True, flags=("--ctf/--no-ctf",), help="Use the CTF columns when present: particles are "
                           "matched against CTF-modulated projections and back-projected with a Wiener weight.")
    chunk: int = 2048
    candidates: int = 64
    known_map: Path | None = option(None, flags=("--reference",), help="Known map (MRC, same box): also report "
                                    "the FSC-0.5 resolution against it (after no alignment).")
    seed: int = option(0, help="Seed for the choice of reference candidates and for ab initio's random start.")
    poses_from: str = option("network", help="network: the CryoFastAR network's poses start refinement (ab initio "
                             "replaces them if the first round finds the network uninformative); map-only: "
                             "starting poses from map-only ab initio (no network); classes: 2D classification, "
                             "then the class averages posed by common lines (ab initio if they prove uninformative).")
    classes: int = option(50, help="2D classes with --poses-from classes.")
    class_weights: str = option("shipped", help=CLASS_WEIGHTS_HELP)
    refine: bool = option(True, flags=("--refine/--no-refine",), help="Refine poses by projection matching against "
                          "the half maps (docs/refinement.md); --no-refine keeps the network's poses.")
    refine_rounds: int = option(4, help="Rounds of refinement (with a network the first is a best-of-local-and-global "
                                "probe, the others local), each followed by a fresh back-projection; ab initio, when "
                                "it runs, comes on top.")
    refine_box: int = option(64, help="Working box in px for refinement (particles and maps Fourier-cropped to it).")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) on impossible settings."""
        if self.views < 3:
            raise ValueError(f"--views must be at least 3, got {self.views}")
        check_pose_source(self.poses_from, self.refine, self.refine_box)
        if self.refine and self.refine_rounds < 1:
            raise ValueError(f"--refine-rounds must be at least 1, got {self.refine_rounds}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {self.chunk}")
        if self.classes < 2:
            raise ValueError(f"--classes must be at least 2, got {self.classes}")
        check_class_weights(self.class_weights)


@dataclass
class ReconstructJob:
    """What to reconstruct and where (``cryofastar-stream reconstruct``'s argument and output options).

    Attributes
    ----------
    particles: Path
        RELION 3.1 (or 3.0) particle STAR file; poses in it are ignored.
    out: Path
        Output directory (created): particles.star and the map set.
    progress: bool
        Show a progress bar while posing.
    """

    particles: Path = argument(help="RELION 3.1 (or 3.0) particle STAR file; poses in it are ignored.")
    out: Path = option(flags=("-o", "--out"), help="Output directory: particles.star, volume.mrc, "
                       "volume_half1/2.mrc, volume_fsc.tsv.")
    progress: bool = option(True, flags=("--progress/--no-progress",), help="Show a progress bar.")


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
        Fraction of particles whose ``best`` pose stayed in the network's neighbourhood
        (``None`` without a network or without refinement).
    ab_initio_seconds: float
        Wall time of ab initio (0 when it did not run).
    confirmation: dict | None
        When the ``best`` probe found class poses informative: whether one random ab
        initio start agrees with them (:meth:`~cryofastar.recon.ab_initio.PoseConfirmation.as_dict`);
        map-only ab initio replaced them when it did not.
    classes_posed: int
        With ``poses_from="classes"``: the classes the decoder posed (0 otherwise).
    class_poses: dict | None
        With ``poses_from="classes"``: their verdict (:meth:`~cryofastar.engine.class_posing.ClassPoses.as_dict`:
        whether two decoder starts agree); class poses not trusted go straight to ab initio, unprobed.
    ab_initio: dict | None
        When ab initio ran: its verdict (``AbInitioVerdict.as_dict``, the last attempt's),
        ``attempts`` (each attempt's verdict) and ``pose_precision``; also written to
        ``ab_initio.json``.
    pose_precision: dict | None
        After refinement: how precisely the final poses are known, estimated from the last
        round's posterior spreads (:func:`~cryofastar.recon.pose_precision.pose_precision`).
    """

    n_particles: int
    reference_row: int
    resolution_angstrom: float
    known_map_resolution_angstrom: float | None
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
    ab_initio: dict | None = None
    pose_precision: dict | None = None
    confirmation: dict | None = None
    classes_posed: int = 0
    class_poses: dict | None = None


@dataclass
class _Job:
    """One run's particles and where they are on the way (internal)."""

    source: ParticleSource  # the particles with finite images (what every output holds)
    device: torch.device
    settings: ReconstructSettings
    work_images: torch.Tensor | None  # (n, W, W) float32 at the refinement's working box

    @property
    def halves(self) -> torch.Tensor:
        """`(n,)` int64 half sets (1/2) of the particles."""
        return self.source.half_sets

    @property
    def ctf(self) -> CtfParams | None:
        """The particles' CTF for back-projection (``None`` with ``--no-ctf`` or none in the file)."""
        return self.source.ctf if self.settings.use_ctf else None

    @property
    def work_apix(self) -> float:
        """Pixel size (Å) of ``work_images``."""
        return self.source.apix * self.source.box / self.work_images.shape[-1]

    def backproject(self, rotations: torch.Tensor, origins: torch.Tensor) -> HalfSetAccumulator:
        """A fresh half-set accumulator with every particle at its pose (images read again, ``chunk`` at a time)."""
        return backproject(self.source, rotations, origins, self.ctf, batch=self.settings.chunk, device=self.device)

    def _ctf(self, rows: np.ndarray) -> CtfParams | None:
        return None if self.ctf is None else self.ctf[torch.as_tensor(rows)]


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
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # extra output columns (2D classes)
    classes_posed: int = 0
    class_poses: dict | None = None  # the class poses' verdict (ClassPoses.as_dict)


def reconstruct(particles: Path, outdir: Path, settings: ReconstructSettings,
                progress: Progress | None = None) -> ReconstructResult:
    """Run the offline job (module docstring) on the STAR file ``particles``; write its outputs in ``outdir``."""
    settings.validate()
    start = time.perf_counter()
    source = ParticleSource.from_star(particles, apix=settings.apix)
    known_map = read_known_map(settings.known_map, source.box)
    source, _ = source.finite(settings.chunk)  # images with NaN or Inf pixels: one warning, left out of every output
    table = source.table
    work = min(settings.refine_box, source.box)
    job = _Job(source, resolve_device(settings.device), settings,
               torch.empty(len(source), work, work) if settings.refine else None)
    acc = None  # map-only: no map before ab initio
    if settings.poses_from == "network":
        acc, poses = _network_poses(job, progress)
    elif settings.poses_from == "classes":
        acc, poses = _class_poses(job, progress)
    else:
        poses = _read_working_images(job)
    extra: dict[str, np.ndarray] = dict(poses.columns)
    if settings.poses_from in ("network", "classes"):
        rot, tilt, psi = matrix_to_euler(poses.rotations)
        extra.update(zip(NETWORK_COLUMNS, (rot.numpy(), tilt.numpy(), psi.numpy(), poses.origins[:, 0].numpy().copy(),
                                           poses.origins[:, 1].numpy().copy()), strict=True))
    rotations, origins = poses.rotations, poses.origins
    finished = None
    if settings.refine:
        trusted = poses.class_poses is None or bool(poses.class_poses["agree"])  # network poses: always probed
        finished = _finish_poses(job, acc, rotations, origins, probe=trusted)
        acc, rotations, origins = finished.accumulator, finished.rotations, finished.origins
    record = PoseTable()  # the final poses, in the engine's one pose table (as the daemon keeps them)
    record.append(source.stacks, source.indices, rotations, origins, poses.confidence, source.half_sets, job.ctf,
                  None if finished is None else finished.scores, None if finished is None else finished.spread,
                  0 if finished is None else len(finished.modes))
    outdir.mkdir(parents=True, exist_ok=True)
    star_out = outdir / "particles.star"
    rows = particles_for_output(table, record.image_names(outdir), record.pose_columns(settings.refine), extra)
    write_particles(star_out, rows, optics_for_output(table))
    precision = None if finished is None else pose_precision(finished.spread)
    if precision is not None:
        logger.info("%s", precision.summary())
    if finished is not None and finished.ab_initio is not None:
        finished.ab_initio["pose_precision"] = None if precision is None else precision.as_dict()
    maps = map_set(acc, known_map)
    outputs = [star_out, *write_map_set(outdir / "volume.mrc", maps)]
    if finished is not None and finished.ab_initio is not None:
        outputs.append(write_json(outdir / "ab_initio.json", finished.ab_initio))
    finite = poses.disagreement[torch.isfinite(poses.disagreement)]
    return ReconstructResult(
        n_particles=len(table), reference_row=poses.reference_row, resolution_angstrom=maps.resolution_angstrom,
        known_map_resolution_angstrom=maps.known_map_resolution_angstrom, pose_seconds=poses.pose_seconds,
        insert_seconds=poses.insert_seconds, total_seconds=time.perf_counter() - start, mirrored_passes=poses.mirrored,
        anchor_disagreement_degrees=float(finite.mean()) if len(finite) else float("nan"), outputs=outputs,
        refine_seconds=0.0 if finished is None else finished.seconds,
        refine_modes=[] if finished is None else finished.modes,
        network_won_fraction=None if finished is None else finished.won,
        ab_initio_seconds=0.0 if finished is None else finished.ab_initio_seconds,
        ab_initio=None if finished is None else finished.ab_initio,
        pose_precision=None if precision is None else {**precision.as_dict(), "summary": precision.summary()},
        confirmation=None if finished is None else finished.confirmation,
        classes_posed=poses.classes_posed, class_poses=poses.class_poses)


@dataclass
class _Finished:
    """Poses after refinement and the map they make (internal)."""

    accumulator: HalfSetAccumulator
    rotations: torch.Tensor
    origins: torch.Tensor
    scores: torch.Tensor
    spread: torch.Tensor
    modes: list[str]
    won: float | None
    seconds: float
    ab_initio_seconds: float
    ab_initio: dict | None
    confirmation: dict | None  # PoseConfirmation.as_dict of informative class poses


def _finish_poses(job: _Job, acc: HalfSetAccumulator | None, rotations: torch.Tensor | None,
                  origins: torch.Tensor | None, probe: bool = True) -> _Finished:
    """Refinement rounds against the half maps, with ab initio when the network is not informative (module doc).

    ``probe=False``: starting poses not trusted (class poses whose two starts disagree) go to ab initio unprobed.
    """
    t0 = time.perf_counter()
    source, settings = job.source, job.settings
    search = RefineSettings(working_box=job.work_images.shape[-1])
    modes: list[str] = []
    won, ab_initio_s, local_rounds = None, 0.0, settings.refine_rounds
    confirmation = None
    if settings.poses_from in ("network", "classes") and probe:  # round 1: their neighbourhood against global
        matched = _match_all(job, acc, search, rotations, origins, "best")
        won = network_won_fraction(matched[0], rotations, search.local_range_degrees)
        rotations, origins, scores, spread = matched
        acc = _next_map(job, "best", modes, rotations, origins)
        local_rounds -= 1
        if settings.poses_from == "classes" and is_informative(won):  # one random ab initio start must find the
            confirmation = _confirm(job, rotations)  # same structure (policy)
    if won is None or not is_informative(won) or (confirmation is not None and not confirmation.agree):
        t1 = time.perf_counter()
        work = job.work_images.shape[-1]
        result, ab_initio = _ab_initio(job, job.work_apix)
        rotations, origins = result.poses.rotations.clone(), result.poses.origins_angstrom.clone()
        ab_initio_s = time.perf_counter() - t1
        # result.accumulator is the back-projection of the working-box images at their best poses
        acc = _next_map(job, "ab-initio", modes, rotations, origins,
                        done=result.accumulator if work == source.box else None)
        local_rounds = max(MIN_LOCAL_ROUNDS_AFTER_AB_INITIO, local_rounds)
    for _ in range(local_rounds):
        rotations, origins, scores, spread = _match_all(job, acc, search, rotations, origins, "local")
        acc = _next_map(job, "local", modes, rotations, origins)
    return _Finished(acc, rotations, origins, scores, spread, modes, won, time.perf_counter() - t0, ab_initio_s,
                     None if ab_initio_s == 0.0 else ab_initio,
                     None if confirmation is None else confirmation.as_dict())


def _confirm(job: _Job, rotations: torch.Tensor) -> PoseConfirmation:
    """One random ab initio start on the policy's subset of the particles, against their ``rotations``."""
    rows = confirmation_rows(len(job.halves), job.settings.seed)
    at = torch.as_tensor(rows)
    confirmation = confirm_poses(job.work_images[at], job.halves[at], job.work_apix, rotations[at], job._ctf(rows),
                                 seed=job.settings.seed + CONFIRM_SEED_OFFSET, device=job.device)
    logger.info("starting poses: %s", confirmation.summary())
    return confirmation


def _ab_initio(job: _Job, apix: float) -> tuple[AbInitioResult, dict]:
    """Map-only ab initio, attempted again with a larger seed set when its verdict is negative (policy).

    Returns the result kept (the first that converged, else the last) and the record written
    to ``ab_initio.json``: the kept verdict and every attempt's.
    """
    attempts: list[dict] = []
    result = None
    for attempt, settings in enumerate(ab_initio_attempts(AbInitioSettings(), len(job.source))):
        result = run_ab_initio(job.work_images, job.halves, apix, passes=AB_INITIO_PASSES, ctf=job.ctf,
                               settings=settings, seed=job.settings.seed + 1000 * attempt, device=job.device,
                               callback=lambda label, *_: logger.info("ab initio: %s done", label))
        attempts.append({"seed_particles": min(settings.seed_particles, len(job.source)),
                         **result.verdict.as_dict()})
        logger.info("ab initio attempt %d: %s", attempt + 1, result.verdict.summary())
        if result.verdict.converged:
            break
    assert result is not None  # ab_initio_attempts yields at least one
    return result, {**result.verdict.as_dict(), "summary": result.verdict.summary(), "attempts": attempts}


def _match_all(job: _Job, acc: HalfSetAccumulator, search: RefineSettings, rotations: torch.Tensor,
               origins: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of projection matching of every particle against the half maps of ``acc``.

    ``rotations`` `(n, 3, 3)` float64 RELION matrices and ``origins`` `(n, 2)` float64
    rlnOriginX/YAngst (Å) to start from (not modified); ``mode`` ``"local"`` or ``"best"``
    (:meth:`RefinementReference.match`). Returns new `(n, 3, 3)` matrices, `(n, 2)`
    origins (Å), `(n,)` best NCC and `(n,)` angular spread (degrees).
    """
    ref = RefinementReference(acc.half_volumes(), job.source.apix, acc.resolution_angstrom(), search, job.device)
    n, chunk = len(job.halves), job.settings.chunk
    rotations, origins = rotations.clone(), origins.clone()
    scores, spread = torch.empty(n), torch.empty(n)
    for first in range(0, n, chunk):  # vectorised within a chunk; chunks bound memory
        part = slice(first, min(n, first + chunk))
        ctf = None if job.ctf is None else job.ctf[torch.arange(part.start, part.stop)]
        match, new_origins = ref.match(job.work_images[part], job.halves[part], rotations[part], origins[part], mode,
                                       ctf)
        rotations[part], origins[part] = match.rotations, new_origins
        scores[part], spread[part] = match.scores, match.spread_degrees
    return rotations, origins, scores, spread


def _next_map(job: _Job, step: str, modes: list[str], rotations: torch.Tensor, origins: torch.Tensor,
              done: HalfSetAccumulator | None = None) -> HalfSetAccumulator:
    """Record refinement step ``step`` in ``modes`` and return the full-box map of its poses (``done`` if given)."""
    modes.append(step)
    acc = done if done is not None else job.backproject(rotations, origins)
    logger.info("refinement step %d (%s): %.2f Å", len(modes), step, acc.resolution_angstrom())
    return acc


def _read_working_images(job: _Job) -> _Poses:
    """Read every particle into ``job.work_images`` (Fourier-cropped; none without refinement), ``chunk`` at a
    time; no poses yet."""
    n, chunk = len(job.source), job.settings.chunk
    for first in range(0, n if job.work_images is not None else 0, chunk):
        rows = np.arange(first, min(n, first + chunk))
        job.work_images[rows] = images_to_working_box(job.source.images(rows).all_images(), job.work_images.shape[-1])
    return _Poses(None, None, torch.zeros(n))


def _class_poses(job: _Job, progress: Progress | None) -> tuple[HalfSetAccumulator | None, _Poses]:
    """Poses of every particle through its 2D class (module docstring), inserted (not when they are untrusted and
    ab initio follows: no map, as map-only); working-box images kept."""
    source, settings = job.source, job.settings
    t0 = time.perf_counter()
    classified = classify_source(source, ClassifySettings(classes=settings.classes, classify_seed=settings.seed),
                                 progress)
    classes = classified.classes
    columns = particle_columns(classified.classifier, classes)
    views = ClassViews.from_columns(classes.averages, classes.counts, classes.junk, columns)
    class_poses = ClassPoser.load(settings.class_weights, job.device).pose_particles(views)
    rotations, posed = class_poses.rotations, class_poses.classes_posed
    origins = torch.as_tensor(views.origins_angstrom)
    logger.info("%s", class_poses.summary())
    t1 = time.perf_counter()
    logger.info("%d particles in %d classes (%d posed by common lines) in %.1f s", len(source), settings.classes,
                posed, t1 - t0)
    poses = _read_working_images(job)
    poses.rotations, poses.origins, poses.pose_seconds = rotations, origins, t1 - t0
    poses.columns = {"rlnClassNumber": columns["rlnClassNumber"]}
    poses.classes_posed = posed
    poses.class_poses = class_poses.as_dict()
    # untrusted class poses go to ab initio unprobed (_finish_poses): their map is needed only without refinement
    acc = job.backproject(rotations, origins) if class_poses.trusted or not settings.refine else None
    poses.insert_seconds = time.perf_counter() - t1
    return acc, poses


def _network_poses(job: _Job, progress: Progress | None) -> tuple[HalfSetAccumulator, _Poses]:
    """Network poses of every particle in the session frame, inserted; working-box images kept."""
    source, settings = job.source, job.settings
    poser = NetworkPoser.load(settings.weights, job.device, views=settings.views)
    n = len(source)
    candidate_rows = random_rows(n, settings.candidates, settings.seed)
    reference_row = int(candidate_rows[poser.choose_reference(source.images(candidate_rows).all_images())])
    logger.info("%d particles, box %d px at %.3f Å/px -> model box %d px; reference %s", n, source.box, source.apix,
                poser.model_box, source.names[reference_row])
    acc = HalfSetAccumulator(source.box, source.apix, device=job.device)
    poses = _Poses(torch.empty(n, 3, 3, dtype=torch.float64), torch.empty(n, 2, dtype=torch.float64), torch.empty(n),
                   reference_row=reference_row)
    disagreement = []
    others = np.setdiff1d(np.arange(n), [reference_row])
    # the reference itself last: identity rotation, its shift as the network sees it in a pass of its own
    for rows in [*(others[first : first + settings.chunk] for first in range(0, len(others), settings.chunk)),
                 np.array([reference_row])]:
        images = source.images(rows).all_images()
        t0 = time.perf_counter()
        batch = poser.pose(images, source.apix)
        t1 = time.perf_counter()
        poses.rotations[rows], poses.confidence[rows], poses.origins[rows] = (batch.rotations, batch.confidence,
                                                                              batch.origins_angstrom)
        if rows[0] == reference_row and len(rows) == 1:
            poses.rotations[rows] = torch.eye(3, dtype=torch.float64)
        else:
            disagreement.append(batch.anchor_disagreement_degrees)
            poses.mirrored += int(batch.mirrored.sum())
        if job.work_images is not None:
            job.work_images[rows] = images_to_working_box(images, job.work_images.shape[-1])
        acc.add(images, poses.rotations[rows], poses.origins[rows], job.halves[rows], job._ctf(rows))
        poses.insert_seconds += time.perf_counter() - t1
        poses.pose_seconds += t1 - t0
        if progress is not None:
            progress(len(rows), n)
    poses.disagreement = torch.cat(disagreement) if disagreement else torch.empty(0)
    return acc, poses


