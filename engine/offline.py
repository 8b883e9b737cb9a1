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

With ``nproc > 1`` (or under ``torchrun``) the job runs on several ranks
(:mod:`~cryofastar.engine.distributed`, docs/scaling.md): the same functions, each rank on its share of
the particles (whole network passes dealt round-robin), the half-set grids all-reduced before each map
and the poses gathered after each round; map-only ab initio, the class-pose confirmation and 2D
classification run on rank 0 alone and their poses are broadcast. Rank 0 writes every output.

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ab_initio import AbInitioSettings, PoseConfirmation, confirm_poses, run_ab_initio
from cryofastar.recon.backprojection import backproject
from cryofastar.recon.classify2d import particle_columns
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.device import resolve_device
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.io import ParticleFileError, ParticleSource
from cryofastar.recon.io.columns import NETWORK_COLUMNS
from cryofastar.recon.io.source import DUPLICATE, SkippedImages
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.io.tables import write_json
from cryofastar.recon.map_set import map_set, read_known_map, write_map_set
from cryofastar.recon.pose_precision import pose_precision
from cryofastar.recon.refinement import RefinementReference, RefineSettings, images_to_working_box

from cryofastar.options import argument, option

from .class_posing import CLASS_WEIGHTS_HELP, ClassPoser, ClassViews, check_class_weights
from .classification import ClassifySettings, classify_source
from .distributed import (
    Ranks,
    all_reduce_accumulator,
    allreduce_bytes,
    alone,
    broadcast,
    check_processes,
    deal,
    gather_objects,
    gather_rows,
    in_torchrun_environment,
    launch,
    units,
    worker_logging,
)
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

__all__ = ["ReconstructJob", "ReconstructResult", "ReconstructSettings", "reconstruct", "reconstruct_on_ranks"]

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
    nproc: int
        Local processes sharing the job (torch.distributed: gloo on CPUs, NCCL with one GPU each;
        docs/scaling.md); 1 under ``torchrun``, whose ``--nproc-per-node`` starts the ranks.
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
    nproc: int = option(1, help="Processes sharing the job on this machine (torch.distributed: gloo on CPUs, NCCL "
                        "with one GPU each); the map is one process's to float rounding (docs/scaling.md). Under "
                        "torchrun leave it at 1.")

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
        check_processes(self.nproc, self.device)


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
    nproc: int
        Ranks that shared the job (1: one process).
    allreduces: int
        All-reduces of the half-set grids (one per map made; 0 with one process).
    allreduce_seconds: float
        Wall time rank 0 spent in them, waiting for the slowest rank included.
    allreduce_bytes: int
        Bytes one all-reduce sums (:func:`~cryofastar.engine.distributed.allreduce_bytes`; 0 with one process).

    ``pose_seconds`` and ``insert_seconds`` are the slowest rank's.
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
    nproc: int = 1
    allreduces: int = 0
    allreduce_seconds: float = 0.0
    allreduce_bytes: int = 0


