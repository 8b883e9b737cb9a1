"""One particle-reading layer: :class:`ParticleSource` (in the spirit of cryoDRGN's ``ImageSource``).

A source lists particles without reading their pixels: per particle the resolved
stack path, the 1-based index in that stack, the image name, the half set (1/2) and,
where the file gives them, the CTF parameters; for the whole set the box (px), the
pixel size (Å) and the optics values (rlnVoltage kV, rlnSphericalAberration mm,
rlnAmplitudeContrast). It is built from a RELION particle STAR file
(:meth:`ParticleSource.from_star`, parsed by :func:`~cryofastar.recon.io.read_particles`)
or from a bare ``.mrcs`` / ``.mrc`` stack (:meth:`ParticleSource.from_stack`); only
headers are read until images are asked for.

Images are read by :meth:`ParticleSource.images` (given rows) or
:meth:`ParticleSource.chunks` (all rows, a bounded number at a time: at most the rows
asked for and at most :data:`CHUNK_BYTES` of pixels), one read per stack, and come back
as a :class:`ParticleChunk`.

NaN / Inf policy (the only one): an image with a non-finite pixel is left out of what
a read returns, and the chunk reports it (:attr:`ParticleChunk.skipped`: its rows,
image names and why). Nothing is dropped silently; callers log the report, write it
to ``rejected.tsv`` (the daemon) or print it. :meth:`ParticleSource.finite` scans a
whole source once and returns it restricted to its finite images, with the report,
for offline commands that need every particle's row fixed before they start.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..ctf import CtfParams
from ..half_sets import half_sets_for_particles
from .errors import NotAParticleStack, ParticleFileError
from .mrc import open_mrc, read_images
from .star import ParticleTable, read_particles

logger = logging.getLogger(__name__)

__all__ = ["ParticleChunk", "ParticleSource", "SkippedImages", "image_keys"]

NON_FINITE = "NaN or Inf pixels"
"""The reason a read leaves an image out."""
_OPTICS_VALUES = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_NAMES_SHOWN = 10  # image names spelled out in SkippedImages.describe()
CHUNK_BYTES = 256 * 2**20
"""Most float32 pixels one chunk of :meth:`ParticleSource.chunks` holds (fewer rows for big boxes)."""


@dataclass(frozen=True)
class SkippedImages:
    """Images a read left out, and why.

    Attributes
    ----------
    rows: np.ndarray
        `(k,)` int64 rows of the source that were left out.
    names: np.ndarray
        `(k,)` image names (str, ``N@stack``) of those rows.
    reason: str
        Why they were left out (:data:`NON_FINITE`).
    """

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    names: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))
    reason: str = NON_FINITE

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @classmethod
    def concat(cls, parts: list[SkippedImages]) -> SkippedImages:
        """The reports of several reads, one after the other."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        return cls(np.concatenate([p.rows for p in parts]), np.concatenate([p.names for p in parts]), parts[0].reason)

    def describe(self, origin: str | os.PathLike[str]) -> str:
        """One line: ``"{origin}: k image(s) contain NaN or Inf pixels and were skipped (names)"``."""
        shown = ", ".join(map(str, self.names[:_NAMES_SHOWN]))
        more = f" and {len(self) - _NAMES_SHOWN} more" if len(self) > _NAMES_SHOWN else ""
        return f"{origin}: {len(self)} image(s) contain {self.reason} and were skipped ({shown}{more})"


