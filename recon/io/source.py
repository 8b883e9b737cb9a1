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

Pixel policy (the only one; docs/conventions.md, "Pixel values"): after conversion to
float32 an image is left out of what a read returns if a pixel is NaN or Inf
(:data:`NON_FINITE`), if a pixel's magnitude exceeds :data:`MAX_PIXEL_MAGNITUDE`
(:data:`TOO_LARGE`: a stack scaled by 1e20, a pixel at 2.4e27), or if a pixel lies more
than :data:`OUTLIER_FACTOR` times the stack's typical image RMS from its image's mean
(:data:`OUTLIER`: a hot pixel; the typical RMS is the median RMS of up to
:data:`SCALE_SAMPLE` images spread evenly through the stack, so it does not depend on
which rows are read together). The chunk reports it (:attr:`ParticleChunk.skipped`: its
rows, image names and why). Nothing is dropped silently; callers log the report, write
it to ``rejected.tsv`` (the daemon) or print it.

Repeated images: a STAR file that names the same image (same stack, same index) on
several rows brings it once. :meth:`ParticleSource.distinct` keeps the first row and
reports the others (:data:`DUPLICATE`); the report comes with the first chunk
:meth:`ParticleSource.chunks` yields. :meth:`ParticleSource.finite` does both, scanning a
whole source once and returning it restricted to its first, usable images, with the
report, for offline commands that need every particle's row fixed before they start.
"""

from __future__ import annotations

import functools
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
from .mrc import open_mrc, read_images, typical_image_rms, voxel_size
from .star import ParticleTable, read_particles

logger = logging.getLogger(__name__)

__all__ = ["DUPLICATE", "MAX_PIXEL_MAGNITUDE", "NON_FINITE", "OUTLIER", "OUTLIER_FACTOR", "TOO_LARGE", "ParticleChunk",
           "ParticleSource", "SkippedImages", "image_keys"]

NON_FINITE = "NaN or Inf pixels"
"""Why a read leaves an image out: a pixel is NaN or Inf after float32 conversion."""
MAX_PIXEL_MAGNITUDE = 1e6
"""Largest pixel magnitude a particle image may have (after float32 conversion): 15 times a 16-bit
detector count, and far below where float32 power spectra of a 4096 px image overflow (~1e12)."""
TOO_LARGE = f"pixels beyond ±{MAX_PIXEL_MAGNITUDE:.0e}"
"""Why a read leaves an image out: a pixel's magnitude exceeds :data:`MAX_PIXEL_MAGNITUDE`."""
OUTLIER_FACTOR = 1000.0
"""A pixel further than this many times the stack's typical image RMS from its image's mean is no
particle's (Gaussian noise reaches ~6 RMS; a noise-free projection in a box of B px at most B RMS)."""
SCALE_SAMPLE = 15
"""Images (spread evenly through a stack) whose median RMS is the stack's typical image RMS."""
OUTLIER = f"a pixel over {OUTLIER_FACTOR:g} times the stack's typical RMS from the image mean"
"""Why a read leaves an image out: a pixel beyond :data:`OUTLIER_FACTOR` x the stack's typical RMS."""
DUPLICATE = "an earlier row's image (same stack and index)"
"""Why a row is left out: it names an image an earlier row of the file already named."""
_VERBS = {DUPLICATE: "repeat"}  # how SkippedImages.describe() says it ("contain" otherwise)
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
    reasons: np.ndarray | str
        `(k,)` why each was left out (:data:`NON_FINITE`, :data:`TOO_LARGE`, :data:`OUTLIER`,
        :data:`DUPLICATE`); one string stands for all.
    """

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    names: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))
    reasons: np.ndarray | str = NON_FINITE

    def __post_init__(self) -> None:
        reasons = np.asarray(self.reasons, dtype=object)
        if reasons.ndim == 0:
            reasons = np.full(len(self.rows), self.reasons, dtype=object)
        object.__setattr__(self, "reasons", reasons)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def reason(self) -> str:
        """Every distinct reason, in order of first appearance, joined by ``"; "``."""
        return "; ".join(dict.fromkeys(map(str, self.reasons)))

    @classmethod
    def concat(cls, parts: list[SkippedImages]) -> SkippedImages:
        """The reports of several reads, one after the other."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        return cls(np.concatenate([p.rows for p in parts]), np.concatenate([p.names for p in parts]),
                   np.concatenate([p.reasons for p in parts]))

    def describe(self, origin: str | os.PathLike[str]) -> str:
        """One line: ``"{origin}: k image(s) contain NaN or Inf pixels and were skipped (names)"``,
        one such clause per reason (``"; "`` between them)."""
        clauses = []
        for reason in dict.fromkeys(map(str, self.reasons)):
            names = self.names[self.reasons == reason]
            shown = ", ".join(map(str, names[:_NAMES_SHOWN]))
            more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
            clauses.append(f"{len(names)} image(s) {_VERBS.get(reason, 'contain')} {reason} and were skipped "
                           f"({shown}{more})")
        return f"{origin}: " + "; ".join(clauses)


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

    def subset(self, keep: np.ndarray) -> ParticleChunk:
        """The chunk's particles at ``keep``: `(n,)` bool, or `(k,)` int64 positions (in that order); nothing
        skipped."""
        keep = np.asarray(keep)
        picked = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        index = torch.from_numpy(picked)
        return ParticleChunk(self.origin, self.rows[picked], self.stacks[picked], self.indices[picked],
                             self.images[index], self.half_sets[index], None if self.ctf is None else self.ctf[index],
                             self.optics)

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
    left_out: SkippedImages
        Rows :meth:`distinct` left out (repeats of an earlier row's image; rows of the
        source it was called on); the first chunk :meth:`chunks` yields reports them.
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
    left_out: SkippedImages = field(default_factory=SkippedImages)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_star(cls, path: str | os.PathLike[str], apix: float | None = None,
                  table: ParticleTable | None = None, root: str | os.PathLike[str] | None = None) -> ParticleSource:
        """The particles of a RELION STAR file (stacks resolved and checked, pixels not read).

        Parameters
        ----------
        path: str | os.PathLike[str]
            STAR file (:func:`~cryofastar.recon.io.read_particles` parses and validates it).
        apix: float | None
            Pixel size (Å) to use when the file gives none.
        table: ParticleTable | None
            The file already parsed (then ``path`` and ``apix`` are not read again).
        root: str | os.PathLike[str] | None
            A directory every stack must lie in (symlinks followed), checked before a stack
            is opened (:func:`~cryofastar.recon.io.read_particles`).

        Raises
        ------
        ParticleFileError
            The file or a stack it names cannot be used (one line).
        """
        table = table if table is not None else read_particles(path, apix=apix, root=root)
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

    def first_rows(self) -> np.ndarray:
        """`(m,)` int64 rows (in order) whose image no earlier row names (the key: resolved stack, index)."""
        resolved = {stack: os.path.realpath(stack) for stack in set(self.stacks.tolist())}  # one per stack
        keys = pd.DataFrame({"stack": pd.Series(self.stacks, dtype=object).map(resolved), "index": self.indices})
        return np.nonzero(~keys.duplicated(keep="first").to_numpy())[0].astype(np.int64)

    def distinct(self) -> ParticleSource:
        """The source with each image once: the first row that names it kept, later ones left out and
        recorded in :attr:`left_out` (reason :data:`DUPLICATE`), which the first chunk of
        :meth:`chunks` reports."""
        first = self.first_rows()
        if len(first) == len(self):
            return self
        repeats = np.setdiff1d(np.arange(len(self)), first)
        report = SkippedImages(repeats, self.names[repeats], DUPLICATE)
        return replace(self.select(first), left_out=SkippedImages.concat([self.left_out, report]))

    # ------------------------------------------------------------------ reading
    def images(self, rows: np.ndarray | None = None) -> ParticleChunk:
        """Read the images of ``rows`` (all if ``None``): one read per stack, none per particle.

        Images the pixel policy refuses (module docstring: a NaN or Inf pixel, a pixel
        beyond :data:`MAX_PIXEL_MAGNITUDE`, or an outlier pixel) are left out and reported
        in ``chunk.skipped``; ``chunk.rows`` says which rows were read.

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
        why = np.full(len(rows), "", dtype=object)  # "" kept, else the pixel policy's reason
        for k, stack in enumerate(unique):  # a loop over files, not particles
            where = order[bounds[k]:bounds[k + 1]]
            block = read_images(stack, self.indices[rows[where]])
            if block.shape[1:] != out.shape[1:]:
                raise ParticleFileError(f"{stack}: box {block.shape[-1]} px, expected {self.box} px")
            out[torch.as_tensor(where)] = block
            why[where] = _pixel_verdicts(block, stack)
        ok = why == ""
        kept = rows[ok]
        skipped = SkippedImages(rows[~ok], self.names[rows[~ok]], why[~ok]) if not ok.all() else SkippedImages()
        picked = torch.as_tensor(kept)
        return ParticleChunk(self.origin, kept, self.stacks[kept], self.indices[kept],
                             out[torch.as_tensor(ok)] if len(kept) < len(rows) else out,
                             self.half_sets[picked], None if self.ctf is None else self.ctf[picked],
                             self.optics, skipped)

    def chunks(self, size: int = 1024) -> Iterator[ParticleChunk]:
        """Read every image, ``size`` rows at a time (fewer if they would exceed :data:`CHUNK_BYTES`; see
        :meth:`images`); a chunk may be empty. The first chunk's ``skipped`` also holds :attr:`left_out`.

        Raises
        ------
        ParticleFileError
            A stack became unreadable since the source was made.
        """
        if size < 1:
            raise ValueError(f"chunk size must be at least 1, got {size}")
        size = max(1, min(size, CHUNK_BYTES // (4 * self.box * self.box)))
        for start in range(0, len(self), size):
            chunk = self.images(np.arange(start, min(len(self), start + size)))
            if start == 0 and len(self.left_out):
                chunk.skipped = SkippedImages.concat([self.left_out, chunk.skipped])
            yield chunk

    def finite(self, size: int = 1024, warn: bool = True) -> tuple[ParticleSource, SkippedImages]:
        """The source restricted to each image's first row (:meth:`distinct`) and to the images the pixel
        policy takes (module docstring), and what was left out.

        Costs one chunked read of every image. With ``warn`` the left-out rows get one
        warning line (``logging``) naming them, with why.

        Returns
        -------
        source, skipped: tuple[ParticleSource, SkippedImages]
            The usable particles (rows renumbered ``0..n-k-1``) and the report (rows of ``self``).

        Raises
        ------
        ParticleFileError
            A stack is unreadable, or no image is usable.
        """
        first = self.first_rows()
        repeats = np.setdiff1d(np.arange(len(self)), first)
        unique = self.select(first) if len(repeats) else self
        kept, skipped = [], [SkippedImages(repeats, self.names[repeats], DUPLICATE)]
        for chunk in unique.chunks(size):
            kept.append(first[chunk.rows])
            skipped.append(SkippedImages(first[chunk.skipped.rows], chunk.skipped.names, chunk.skipped.reasons))
        report = SkippedImages.concat(skipped)
        if len(report) == len(self):
            raise ParticleFileError(f"{self.origin}: every image contains {report.reason}; nothing to use")
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


def _typical_rms(stack: str) -> float:
    """:func:`~cryofastar.recon.io.mrc.typical_image_rms` of ``stack``, computed once per version of the file
    (path, inode, size, mtime): re-reads of a session's particles do not read the sample again."""
    try:
        info = os.stat(stack)
    except OSError as exc:
        raise ParticleFileError(f"{stack}: cannot be read ({exc.strerror})") from None
    return _typical_rms_of(stack, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _typical_rms_of(stack: str, inode: int, size: int, mtime_ns: int) -> float:  # noqa: ARG001 - cache key
    return typical_image_rms(stack, SCALE_SAMPLE)


def _pixel_verdicts(block: torch.Tensor, stack: str) -> np.ndarray:
    """`(m,)` object array: ``""`` for each image of ``block`` (from ``stack``) the pixel policy takes, else why.

    Rules, in order (module docstring): a non-finite pixel; a pixel beyond
    :data:`MAX_PIXEL_MAGNITUDE`; a pixel more than :data:`OUTLIER_FACTOR` x the stack's
    typical image RMS (:func:`~cryofastar.recon.io.mrc.typical_image_rms`) from its image's mean.
    """
    why = np.full(block.shape[0], "", dtype=object)
    finite = torch.isfinite(block).all(dim=(-2, -1)).numpy()
    why[~finite] = NON_FINITE
    peak = block.abs().amax(dim=(-2, -1)).numpy()
    why[finite & (peak > MAX_PIXEL_MAGNITUDE)] = TOO_LARGE
    sane = np.nonzero(why == "")[0]
    if len(sane):
        scale = _typical_rms(stack)
        if scale > 0:
            images = block[torch.as_tensor(sane)]
            mean = images.mean(dim=(-2, -1), dtype=torch.float64)
            # max |pixel - mean| lies at the image's largest or smallest pixel: no float64 copy of the block
            deviation = torch.maximum(images.amax(dim=(-2, -1)).double() - mean,
                                      mean - images.amin(dim=(-2, -1)).double()).numpy()
            why[sane[deviation > OUTLIER_FACTOR * scale]] = OUTLIER
    return why


def _stack_header(path: Path) -> tuple[int, int, float]:
    """`(n_images, box, apix)` of a particle stack from its header (pixels are not read)."""
    with open_mrc(path) as mrc:  # the header checked against the file size first
        shape = mrc.data.shape
        is_volume = path.suffix.lower() == ".mrc" and mrc.data.ndim == 3 and int(mrc.header.ispg) != 0
        apix = voxel_size(mrc)
    if is_volume:
        raise NotAParticleStack(f"{path}: a 3D map (header space group is not 0), not a particle stack")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ParticleFileError(f"{path}: expected a stack of square images, got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1]), apix
