"""How the ranks of one live session meet (``watch --nproc``; docs/scaling.md "Live: watch --nproc").

Rank 0 runs the whole daemon (:class:`~cryofastar.daemon.pipeline.Daemon`): the journal, the
checkpoints, the map files, ZeroMQ, ``/metrics``, the 2D lane and all refinement. Every other
rank (:class:`~cryofastar.daemon.rank_worker.RankWorker`) reads, poses and inserts its own
share of the particles (:func:`~cryofastar.engine.distributed.owners`) into grids of its own
that hold only what it inserted since the last sync. Rank 0's accumulator thread leads a
sync every :data:`SYNC_SECONDS` (the map it publishes then holds every rank's particles), and
a last one when it stops. The collectives, in the same order on every rank:

1. **broadcast** from rank 0: a :class:`Command` (``start`` once, then ``sync`` or ``stop``):
   its refinement policy for first poses, its reference map when it changed, its network
   frame and the session's box and pixel size once known; ``start`` also carries the
   journal (a restarted session's particles are not read again);
2. **gather** to rank 0: each other rank's :class:`Handover`: the rows it inserted since the
   last sync (locations, poses, scores, CTF, fingerprints), its counts and rejections, and
   how many particles it still holds; then an all-reduce of two numbers, the particles inserted
   and the particles classified that were handed over, so every rank knows what step 3 holds;
3. **reduce** of the 2D class sums, when any rank aligned particles against rank 0's classes
   (below), into scratch sums of rank 0's; then of the grids into rank 0's, when any handover
   holds particles (:func:`~cryofastar.engine.distributed.reduce_accumulator`); the others then
   zero theirs.

**2D classes** (the 2D lane, ``--classify``): once rank 0's classes have started, each command
carries their newest :class:`~cryofastar.recon.classify2d.ClassReferences`; every other rank
then aligns the particles it reads against them with a follower classifier
(:mod:`~cryofastar.recon.classify2d.class_delta`) and hands over the rows
(:class:`~cryofastar.daemon.classification_lane.ClassifiedRows`) with the sums reduced in
step 3. Rank 0's 2D lane takes them
(:meth:`~cryofastar.daemon.classification_lane.ClassificationLane.offer_classified`) and keeps
every operation that moves particles already held: re-alignment, centring, re-seeding, the
noise model. Each rank routes its particles to 2D as it reads them, as rank 0's reader does
(the 2D lane never waits for the map): particles it does not classify itself (no classes yet,
its queue full, stopping, its classifier failed) go to the lane by location, which reads and
classifies them itself.

Rank 0 records the handed-over rows exactly as its own (journal, pose table, ZeroMQ poses):
its grids, journal and pose table agree after every sync, and between syncs (its own
particles only), so a checkpoint written at any time is consistent. A rank that dies loses
only the particles it had not handed over; they are not in the journal, so the next start
reads them again. A collective that fails raises :class:`RanksLost` (rank 0 then stops;
``torn``: the failure came during the reduce, rank 0's grids are not trusted and the last
checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from cryofastar.engine.distributed import Ranks, broadcast, reduce_accumulator, reduce_tensors
from cryofastar.engine.rank_posing import ReferenceSource
from cryofastar.engine.streaming_refiner import RankPolicy
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.classify2d import ClassReferences
from cryofastar.recon.classify2d.class_sums import ClassSums
from cryofastar.recon.ctf import CtfParams

from .classification_lane import ClassifiedRows, Located
from .ingest import SessionGeometry

logger = logging.getLogger(__name__)

__all__ = ["SYNC_SECONDS", "Command", "Handover", "InsertedChunk", "RanksLost", "announce",
           "hand_over", "lead", "receive"]

SYNC_SECONDS = 2.0
"""Rank 0 leads a sync at most this often (s): the other ranks' particles reach the map this late at most, plus
the sync itself (box 128: a reduce of 198 MiB, about 0.15 s over gloo on one machine)."""


class RanksLost(RuntimeError):
    """A collective between the ranks failed (a rank died or stopped answering).

    Attributes
    ----------
    torn: bool
        The failure came while the other ranks' grids were being added to rank 0's (its map is not trusted).
    """

    def __init__(self, message: str, torn: bool = False) -> None:
        super().__init__(message)
        self.torn = torn


@dataclass
class Command:
    """What rank 0 tells the other ranks at a sync (collective 1).

    Attributes
    ----------
    op: str
        ``start`` (once, before anything is read), ``sync`` or ``stop`` (the last sync: the others hand over
        what they inserted, then end).
    policy: RankPolicy
        How to give passes their first poses (:mod:`~cryofastar.engine.rank_posing`).
    reference: ReferenceSource | None
        Rank 0's reference map, sent when its version differs from the last one sent.
    frame: dict | None
        The network's session frame (``NetworkPoser.state_dict``), sent once it exists until sent.
    geometry: SessionGeometry | None
        The session's box and pixel size (``None`` until rank 0 planned a file with particles).
    journal: dict | None
        ``start``: the particles already in the map (``IngestJournal.state_dict``).
    classes: ClassReferences | None
        Rank 0's 2D classes, sent when their version differs from the last one sent (module docstring).
    classify: bool
        Whether rank 0 runs a 2D lane that takes particles (``False``: none, or it failed; the others then
        classify nothing).
    """

    op: str
    policy: RankPolicy = field(default_factory=RankPolicy)
    reference: ReferenceSource | None = None
    frame: dict | None = None
    geometry: SessionGeometry | None = None
    journal: dict | None = None
    classes: ClassReferences | None = None
    classify: bool = False


@dataclass
class InsertedChunk:
    """Particles of one chunk a rank inserted into its grids: what rank 0 records of them.

    ``stacks`` `(n,)` str resolved paths, ``indices`` `(n,)` 1-based, ``half_sets`` `(n,)` 1/2, ``rotations``
    `(n, 3, 3)` RELION matrices, ``origins`` `(n, 2)` Å, ``confidence`` `(n,)`, ``ctf`` (or ``None``),
    ``optics``, ``scores``/``spread`` `(n,)` (``None``: not refined), ``version`` (0: unrefined, ``COARSE``),
    ``fingerprints`` `(n,)` (:func:`~cryofastar.daemon.fingerprints.image_fingerprints`), ``origin``: the
    file (str) they came from.
    """

    stacks: np.ndarray
    indices: np.ndarray
    half_sets: torch.Tensor
    rotations: torch.Tensor
    origins: torch.Tensor
    confidence: torch.Tensor
    ctf: CtfParams | None
    optics: dict[str, float]
    scores: torch.Tensor | None
    spread: torch.Tensor | None
    version: int
    fingerprints: np.ndarray
    origin: str

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class Handover:
    """What a rank hands rank 0 at a sync (collective 2): everything since its previous handover.

    Attributes
    ----------
    chunks: list[InsertedChunk]
        The particles it inserted into the grids it is about to add to rank 0's.
    counts: dict[str, int]
        Counters of the status message it adds to (``particles_ingested``, ``particles_posed``,
        ``particles_rejected``, ``particles_refined``).
    rejections: list[tuple[str, str]]
        ``(file, reason)`` of images it left out (rank 0 writes ``rejected.tsv``).
    waiting: int
        Particles it holds and has not inserted yet (files seen, read, being posed).
    classified: ClassifiedRows | None
        The particles it aligned against rank 0's 2D classes (their sums: the reduce).
    to_classify: list[Located]
        Particles it read and does not classify itself (rank 0's classes not there yet, its queue full, stopping,
        its classifier failed): rank 0's lane reads them.
    """

    chunks: list[InsertedChunk] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    waiting: int = 0
    classified: ClassifiedRows | None = None
    to_classify: list[Located] = field(default_factory=list)

    @property
    def particles(self) -> int:
        """Particles inserted since the previous handover."""
        return sum(len(chunk) for chunk in self.chunks)

    def count(self, name: str, n: int) -> None:
        """Add ``n`` to counter ``name``."""
        self.counts[name] = self.counts.get(name, 0) + n


# ---------------------------------------------------------------------- rank 0
def announce(ranks: Ranks, command: Command) -> None:
    """Rank 0's ``start``: collective 1 alone (the others' :class:`~cryofastar.daemon.rank_worker.RankWorker` waits
    for it before it reads anything).

    Raises
    ------
    RanksLost
        Another rank is gone.
    """
    with _answering():
        broadcast(ranks, command)


def lead(ranks: Ranks, command: Command, accumulator: HalfSetAccumulator | None,
         class_sums: ClassSums | None = None) -> list[Handover]:
    """Rank 0's side of one sync: send ``command``, collect the others' handovers, add their grids to
    ``accumulator`` (rank 0's, in place) and their 2D class sums to ``class_sums`` (zeros of the shape of the
    classes last sent: afterwards the sum of the handovers' ``classified`` rows). Returns the handovers of
    ranks ``1..world-1``.

    Raises
    ------
    RanksLost
        A collective failed (``torn`` when it was the reduce into ``accumulator``).
    """
    with _answering():
        broadcast(ranks, command)
        parts: list[Handover] = [Handover()] * ranks.world
        dist.gather_object(Handover(), parts, dst=0)
        particles, classified = _totals(ranks, Handover())
    if classified:  # into scratch sums: a failure here leaves rank 0 as it was
        if class_sums is None:  # a bug, not a lost rank: raised as it is
            raise RuntimeError("other ranks handed over 2D classes before rank 0 sent any")
        with _answering():
            reduce_tensors(class_sums.tensors(), ranks)
    if particles:
        if accumulator is None:  # (the others read nothing before rank 0 sent the geometry, which makes its grids)
            raise RuntimeError("other ranks handed over particles before rank 0 had grids")
        with _answering(torn=True):
            reduce_accumulator(accumulator, ranks)
    return parts[1:]


def _totals(ranks: Ranks, handover: Handover) -> tuple[int, int]:
    """Particles inserted and particles classified handed over at this sync by all ranks together (every rank
    learns whether the grids and the class sums meet)."""
    rows = 0 if handover.classified is None else len(handover.classified)
    total = torch.tensor([handover.particles, rows], dtype=torch.int64, device=ranks.device)  # NCCL: on the GPU
    dist.all_reduce(total)
    return int(total[0]), int(total[1])


@contextlib.contextmanager
def _answering(torn: bool = False) -> Iterator[None]:
    """Collectives inside: whatever they raise (gloo and NCCL raise RuntimeError subclasses of their own) becomes
    :class:`RanksLost` (``torn``: they were adding to rank 0's grids)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanksLost(f"another rank stopped answering ({type(exc).__name__}: {first})", torn=torn) from exc


# ---------------------------------------------------------------------- the other ranks
def receive(ranks: Ranks) -> Command:
    """Another rank's side of collective 1: rank 0's next command (blocks until rank 0 sends it).

    Raises
    ------
    RanksLost
        Rank 0 is gone.
    """
    with _answering():
        return broadcast(ranks, None)


def hand_over(ranks: Ranks, handover: Handover, accumulator: HalfSetAccumulator | None,
              class_sums: ClassSums | None = None) -> None:
    """Another rank's side of collectives 2 and 3: send ``handover``, add ``class_sums`` (its follower
    classifier's, holding what ``handover.classified`` adds) to rank 0's when any rank classified particles, and
    ``accumulator`` to rank 0's grids when any rank has particles; then zero both (they then hold nothing not yet
    handed over). The caller holds its insertion and classification locks throughout, so the handover, the grids
    and the sums hold the same particles.

    Raises
    ------
    RanksLost
        Rank 0 is gone.
    """
    with _answering():
        dist.gather_object(handover, None, dst=0)
        particles, classified = _totals(ranks, handover)
    if classified:
        if class_sums is None:
            raise RuntimeError("2D classes handed over by another rank before this one had any")
        with _answering():
            reduce_tensors(class_sums.tensors(), ranks)
        for tensor in class_sums.tensors():
            tensor.zero_()
    if particles == 0:
        return
    if accumulator is None:
        raise RuntimeError("particles inserted before the session's geometry was known")
    with _answering():
        reduce_accumulator(accumulator, ranks)
    accumulator.grids.zero_()
    accumulator.particle_counts.zero_()
