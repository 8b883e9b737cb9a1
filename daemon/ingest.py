"""Turn a complete file from the watcher into particles, or a clear rejection.

Two kinds of file bring particles:

- a **particle stack** (``.mrcs``, or a ``.mrc`` whose header says image stack): every
  image, pixel size from the header (or ``--apix``), no CTF;
- a **RELION particle STAR file**: the rows' stacks (resolved as
  :func:`cryofastar.recon.io.read_particles` does), with their optics, CTF and
  rlnRandomSubset. Every stack it names must lie inside the watched directory.

A particle is identified by ``(resolved stack path, 1-based index)``; particles the
session already took (:class:`~cryofastar.daemon.journal.IngestJournal`) are skipped,
so a stack seen bare and later named by a STAR is counted once (first come, first
served: particles taken bare are back-projected without CTF correction).

The first accepted file fixes the session's box and pixel size; a later file with
another box, or a pixel size off by more than 0.5 %, is rejected. Images with NaN or
Inf pixels are dropped (the rest of the file is kept) and reported. Images are read a
bounded number at a time (:meth:`ParticlePlan.chunks`), so a STAR file of a whole
session never has to fit in memory at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import torch
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.half_sets import half_sets_for_stack
from cryofastar.recon.io import ParticleFileError, read_particles
from cryofastar.recon.io.mrc import read_images

from .journal import IngestJournal

logger = logging.getLogger(__name__)

__all__ = ["NotParticles", "ParticleChunk", "ParticlePlan", "Rejected", "SessionGeometry", "plan_particle_file"]

_STACK_SUFFIXES = {".mrcs", ".mrc"}
_APIX_TOLERANCE = 0.005


class Rejected(ValueError):
    """A file the session cannot use; the message is one line for the log and rejected.tsv."""


class NotParticles(Rejected):
    """A well-formed file that holds no particles (a 3D map beside the stacks): skipped, not an error."""


@dataclass
class SessionGeometry:
    """Box (px) and pixel size (Å) every particle of the session must share."""

    box: int
    apix: float

    def check(self, path: Path, box: int, apix: float) -> None:
        """Raise :class:`Rejected` unless ``box`` and ``apix`` are the session's."""
        if box != self.box:
            raise Rejected(f"{path}: box {box} px differs from the session's {self.box} px")
        if abs(apix - self.apix) > _APIX_TOLERANCE * self.apix:
            raise Rejected(f"{path}: pixel size {apix:.4f} Å differs from the session's {self.apix:.4f} Å")


@dataclass
class ParticleChunk:
    """New particles read from one file (all of the session's box and pixel size).

    Attributes
    ----------
    source: Path
        The file that brought them (a stack or a STAR file).
    stacks: np.ndarray
        `(n,)` resolved stack path (str) of each particle.
    indices: np.ndarray
        `(n,)` int64 1-based index of each particle in its stack.
    images: torch.Tensor
        `(n, B, B)` float32 [n, y, x] at the input box.
    half_sets: torch.Tensor
        `(n,)` int64, 1 or 2 (rlnRandomSubset or the stable hash).
    ctf: CtfParams | None
        Per-particle CTF (STAR files with rlnDefocusU), else ``None``.
    optics: dict[str, float]
        Optics values for the output STAR (rlnVoltage, ...), where the file gave them.
    dropped: int
        Images of this chunk's rows dropped for NaN/Inf pixels (not in the chunk).
    """

    source: Path
    stacks: np.ndarray
    indices: np.ndarray
    images: torch.Tensor
    half_sets: torch.Tensor
    ctf: CtfParams | None = None
    optics: dict[str, float] = field(default_factory=dict)
    dropped: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def split(self, k: int) -> tuple[ParticleChunk, ParticleChunk]:
        """The first ``k`` particles and the rest (``dropped`` stays with the first part)."""

        def part(rows: slice, dropped: int) -> ParticleChunk:
            return ParticleChunk(self.source, self.stacks[rows], self.indices[rows], self.images[rows],
                                 self.half_sets[rows], None if self.ctf is None else self.ctf[rows], self.optics,
                                 dropped)

        return part(slice(0, k), self.dropped), part(slice(k, None), 0)


@dataclass
class ParticlePlan:
    """The new particles of one file, before their images are read.

    Attributes are as in :class:`ParticleChunk`, without ``images``; :meth:`chunks`
    reads the images a bounded number at a time.
    """

    source: Path
    stacks: np.ndarray
    indices: np.ndarray
    half_sets: torch.Tensor
    ctf: CtfParams | None = None
    optics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def select(self, keep: np.ndarray) -> ParticlePlan:
        """The plan restricted to the boolean `(n,)` mask ``keep``."""
        rows = torch.as_tensor(np.nonzero(keep)[0])
        return ParticlePlan(self.source, self.stacks[keep], self.indices[keep], self.half_sets[rows],
                            None if self.ctf is None else self.ctf[rows], self.optics)

    def chunks(self, size: int = 1024) -> Iterator[ParticleChunk]:
        """Read the images ``size`` particles at a time (one read per stack per chunk).

        Images with NaN or Inf pixels are left out and counted in ``dropped``.

        Raises
        ------
        Rejected
            A stack became unreadable since the plan was made.
        """
        for start in range(0, len(self), size):
            rows = np.arange(start, min(len(self), start + size))
            try:
                images = read_particle_images(self.stacks[rows], self.indices[rows])
            except ParticleFileError as exc:
                raise Rejected(str(exc)) from None
            finite = torch.isfinite(images).all(dim=(-2, -1))
            keep = torch.as_tensor(rows)[finite]
            yield ParticleChunk(self.source, self.stacks[keep.numpy()], self.indices[keep.numpy()], images[finite],
                                self.half_sets[keep], None if self.ctf is None else self.ctf[keep], self.optics,
                                dropped=int((~finite).sum()))