@dataclass
class ParticleChunk:
    """Images read from a source, with their particles' metadata (all of one box and pixel size).

    Attributes
    ----------
    origin: Path
        The file the source was built from (a STAR file or a stack).
    rows: np.ndarray
        `(n,)` int64 rows of the source whose images are here, in order.
    stacks: np.ndarray
        `(n,)` resolved stack path (str) of each particle.
    indices: np.ndarray
        `(n,)` int64 1-based index of each particle in its stack.
    images: torch.Tensor
        `(n, B, B)` float32 [n, y, x] at the input box, every pixel finite.
    half_sets: torch.Tensor
        `(n,)` int64, 1 or 2.
    ctf: CtfParams | None
        Per-particle CTF, or ``None`` when the source has none.
    optics: dict[str, float]
        Optics values for an output STAR (rlnVoltage, ...), where the file gave them.
    skipped: SkippedImages
        Rows asked for but left out of this chunk (NaN or Inf pixels).
    """

    origin: Path
    rows: np.ndarray
    stacks: np.ndarray
    indices: np.ndarray
    images: torch.Tensor
    half_sets: torch.Tensor
    ctf: CtfParams | None = None
    optics: dict[str, float] = field(default_factory=dict)
    skipped: SkippedImages = field(default_factory=SkippedImages)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def all_images(self) -> torch.Tensor:
        """`(n, B, B)` images when every row asked for was read, for callers that cannot go without one.

        Raises
        ------
        ParticleFileError
            Some image was left out (its line names them), e.g. a stack rewritten with NaN
            pixels after :meth:`ParticleSource.finite` checked it.
        """
        if len(self.skipped):
            raise ParticleFileError(self.skipped.describe(self.origin))
        return self.images

    def split(self, k: int) -> tuple[ParticleChunk, ParticleChunk]:
        """The first ``k`` particles and the rest (``skipped`` stays with the first part)."""

        def part(rows: slice, skipped: SkippedImages) -> ParticleChunk:
            return ParticleChunk(self.origin, self.rows[rows], self.stacks[rows], self.indices[rows],
                                 self.images[rows], self.half_sets[rows], None if self.ctf is None else self.ctf[rows],
                                 self.optics, skipped)

        return part(slice(0, k), self.skipped), part(slice(k, None), SkippedImages())


