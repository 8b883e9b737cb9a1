"""Turn a complete file from the watcher into particles, or a clear rejection.

Two kinds of file bring particles:

- a **particle stack** (``.mrcs``, or a ``.mrc`` whose header says image stack): every
  image, pixel size from the header (or ``--apix``), no CTF;
- a **RELION particle STAR file**: the rows' stacks (resolved as
  :func:`cryofastar.recon.io.read_particles` does), with their optics, CTF and
  rlnRandomSubset. Every stack it names must lie inside the watched directory, symlinks
  followed; one that does not (an absolute path such as ``/etc/passwd``, ``..``, a symlink
  leading out) gets the file rejected before that stack is opened. A bare stack that is a
  symlink leading out of the watched directory is rejected before it is opened too.

A STAR file that names the same image (same stack and index) on several rows brings it
once: the first row is kept, the others are left out and written to rejected.tsv with the
reason (:meth:`~cryofastar.recon.io.source.ParticleSource.distinct`).

A particle is identified by ``(resolved stack path, 1-based index)``; particles the
session already took (:class:`~cryofastar.daemon.journal.IngestJournal`) are skipped,
so a stack seen bare and later named by a STAR is counted once (first come, first
served: particles taken bare are back-projected without CTF correction).

Every stack a file brings particles from must have a name (its path below the watched
directory) that ``particles.star`` can hold for RELION and starfile to read back
(:func:`~cryofastar.recon.io.names.image_name_problem`, docs/conventions.md "File
names"): a tab, a newline, a byte that is not UTF-8, a quote, ``#``, ``%`` or ``:`` gets
the file rejected before anything is read, with the name shown escaped.

The first accepted file fixes the session's box and pixel size; a later file with
another box, or a pixel size off by more than 0.5 %, is rejected. A file's new
particles are a :class:`~cryofastar.recon.io.source.ParticleSource` (the one reading
layer); its images are read a bounded number at a time
(:meth:`~cryofastar.recon.io.source.ParticleSource.chunks`), so a STAR file of a whole
session never has to fit in memory at once. Images with NaN or Inf pixels are left out
by the source and reported on each chunk (``chunk.skipped``), as are images whose pixels
no particle has (beyond 1e6, or a hot pixel: the pixel policy of
:mod:`~cryofastar.recon.io.source`); the daemon takes the rest of the file and writes them
to rejected.tsv.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryofastar.recon.io import NotAParticleStack, ParticleFileError, ParticleSource, path_inside
from cryofastar.recon.io.mrc import MAX_VOLUME_SIDE
from cryofastar.recon.io.names import image_name_problem, printable

from .journal import IngestJournal

logger = logging.getLogger(__name__)

__all__ = ["NotParticles", "Rejected", "SessionGeometry", "plan_particle_file"]

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


def _check_names(origin: Path, stacks: list[str], root: Path) -> None:
    """Raise :class:`Rejected` if a stack's path below ``root`` breaks the file-name rule (module docstring)."""
    for stack in stacks:
        try:
            name = str(Path(stack).resolve().relative_to(root.resolve()))
        except ValueError:
            name = Path(stack).name
        problem = image_name_problem(name)
        if problem is not None:
            which = "its name" if Path(stack).resolve() == origin.resolve() else f"stack '{printable(name)}'"
            raise Rejected(f"{printable(str(origin))}: {which} has {problem}; rename it (docs/conventions.md, "
                           "File names)")


def _stack_source(path: Path, apix_override: float | None) -> ParticleSource:
    try:
        return ParticleSource.from_stack(path, apix=apix_override)
    except NotAParticleStack as exc:
        raise NotParticles(str(exc)) from None
    except ParticleFileError as exc:
        raise Rejected(str(exc)) from None


def _star_source(path: Path, root: Path, apix_override: float | None) -> ParticleSource:
    try:
        source = ParticleSource.from_star(path, apix=apix_override, root=root)  # refuses outside stacks unopened
    except ParticleFileError as exc:
        raise Rejected(str(exc)) from None
    stacks = [str(s) for s in np.unique(source.stacks)]
    outside = [s for s in stacks if not path_inside(Path(s), root)]
    if outside:
        raise Rejected(f"{path}: names stack {outside[0]} outside the watched directory {root}")
    _check_names(path, stacks, root)
    return source.distinct()


def plan_particle_file(path: Path, root: Path, geometry: SessionGeometry | None, taken: IngestJournal,
                       apix: float | None = None) -> tuple[ParticleSource, SessionGeometry]:
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
        Particles the session already took; those are left out of the source returned.
    apix: float | None
        Pixel size (Å) overriding the files' (``--apix``).

    Returns
    -------
    source, geometry: tuple[ParticleSource, SessionGeometry]
        The new particles (possibly none; read them with
        :meth:`~cryofastar.recon.io.source.ParticleSource.chunks`, which leaves out and
        reports images the pixel policy refuses, and, with the first chunk, a STAR's
        repeated rows) and the session geometry (fixed by this file if it was the first).

    Raises
    ------
    Rejected
        The file cannot be used: unreadable or truncated (or a header that claims more
        than the file holds), a 3D map, no pixel size, a box or pixel size other than the
        session's, a STAR naming missing stacks or stacks outside the watched directory,
        a stack whose name the outputs cannot hold.
    """
    suffix = path.suffix.lower()
    if suffix == ".star":
        source = _star_source(path, root, apix)
    elif suffix in _STACK_SUFFIXES:
        if not path_inside(path, root):  # a symlink leading out of the watched directory: before it is opened
            raise Rejected(f"{printable(str(path))}: a symlink to {printable(os.path.realpath(path))}, outside the "
                           f"watched directory {printable(str(root))}")
        _check_names(path, [str(path)], root)  # before the file is opened
        source = _stack_source(path, apix)
    else:
        raise Rejected(f"{path}: not a particle file (.mrcs, .mrc or .star)")
    if geometry is None:
        if source.box > MAX_VOLUME_SIDE:  # the first file fixes the box: the map would be box³ voxels per grid
            raise Rejected(f"{path}: box {source.box} px is larger than a session map may be ({MAX_VOLUME_SIDE} px "
                           f"a side); it does not fix the session's box")
        geometry = SessionGeometry(source.box, source.apix)
    else:
        geometry.check(path, source.box, source.apix)
    return source.select(~taken.contains(source.stacks, source.indices)), geometry