@dataclass
class _Job:
    """One run's particles, this rank's share of them, and where they are on the way (internal).

    With one process the share is every particle; the functions below are the same either way.
    """

    source: ParticleSource  # the particles with finite images (what every output holds)
    device: torch.device
    settings: ReconstructSettings
    ranks: Ranks
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # this rank's rows, ascending
    work_images: torch.Tensor | None = None  # (len(rows), W, W) float32 at the refinement's working box
    allreduces: int = 0
    allreduce_seconds: float = 0.0
    _share_source: ParticleSource | None = None
    _fit_images: torch.Tensor | None = None

    @property
    def halves(self) -> torch.Tensor:
        """`(n,)` int64 half sets (1/2) of the particles."""
        return self.source.half_sets

    @property
    def ctf(self) -> CtfParams | None:
        """The particles' CTF for back-projection (``None`` with ``--no-ctf`` or none in the file)."""
        return self.source.ctf if self.settings.use_ctf else None

    @property
    def work_box(self) -> int:
        """Side (px) of the refinement's working box."""
        return min(self.settings.refine_box, self.source.box)

    @property
    def work_apix(self) -> float:
        """Pixel size (Å) of ``work_images``."""
        return self.source.apix * self.source.box / self.work_box

    def take_share(self, rows: np.ndarray) -> None:
        """Make ``rows`` this rank's share (kept ascending) and make room for their working-box images."""
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self._share_source = None
        if self.settings.refine:
            self.work_images = torch.empty(len(self.rows), self.work_box, self.work_box)

    def at(self, rows: np.ndarray) -> torch.Tensor:
        """Positions in ``work_images`` of ``rows`` (rows of this rank's share)."""
        return torch.as_tensor(np.searchsorted(self.rows, rows))

    def reduce(self, acc: HalfSetAccumulator) -> HalfSetAccumulator:
        """``acc`` all-reduced over the ranks, in place (counted and timed; nothing with one process)."""
        if self.ranks.distributed:
            t0 = time.perf_counter()
            all_reduce_accumulator(acc, self.ranks)
            self.allreduces += 1
            self.allreduce_seconds += time.perf_counter() - t0
        return acc

    def backproject(self, rotations: torch.Tensor, origins: torch.Tensor) -> HalfSetAccumulator:
        """The map of every particle at its pose: this rank's share back-projected (images read again, ``chunk``
        at a time), then all-reduced. ``rotations`` `(n, 3, 3)`, ``origins`` `(n, 2)` Å of every particle."""
        if self._share_source is None:
            self._share_source = self.source.select(self.rows) if self.ranks.distributed else self.source
        at = torch.as_tensor(self.rows)
        return self.reduce(backproject(self._share_source, rotations[at], origins[at],
                                       None if self.ctf is None else self.ctf[at], batch=self.settings.chunk,
                                       device=self.device))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`(n, ...)` values of every particle on every rank, from `(len(rows), ...)` of this rank's share."""
        return gather_rows(self.ranks, self.rows, values)

    def images_of(self, rows: np.ndarray, root_only: bool = False) -> torch.Tensor | None:
        """`(len(rows), W, W)` working-box images of sorted ``rows`` of any rank, on every rank (or on rank 0;
        the others get ``None``). Every rank must call it."""
        if not self.ranks.distributed and len(rows) == len(self.rows):
            return self.work_images  # every row, in order: no copy
        mine = np.intersect1d(self.rows, rows)
        return gather_rows(self.ranks, mine, self.work_images[self.at(mine)], root_only=root_only)

    def fit_images(self) -> torch.Tensor:
        """Working-box images of :func:`_fit_rows` (gathered once, then kept)."""
        if self._fit_images is None:
            self._fit_images = self.images_of(_fit_rows(self))
        return self._fit_images

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


def reconstruct(particles: Path, outdir: Path, settings: ReconstructSettings, progress: Progress | None = None,
                ranks: Ranks | None = None) -> ReconstructResult | None:
    """Run the offline job (module docstring) on the STAR file ``particles``; write its outputs in ``outdir``.

    ``ranks``: this process's place in a job shared by several (:meth:`Ranks.join`); ``None``: one process
    (``settings.nproc`` is read by :func:`reconstruct_on_ranks`, which starts the ranks).
    Every rank must call it with the same arguments; rank 0 writes the outputs and returns the result, the
    others return ``None``. ``progress`` reports rank 0's share.
    """
    settings.validate()
    ranks = ranks if ranks is not None else Ranks.single(resolve_device(settings.device))
    start = time.perf_counter()
    source = ParticleSource.from_star(particles, apix=settings.apix)
    known_map = read_known_map(settings.known_map, source.box) if ranks.root else None
    source = _finite(source, ranks, settings.chunk)  # images with NaN or Inf pixels: one warning, left out of all
    table = source.table
    job = _Job(source, ranks.device, settings, ranks)
    acc = None  # map-only: no map before ab initio
    if settings.poses_from == "network":
        acc, poses = _network_poses(job, progress)
    elif settings.poses_from == "classes":
        acc, poses = _class_poses(job, progress)
    else:
        job.take_share(deal(_blocks(job), ranks.rank, ranks.world))
        poses = _read_working_images(job)
    rotations, origins = poses.rotations, poses.origins
    finished = None
    if settings.refine:
        trusted = poses.class_poses is None or bool(poses.class_poses["agree"])  # network poses: always probed
        finished = _finish_poses(job, acc, rotations, origins, probe=trusted)
        acc, rotations, origins = finished.accumulator, finished.rotations, finished.origins
    if not ranks.root:
        return None  # every output has one writer: rank 0
    extra: dict[str, np.ndarray] = dict(poses.columns)
    if settings.poses_from in ("network", "classes"):
        rot, tilt, psi = matrix_to_euler(poses.rotations)
        extra.update(zip(NETWORK_COLUMNS, (rot.numpy(), tilt.numpy(), psi.numpy(), poses.origins[:, 0].numpy().copy(),
                                           poses.origins[:, 1].numpy().copy()), strict=True))
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
        classes_posed=poses.classes_posed, class_poses=poses.class_poses, nproc=ranks.world,
        allreduces=job.allreduces, allreduce_seconds=job.allreduce_seconds,
        allreduce_bytes=allreduce_bytes(source.box) if ranks.distributed else 0)