def read_particle_images(stacks: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """`(n, B, B)` float32 images of particles given by stack path and 1-based index, in that order.

    One read per stack, not per particle.

    Raises
    ------
    ParticleFileError
        A stack is gone, truncated or does not hold an index.
    """
    images: torch.Tensor | None = None
    for stack in np.unique(stacks):  # a loop over files, not particles
        where = np.nonzero(stacks == stack)[0]
        block = read_images(stack, indices[where])
        if images is None:
            images = torch.empty((len(indices), *block.shape[1:]), dtype=torch.float32)
        images[torch.as_tensor(where)] = block
    assert images is not None
    return images


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _stack_header(path: Path) -> tuple[int, int, float]:
    """`(n_images, box, apix)` of a particle stack; :class:`Rejected` for maps and unreadable files."""
    try:
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            shape = mrc.data.shape
            is_volume = path.suffix.lower() == ".mrc" and mrc.data.ndim == 3 and int(mrc.header.ispg) != 0
            apix = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as exc:
        raise Rejected(f"{path}: not a readable MRC file ({str(exc).splitlines()[0]})") from None
    if is_volume:
        raise NotParticles(f"{path}: a 3D map (header space group is not 0), not a particle stack")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise Rejected(f"{path}: expected a stack of square images, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1]), apix


def _stack_plan(path: Path, apix_override: float | None) -> tuple[ParticlePlan, int, float]:
    n, box, header_apix = _stack_header(path)
    apix = apix_override if apix_override is not None else header_apix
    if not (apix > 0 and math.isfinite(apix)):
        raise Rejected(f"{path}: the MRC header gives no pixel size; pass --apix")
    indices = np.arange(1, n + 1, dtype=np.int64)
    stack = str(path.resolve())
    halves = half_sets_for_stack(stack, torch.as_tensor(indices))
    return ParticlePlan(path, np.full(n, stack, dtype=object).astype(str), indices, halves), box, apix


def _star_plan(path: Path, root: Path, apix_override: float | None) -> tuple[ParticlePlan, int, float]:
    try:
        table = read_particles(path, apix=apix_override)
        ctf = table.ctf()
        halves = table.half_sets()
    except ParticleFileError as exc:
        raise Rejected(str(exc)) from None
    outside = [s for s in np.unique(table.stack_paths) if not _inside(Path(s), root)]
    if outside:
        raise Rejected(f"{path}: names stack {outside[0]} outside the watched directory {root}")
    optics = {c: float(table.particles[c].iloc[0]) for c in ("rlnVoltage", "rlnSphericalAberration",
                                                              "rlnAmplitudeContrast") if c in table.particles}
    plan = ParticlePlan(path, table.stack_paths, table.image_indices.astype(np.int64), halves, ctf, optics)
    return plan, table.box, table.apix


def plan_particle_file(path: Path, root: Path, geometry: SessionGeometry | None, taken: IngestJournal,
                       apix: float | None = None) -> tuple[ParticlePlan, SessionGeometry]:
    """Check ``path`` and list its particles the session has not taken yet.

    Parameters
    ----------
    path: Path
        A complete ``.mrcs``/``.mrc`` stack or ``.star`` particle file.
    root: Path
        The watched directory; a STAR's stacks must lie inside it.
    geometry: SessionGeometry | None
        The session's box and pixel size, ``None`` before the first file.
    taken: IngestJournal
        Particles the session already took; those are left out of the plan.
    apix: float | None
        Pixel size (Å) overriding the files' (``--apix``).

    Returns
    -------
    plan, geometry:
        The new particles (possibly none; read them with :meth:`ParticlePlan.chunks`)
        and the session geometry (fixed by this file if it was the first).

    Raises
    ------
    Rejected
        The file cannot be used: unreadable or truncated, a 3D map, no pixel size, a
        box or pixel size other than the session's, a STAR naming missing stacks or
        stacks outside the watched directory.
    """
    suffix = path.suffix.lower()
    if suffix == ".star":
        plan, box, file_apix = _star_plan(path, root, apix)
    elif suffix in _STACK_SUFFIXES:
        plan, box, file_apix = _stack_plan(path, apix)
    else:
        raise Rejected(f"{path}: not a particle file (.mrcs, .mrc or .star)")
    if geometry is None:
        geometry = SessionGeometry(int(box), float(file_apix))
    else:
        geometry.check(path, int(box), float(file_apix))
    return plan.select(~taken.contains(plan.stacks, plan.indices)), geometry