@dataclass(frozen=True)
class ParticleSource:
    """Particles to read (lazily): where each image is and what goes with it.

    Build it with :meth:`from_star`, :meth:`from_stack` or :meth:`from_locations`.

    Attributes
    ----------
    origin: Path
        The file the particles came from (STAR file or stack).
    stacks: np.ndarray
        `(n,)` resolved stack path (str) of each particle.
    indices: np.ndarray
        `(n,)` int64 1-based index of each particle in its stack.
    names: np.ndarray
        `(n,)` image name (str, ``N@stack``; rlnImageName as written for STAR files).
    half_sets: torch.Tensor
        `(n,)` int64 half set, 1 or 2.
    box: int
        Image side (px).
    apix: float
        Pixel size (Å).
    ctf: CtfParams | None
        Per-particle CTF parameters (`(n,)` each), or ``None``.
    optics: dict[str, float]
        rlnVoltage (kV), rlnSphericalAberration (mm), rlnAmplitudeContrast where given.
    table: ParticleTable | None
        The STAR rows, restricted alongside (row ``i`` of the table is particle ``i``);
        ``None`` for a bare stack.
    """

    origin: Path
    stacks: np.ndarray
    indices: np.ndarray
    names: np.ndarray
    half_sets: torch.Tensor
    box: int
    apix: float
    ctf: CtfParams | None = None
    optics: dict[str, float] = field(default_factory=dict)
    table: ParticleTable | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_star(cls, path: str | os.PathLike[str], apix: float | None = None,
                  table: ParticleTable | None = None) -> ParticleSource:
        """The particles of a RELION STAR file (stacks resolved and checked, pixels not read).

        Parameters
        ----------
        path: str | os.PathLike[str]
            STAR file (:func:`~cryofastar.recon.io.read_particles` parses and validates it).
        apix: float | None
            Pixel size (Å) to use when the file gives none.
        table: ParticleTable | None
            The file already parsed (then ``path`` and ``apix`` are not read again).

        Raises
        ------
        ParticleFileError
            The file or a stack it names cannot be used (one line).
        """
        table = table if table is not None else read_particles(path, apix=apix)
        optics = {c: float(table.particles[c].iloc[0]) for c in _OPTICS_VALUES if c in table.particles}
        return cls(origin=Path(table.star_path), stacks=table.stack_paths,
                   indices=table.image_indices.astype(np.int64),
                   names=table.particles["rlnImageName"].astype(str).to_numpy(dtype=str),
                   half_sets=table.half_sets(), box=table.box, apix=table.apix, ctf=table.ctf(), optics=optics,
                   table=table)

    @classmethod
    def from_stack(cls, path: str | os.PathLike[str], apix: float | None = None) -> ParticleSource:
        """Every image of a bare ``.mrcs`` / ``.mrc`` stack (header read only; no CTF, hashed half sets).

        Parameters
        ----------
        path: str | os.PathLike[str]
            Particle stack; a single 2D image counts as a stack of one.
        apix: float | None
            Pixel size (Å) overriding the header's.

        Raises
        ------
        NotAParticleStack
            A ``.mrc`` whose header says 3D map (space group not 0).
        ParticleFileError
            Unreadable or truncated, not square images, or no pixel size.
        """
        path = Path(path)
        n, box, header_apix = _stack_header(path)
        pixel_size = float(apix) if apix is not None else header_apix
        if not (pixel_size > 0 and math.isfinite(pixel_size)):
            raise ParticleFileError(f"{path}: the MRC header gives no pixel size; pass --apix")
        stack = str(path.resolve())
        return cls.from_locations(path, np.full(n, stack).astype(str), np.arange(1, n + 1, dtype=np.int64), box,
                                  pixel_size)

    @classmethod
    def from_locations(cls, origin: str | os.PathLike[str], stacks: np.ndarray, indices: np.ndarray, box: int,
                       apix: float, half_sets: torch.Tensor | None = None,
                       ctf: CtfParams | None = None) -> ParticleSource:
        """Particles given by stack path and 1-based index (e.g. those a session already holds).

        Parameters
        ----------
        origin: str | os.PathLike[str]
            What to name in reports (a file, or the session's output folder).
        stacks, indices: np.ndarray
            `(n,)` stack paths (str) and `(n,)` 1-based indices.
        box: int
            Image side (px) of every stack.
        apix: float
            Pixel size (Å).
        half_sets: torch.Tensor | None
            `(n,)` int64 1/2; ``None``: the stable hash of each stack and index.
        ctf: CtfParams | None
            Per-particle CTF, if known.
        """
        stacks = np.asarray(stacks).astype(str)
        indices = np.asarray(indices, dtype=np.int64)
        if stacks.shape != indices.shape:
            raise ValueError(f"{len(stacks)} stacks for {len(indices)} indices")
        if half_sets is None:
            half_sets = half_sets_for_particles(stacks, indices)
        names = np.char.add(np.char.add(np.char.zfill(indices.astype(str), 6), "@"), stacks)
        return cls(origin=Path(origin), stacks=stacks, indices=indices, names=names, half_sets=half_sets,
                   box=int(box), apix=float(apix), ctf=ctf)

    # ------------------------------------------------------------------ subsets
    def select(self, mask: np.ndarray) -> ParticleSource:
        """The source restricted to a boolean `(n,)` mask, or to an int array of rows (in that order)."""
        mask = np.asarray(mask)
        if mask.dtype == bool:
            if mask.shape != (len(self),):
                raise ValueError(f"mask of shape {mask.shape} for {len(self)} particles")
            rows = np.nonzero(mask)[0]
        else:
            rows = mask.astype(np.int64).reshape(-1)
        picked = torch.as_tensor(rows, dtype=torch.int64)
        return replace(self, stacks=self.stacks[rows], indices=self.indices[rows], names=self.names[rows],
                       half_sets=self.half_sets[picked], ctf=None if self.ctf is None else self.ctf[picked],
                       table=None if self.table is None else self.table.select(rows))

    # ------------------------------------------------------------------ reading
    def images(self, rows: np.ndarray | None = None) -> ParticleChunk:
        """Read the images of ``rows`` (all if ``None``): one read per stack, none per particle.

        Images with a NaN or Inf pixel are left out and reported in ``chunk.skipped``;
        ``chunk.rows`` says which rows were read.

        Parameters
        ----------
        rows: np.ndarray | None
            `(m,)` rows of this source (0-based), in the order wanted.

        Returns
        -------
        chunk: ParticleChunk
            `(m - k, B, B)` float32 images and their particles' metadata.

        Raises
        ------
        ParticleFileError
            A stack is gone, truncated, or does not hold an index.
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        out = torch.empty((len(rows), self.box, self.box), dtype=torch.float32)
        stacks = self.stacks[rows]
        unique, which = np.unique(stacks, return_inverse=True)
        order = np.argsort(which, kind="stable")  # rows grouped by stack
        bounds = np.searchsorted(which[order], np.arange(len(unique) + 1))
        for k, stack in enumerate(unique):  # a loop over files, not particles
            where = order[bounds[k]:bounds[k + 1]]
            block = read_images(stack, self.indices[rows[where]])
            if block.shape[1:] != out.shape[1:]:
                raise ParticleFileError(f"{stack}: box {block.shape[-1]} px, expected {self.box} px")
            out[torch.as_tensor(where)] = block
        finite = torch.isfinite(out).all(dim=(-2, -1)).numpy()
        kept = rows[finite]
        skipped = SkippedImages(rows[~finite], self.names[rows[~finite]]) if not finite.all() else SkippedImages()
        picked = torch.as_tensor(kept)
        return ParticleChunk(self.origin, kept, self.stacks[kept], self.indices[kept],
                             out[torch.as_tensor(finite)] if len(kept) < len(rows) else out,
                             self.half_sets[picked], None if self.ctf is None else self.ctf[picked],
                             self.optics, skipped)

    def chunks(self, size: int = 1024) -> Iterator[ParticleChunk]:
        """Read every image, ``size`` rows at a time (fewer if they would exceed :data:`CHUNK_BYTES`; see
        :meth:`images`); a chunk may be empty.

        Raises
        ------
        ParticleFileError
            A stack became unreadable since the source was made.
        """
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        size = max(1, min(size, CHUNK_BYTES // (4 * self.box * self.box)))
        for start in range(0, len(self), size):
            yield self.images(np.arange(start, min(len(self), start + size)))

    def finite(self, size: int = 1024, warn: bool = True) -> tuple[ParticleSource, SkippedImages]:
        """The source restricted to the images that read and are finite, and what was left out.

        Costs one chunked read of every image. With ``warn`` a left-out image gets one
        warning line (``logging``) naming them.

        Returns
        -------
        source, skipped: tuple[ParticleSource, SkippedImages]
            The finite particles (rows renumbered ``0..n-k-1``) and the report (rows of ``self``).

        Raises
        ------
        ParticleFileError
            A stack is unreadable, or no image is finite.
        """
        kept, skipped = [], []
        for chunk in self.chunks(size):
            kept.append(chunk.rows)
            skipped.append(chunk.skipped)
        report = SkippedImages.concat(skipped)
        if len(report) == len(self):
            raise ParticleFileError(f"{self.origin}: every image contains {NON_FINITE}; nothing to use")
        if len(report) and warn:
            logger.warning("%s", report.describe(self.origin))
        return (self.select(np.concatenate(kept)) if len(report) else self), report


def image_keys(particles: ParticleTable | ParticleSource) -> pd.Index:
    """`(n,)` image keys ``"N@/resolved/stack"`` (N a plain integer, the stack's resolved absolute path).

    Two files naming the same image (by relative or absolute path, with or without
    leading zeros) give it the same key.

    Raises
    ------
    ValueError
        An image appears more than once.
    """
    if isinstance(particles, ParticleSource):
        stacks, indices, origin = particles.stacks, particles.indices, particles.origin
    else:
        stacks, indices, origin = particles.stack_paths, particles.image_indices, particles.star_path
    resolved = {stack: str(Path(stack).resolve()) for stack in set(stacks)}
    keys = pd.Index([f"{int(i)}@{resolved[stack]}" for i, stack in zip(indices, stacks, strict=True)])
    if keys.has_duplicates:
        raise ValueError(f"{origin}: rlnImageName {keys[keys.duplicated()][0]!r} appears more than once")
    return keys


def _stack_header(path: Path) -> tuple[int, int, float]:
    """`(n_images, box, apix)` of a particle stack from its header (pixels are not read)."""
    with open_mrc(path) as mrc:  # the header checked against the file size first
        shape = mrc.data.shape
        is_volume = path.suffix.lower() == ".mrc" and mrc.data.ndim == 3 and int(mrc.header.ispg) != 0
        apix = float(mrc.voxel_size.x)
    if is_volume:
        raise NotAParticleStack(f"{path}: a 3D map (header space group is not 0), not a particle stack")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ParticleFileError(f"{path}: expected a stack of square images, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1]), apix