def reconstruct_on_ranks(particles: Path, outdir: Path, settings: ReconstructSettings,
                         progress: Callable[[], Progress] | None = None) -> ReconstructResult | None:
    """:func:`reconstruct` on ``settings.nproc`` local processes, on the ranks ``torchrun`` started, or in this one.

    Parameters
    ----------
    particles, outdir, settings:
        As for :func:`reconstruct`.
    progress: Callable[[], Progress] | None
        Makes rank 0's progress callback in the process that runs rank 0 (a picklable factory, e.g. a class;
        its ``stop()`` is called at the end if it has one).

    Returns
    -------
    ReconstructResult | None
        Rank 0's result; ``None`` in the other ranks under ``torchrun``.

    Raises
    ------
    RankFailed
        A worker of ``--nproc`` raised or died (:func:`~cryofastar.engine.distributed.launch`).
    ValueError
        ``--nproc`` above 1 under ``torchrun``, or impossible settings.
    """
    settings.validate()
    if in_torchrun_environment():
        if settings.nproc != 1:
            raise ValueError(f"--nproc {settings.nproc} under torchrun: torchrun's --nproc-per-node starts the "
                             "ranks, leave --nproc at 1")
        return _rank_main(particles, outdir, settings, progress, None)
    if settings.nproc == 1:
        return _with_progress(progress, lambda bar: reconstruct(particles, outdir, settings, bar))
    results = launch(settings.nproc, _rank_main, particles, outdir, settings, progress,
                     logging.getLogger().getEffectiveLevel())
    return results[0]


def _rank_main(particles: Path, outdir: Path, settings: ReconstructSettings, progress: Callable[[], Progress] | None,
               log_level: int | None) -> ReconstructResult | None:
    """One rank: join the group, run the job, leave. ``log_level``: configure logging (a fresh worker process)."""
    worker_logging(log_level)
    ranks = Ranks.join(settings.device)
    try:
        return _with_progress(progress if ranks.root else None,
                              lambda bar: reconstruct(particles, outdir, settings, bar, ranks))
    finally:
        ranks.leave()


def _with_progress(factory: Callable[[], Progress] | None,
                   run: Callable[[Progress | None], ReconstructResult | None]) -> ReconstructResult | None:
    """``run(bar)`` with a progress callback made by ``factory`` (``None``: none), stopped afterwards."""
    bar = factory() if factory is not None else None
    try:
        return run(bar)
    finally:
        stop = getattr(bar, "stop", None)
        if stop is not None:
            stop()


def _finite(source: ParticleSource, ranks: Ranks, size: int) -> ParticleSource:
    """The source restricted to its first, usable images (:meth:`ParticleSource.finite`), the reads shared by the
    ranks: each reads whole blocks of the distinct rows (dealt round-robin), the verdicts are gathered, and every
    rank keeps the same rows; rank 0 logs the one warning line."""
    if not ranks.distributed:
        return source.finite(size)[0]
    first = source.first_rows()
    repeats = np.setdiff1d(np.arange(len(source)), first)
    unique = source.select(first) if len(repeats) else source
    block = max(1, min(size, -(-len(unique) // ranks.world)))
    kept, skipped = [np.empty(0, dtype=np.int64)], []
    for rows in units(np.arange(len(unique)), block)[ranks.rank :: ranks.world]:
        chunk = unique.images(rows)
        kept.append(first[chunk.rows])
        skipped.append(SkippedImages(first[chunk.skipped.rows], chunk.skipped.names, chunk.skipped.reasons))
    parts = gather_objects(ranks, (np.concatenate(kept), SkippedImages.concat(skipped)))
    rows = np.sort(np.concatenate([part[0] for part in parts]))
    report = SkippedImages.concat([SkippedImages(repeats, source.names[repeats], DUPLICATE),
                                   *(part[1] for part in parts)])
    if len(rows) == 0:
        raise ParticleFileError(f"{source.origin}: every image contains {report.reason}; nothing to use")
    if len(report) and ranks.root:
        logger.warning("%s", report.describe(source.origin))
    return source.select(rows) if len(report) else source


def _blocks(job: _Job) -> list[np.ndarray]:
    """The units of work without a network: consecutive blocks of ``views - 1`` rows (a network pass's size)."""
    return units(np.arange(len(job.source)), job.settings.views - 1)


def _fit_rows(job: _Job) -> np.ndarray:
    """Rows the CTF delocalisation loss is fitted on in each round: one process's first batch (``chunk`` rows)."""
    return np.arange(min(len(job.source), job.settings.chunk))


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
    Every rank takes the same branches: the verdicts are computed from every particle's poses (gathered) or
    broadcast from rank 0.
    """
    t0 = time.perf_counter()
    settings = job.settings
    search = RefineSettings(working_box=job.work_box)
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
        rotations, origins, ab_initio, done = _ab_initio(job, job.work_apix)
        ab_initio_s = time.perf_counter() - t1
        # ab initio's accumulator is the back-projection of the working-box images at their best poses
        acc = _next_map(job, "ab-initio", modes, rotations, origins, done=done)
        local_rounds = max(MIN_LOCAL_ROUNDS_AFTER_AB_INITIO, local_rounds)
    for _ in range(local_rounds):
        rotations, origins, scores, spread = _match_all(job, acc, search, rotations, origins, "local")
        acc = _next_map(job, "local", modes, rotations, origins)
    return _Finished(acc, rotations, origins, scores, spread, modes, won, time.perf_counter() - t0, ab_initio_s,
                     None if ab_initio_s == 0.0 else ab_initio,
                     None if confirmation is None else confirmation.as_dict())


def _confirm(job: _Job, rotations: torch.Tensor) -> PoseConfirmation:
    """One random ab initio start on the policy's subset of the particles, against their ``rotations``.

    Runs on rank 0 alone (the subset's images gathered there); its verdict is broadcast.
    """
    rows = confirmation_rows(len(job.halves), job.settings.seed)
    images = job.images_of(rows, root_only=True)
    confirmation = None
    if job.ranks.root:
        at = torch.as_tensor(rows)
        with alone(job.ranks):
            confirmation = confirm_poses(images, job.halves[at], job.work_apix, rotations[at], job._ctf(rows),
                                         seed=job.settings.seed + CONFIRM_SEED_OFFSET, device=job.device)
        logger.info("starting poses: %s", confirmation.summary())
    return broadcast(job.ranks, confirmation)


def _ab_initio(job: _Job, apix: float) -> tuple[torch.Tensor, torch.Tensor, dict, HalfSetAccumulator | None]:
    """Map-only ab initio, attempted again with a larger seed set when its verdict is negative (policy).

    Runs on rank 0 alone (every working-box image gathered there); its poses and record are broadcast.
    Returns the kept result's (the first that converged, else the last) `(n, 3, 3)` rotations and `(n, 2)`
    origins (Å), the record written to ``ab_initio.json`` (the kept verdict and every attempt's), and, when
    the working box is the particles' box (its map is then the next one), its accumulator on rank 0 and an
    empty one of the same layout on the others (summed by an all-reduce it is rank 0's on every rank);
    ``None`` otherwise.
    """
    images = job.images_of(np.arange(len(job.source)), root_only=True)
    payload = None
    if job.ranks.root:
        attempts: list[dict] = []
        result = None
        for attempt, settings in enumerate(ab_initio_attempts(AbInitioSettings(), len(job.source))):
            with alone(job.ranks):
                result = run_ab_initio(images, job.halves, apix, passes=AB_INITIO_PASSES, ctf=job.ctf,
                                       settings=settings, seed=job.settings.seed + 1000 * attempt, device=job.device,
                                       callback=lambda label, *_: logger.info("ab initio: %s done", label))
            attempts.append({"seed_particles": min(settings.seed_particles, len(job.source)),
                             **result.verdict.as_dict()})
            logger.info("ab initio attempt %d: %s", attempt + 1, result.verdict.summary())
            if result.verdict.converged:
                break
        assert result is not None  # ab_initio_attempts yields at least one
        record = {**result.verdict.as_dict(), "summary": result.verdict.summary(), "attempts": attempts}
        done = result.accumulator
        layout = {"box": done.box, "apix": done.apix, "oversampling": done.oversampling,
                  "interpolation": done.interpolation, "min_weight": done.min_weight}
        payload = (result.poses.rotations.clone(), result.poses.origins_angstrom.clone(), record, layout)
    rotations, origins, record, layout = broadcast(job.ranks, payload)
    if job.work_box != job.source.box:
        return rotations, origins, record, None
    return rotations, origins, record, done if job.ranks.root else HalfSetAccumulator(**layout, device=job.device)


def _match_all(job: _Job, acc: HalfSetAccumulator, search: RefineSettings, rotations: torch.Tensor,
               origins: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of projection matching of every particle against the half maps of ``acc``.

    ``rotations`` `(n, 3, 3)` float64 RELION matrices and ``origins`` `(n, 2)` float64
    rlnOriginX/YAngst (Å) to start from (not modified); ``mode`` ``"local"`` or ``"best"``
    (:meth:`RefinementReference.match`). Each rank matches its share, ``chunk`` at a time; the results
    are gathered. Returns new `(n, 3, 3)` matrices, `(n, 2)` origins (Å), `(n,)` best NCC and `(n,)`
    angular spread (degrees) of every particle, on every rank.
    """
    ref = RefinementReference(acc.half_volumes(), job.source.apix, acc.resolution_angstrom(), search, job.device)
    _fit_delocalisation(job, ref, rotations, origins)
    rows, chunk = job.rows, job.settings.chunk
    at = torch.as_tensor(rows)
    rotations, origins = rotations[at].clone(), origins[at].clone()  # this rank's share
    scores, spread = torch.empty(len(rows)), torch.empty(len(rows))
    for first in range(0, len(rows), chunk):  # vectorised within a chunk; chunks bound memory
        part = slice(first, min(len(rows), first + chunk))
        match, new_origins = ref.match(job.work_images[part], job.halves[at[part]], rotations[part], origins[part],
                                       mode, job._ctf(rows[part]))
        rotations[part], origins[part] = match.rotations, new_origins
        scores[part], spread[part] = match.scores, match.spread_degrees
    return job.gather(rotations), job.gather(origins), job.gather(scores), job.gather(spread)


def _fit_delocalisation(job: _Job, ref: RefinementReference, rotations: torch.Tensor, origins: torch.Tensor) -> None:
    """Fit ``ref``'s CTF delocalisation loss on the same particles with any number of ranks.

    :meth:`RefinementReference.match` fits it on the first batch it matches; one process's first batch is
    :func:`_fit_rows`, at their poses of the round. A reference of the same half maps with a minimal local
    search (7 candidates, one shift; nothing else differs) matches those particles, and its fitted loss is
    given to ``ref``, whose own first batch then fits nothing. Without a CTF there is nothing to fit.
    """
    if job.ctf is None:
        return
    rows = _fit_rows(job)
    at = torch.as_tensor(rows)
    trivial = replace(ref.settings, local_range_degrees=ref.settings.local_step_degrees, local_stages=1,
                      local_max_shift_px=0, mean_range_degrees=0.0)  # 7 candidates, one shift
    probe = RefinementReference(ref.half_volumes, ref.apix_work, ref.resolution_angstrom, trivial, ref.device)
    probe.match(job.fit_images(), job.halves[at], rotations[at], origins[at], "local", job._ctf(rows))
    ref.delocalisation_loss = probe.delocalisation_loss


def _next_map(job: _Job, step: str, modes: list[str], rotations: torch.Tensor, origins: torch.Tensor,
              done: HalfSetAccumulator | None = None) -> HalfSetAccumulator:
    """Record refinement step ``step`` in ``modes`` and return the full-box map of its poses (``done``, all-reduced,
    if given)."""
    modes.append(step)
    acc = job.reduce(done) if done is not None else job.backproject(rotations, origins)
    if job.ranks.root:
        logger.info("refinement step %d (%s): %.2f Å", len(modes), step, acc.resolution_angstrom())
    return acc


def _read_working_images(job: _Job) -> _Poses:
    """Read this rank's share into ``job.work_images`` (Fourier-cropped; none without refinement), ``chunk`` at a
    time; no poses yet."""
    n, m, chunk = len(job.source), len(job.rows), job.settings.chunk
    for first in range(0, m if job.work_images is not None else 0, chunk):
        rows = job.rows[first : first + chunk]
        job.work_images[first : first + len(rows)] = images_to_working_box(job.source.images(rows).all_images(),
                                                                           job.work_box)
    return _Poses(None, None, torch.zeros(n))


def _class_poses(job: _Job, progress: Progress | None) -> tuple[HalfSetAccumulator | None, _Poses]:
    """Poses of every particle through its 2D class (module docstring), inserted (not when they are untrusted and
    ab initio follows: no map, as map-only); working-box images kept.

    The 2D classification and the decoder run on rank 0 alone (it reads every image); the poses are broadcast.
    """
    source, settings = job.source, job.settings
    t0 = time.perf_counter()
    payload = None
    if job.ranks.root:
        with alone(job.ranks):
            classified = classify_source(source, ClassifySettings(classes=settings.classes,
                                                                  classify_seed=settings.seed), progress)
            classes = classified.classes
            columns = particle_columns(classified.classifier, classes)
            views = ClassViews.from_columns(classes.averages, classes.counts, classes.junk, columns)
            class_poses = ClassPoser.load(settings.class_weights, job.device).pose_particles(views)
        logger.info("%s", class_poses.summary())
        logger.info("%d particles in %d classes (%d posed by common lines) in %.1f s", len(source), settings.classes,
                    class_poses.classes_posed, time.perf_counter() - t0)
        payload = (class_poses.rotations, torch.as_tensor(views.origins_angstrom), columns["rlnClassNumber"],
                   class_poses.classes_posed, class_poses.as_dict(), class_poses.trusted)
    rotations, origins, numbers, posed, verdict, trusted = broadcast(job.ranks, payload)
    t1 = time.perf_counter()
    job.take_share(deal(_blocks(job), job.ranks.rank, job.ranks.world))
    poses = _read_working_images(job)
    poses.rotations, poses.origins, poses.pose_seconds = rotations, origins, t1 - t0
    poses.columns = {"rlnClassNumber": numbers}
    poses.classes_posed = posed
    poses.class_poses = verdict
    # untrusted class poses go to ab initio unprobed (_finish_poses): their map is needed only without refinement
    acc = job.backproject(rotations, origins) if trusted or not settings.refine else None
    poses.insert_seconds = time.perf_counter() - t1
    return acc, poses


def _pass_units(n: int, reference_row: int, views: int, anchors: int) -> list[np.ndarray]:
    """The network's forward passes over ``n`` particles, as units of rows (the session frame's passes).

    The reference's pass-mates first, in row order: the first pass holds ``views - 1`` new particles (no
    anchors yet: its most confident become them), every later one ``views - 1 - anchors``; the reference
    itself last, in a pass of its own (:mod:`~cryofastar.model.session_frame`).
    """
    others = np.setdiff1d(np.arange(n), [reference_row])
    return [*units(others, max(1, views - 1 - anchors), first=views - 1), np.array([reference_row])]


def _pose_groups(blocks: list[np.ndarray], reference_row: int, chunk: int) -> list[list[np.ndarray]]:
    """Consecutive units posed (and read) together, up to ``chunk`` rows each; the reference's pass alone."""
    groups: list[list[np.ndarray]] = []
    for block in blocks:
        if (groups and not _is_reference([block], reference_row) and not _is_reference(groups[-1], reference_row)
                and sum(len(b) for b in groups[-1]) + len(block) <= chunk):
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def _is_reference(group: list[np.ndarray], reference_row: int) -> bool:
    return len(group[0]) == 1 and group[0][0] == reference_row


def _network_poses(job: _Job, progress: Progress | None) -> tuple[HalfSetAccumulator, _Poses]:
    """Network poses of every particle in the session frame, inserted; working-box images kept.

    Rank 0 chooses the session reference (among the same candidates as one process) and poses the first pass,
    whose most confident particles become the anchors; the frame (reference and anchors) is broadcast. Every
    rank then poses its own passes (:func:`_pass_units`, dealt round-robin): each pass holds exactly the
    particles it holds in one process, so the poses are the same.
    """
    source, settings, ranks = job.source, job.settings, job.ranks
    poser = NetworkPoser.load(settings.weights, job.device, views=settings.views)
    n = len(source)
    plan = None
    if ranks.root:
        candidate_rows = random_rows(n, settings.candidates, settings.seed)
        reference_row = int(candidate_rows[poser.choose_reference(source.images(candidate_rows).all_images())])
        plan = (reference_row, poser.frame.n_anchors)
        logger.info("%d particles, box %d px at %.3f Å/px -> model box %d px; reference %s", n, source.box,
                    source.apix, poser.model_box, source.names[reference_row])
    reference_row, anchors = broadcast(ranks, plan)
    blocks = _pass_units(n, reference_row, settings.views, anchors)
    job.take_share(deal(blocks, ranks.rank, ranks.world))
    mine = blocks[ranks.rank :: ranks.world]
    acc = HalfSetAccumulator(source.box, source.apix, device=job.device)
    m = len(job.rows)
    rotations, origins = torch.empty(m, 3, 3, dtype=torch.float64), torch.empty(m, 2, dtype=torch.float64)
    confidence = torch.empty(m)
    stats = {"disagreement": [], "mirrored": 0, "pose_seconds": 0.0, "insert_seconds": 0.0}

    def pose(group: list[np.ndarray]) -> None:
        rows = np.concatenate(group)
        images = source.images(rows).all_images()
        t0 = time.perf_counter()
        batch = poser.pose(images, source.apix)
        t1 = time.perf_counter()
        if len(batch.mirrored) != len(group):
            raise RuntimeError(f"{len(group)} passes expected, the session frame made {len(batch.mirrored)}")
        at = job.at(rows)
        rotations[at], confidence[at], origins[at] = batch.rotations, batch.confidence, batch.origins_angstrom
        if _is_reference(group, reference_row):
            rotations[at] = torch.eye(3, dtype=torch.float64)
        else:
            stats["disagreement"].append(batch.anchor_disagreement_degrees)
            stats["mirrored"] += int(batch.mirrored.sum())
        if job.work_images is not None:
            job.work_images[at] = images_to_working_box(images, job.work_box)
        acc.add(images, rotations[at], origins[at], job.halves[rows], job._ctf(rows))
        stats["insert_seconds"] += time.perf_counter() - t1
        stats["pose_seconds"] += t1 - t0
        if progress is not None:
            progress(len(rows), m)

    if ranks.root:  # the first pass: no anchors yet, its most confident particles become them
        pose(mine[:1])
        mine = mine[1:]
    frame = broadcast(ranks, poser.state_dict() if ranks.root else None)
    if not ranks.root:
        poser = NetworkPoser(poser.model, settings.views, frame_state=frame)
    for group in _pose_groups(mine, reference_row, settings.chunk):
        pose(group)
    job.reduce(acc)
    every = gather_objects(ranks, stats)
    disagreement = [d for each in every for d in each["disagreement"]]
    poses = _Poses(job.gather(rotations), job.gather(origins), job.gather(confidence), reference_row=reference_row,
                   pose_seconds=max(each["pose_seconds"] for each in every),
                   insert_seconds=max(each["insert_seconds"] for each in every),
                   mirrored=sum(each["mirrored"] for each in every),
                   disagreement=torch.cat(disagreement) if disagreement else torch.empty(0))
    return acc, poses
