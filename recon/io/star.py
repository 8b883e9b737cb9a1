"""RELION particle STAR files (starfile): read with validation, write RELION 3.1.

A RELION 3.1 particle set has a ``data_optics`` block (rlnOpticsGroup,
rlnImagePixelSize Å, rlnImageSize px, rlnVoltage kV, rlnSphericalAberration mm,
rlnAmplitudeContrast) and a ``data_particles`` block (rlnImageName as
``N@stack.mrcs`` with N 1-based, rlnAngleRot/Tilt/Psi in degrees,
rlnOriginXAngst/YAngst, rlnDefocusU/V Å, rlnDefocusAngle degrees, rlnOpticsGroup).
Stack paths in rlnImageName are resolved relative to the STAR file's directory,
then its parents up to three levels (a RELION job folder such as
``Refine3D/job012/`` sits two below the project directory the names are relative
to), then the working directory. RELION 3.0 files
(one block, rlnOriginX/Y in pixels) are read too. Images are read through
:class:`~cryofastar.recon.io.source.ParticleSource` (``ParticleSource.from_star``).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from ..ctf import CtfParams
from ..euler import euler_to_matrix
from ..half_sets import half_sets_for_particles
from .atomic import atomic_path
from .errors import ParticleFileError
from .mrc import stack_shape
from .names import printable, star_column

__all__ = ["ParticleTable", "path_inside", "read_particles", "write_particles"]

_ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
_OPTICS_CTF = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
_PARTICLE_CTF = ["rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor"]
_PIXEL_SIZES = ["rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification"]
_NUMBERS = [*_ANGLES, "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY", "rlnDefocusU",
            *_PARTICLE_CTF, *_OPTICS_CTF, *_PIXEL_SIZES, "rlnImageSize", "rlnRandomSubset", "rlnOpticsGroup"]
"""Columns that must hold numbers: a text value in one is a ParticleFileError naming it (not a crash later)."""
_MAY_BE_NAN = {"rlnDefocusU", "rlnDefocusV"}  # ctf() refuses them with its own message; every other: finite
_POSITIVE = [*_PIXEL_SIZES, "rlnImageSize", "rlnVoltage"]


@dataclass
class ParticleTable:
    """A validated particle set: one row per particle, stacks resolved and checked.

    Attributes
    ----------
    star_path: Path
        The STAR file read.
    particles: pd.DataFrame
        The particles block, optics columns merged in (one row per particle).
    optics: pd.DataFrame | None
        The optics block as read (``None`` for RELION 3.0 files).
    stack_paths: np.ndarray
        `(n,)` resolved stack path (str) of each particle.
    image_indices: np.ndarray
        `(n,)` int64 1-based index of each particle in its stack.
    apix: float
        Pixel size in Å (one for the whole set).
    box: int
        Image side in pixels.
    """

    star_path: Path
    particles: pd.DataFrame
    optics: pd.DataFrame | None
    stack_paths: np.ndarray
    image_indices: np.ndarray
    apix: float
    box: int

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def has_poses(self) -> bool:
        """Whether the file gives rlnAngleRot/Tilt/Psi (particles straight from extraction do not)."""
        return set(_ANGLES) <= set(self.particles.columns)

    def rotations(self) -> torch.Tensor:
        """`(n, 3, 3)` RELION matrices from rlnAngleRot/Tilt/Psi (ParticleFileError when the file has none)."""
        if not self.has_poses:
            raise _fail(self.star_path, "no poses (rlnAngleRot/Tilt/Psi); find them first with "
                        "`cryofastar-stream reconstruct`")
        angles = torch.as_tensor(self.particles[_ANGLES].to_numpy(np.float64))
        return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])

    def origins_angstrom(self) -> torch.Tensor:
        """`(n, 2)` float64 rlnOriginXAngst/YAngst (from rlnOriginX/Y px x apix for 3.0; else 0)."""
        p = self.particles
        if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(p.columns):
            values = p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64)
        elif {"rlnOriginX", "rlnOriginY"} <= set(p.columns):
            values = p[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64) * self.apix
        else:
            values = np.zeros((len(p), 2))
        return torch.as_tensor(values)

    def ctf(self) -> CtfParams | None:
        """Per-particle CTF parameters as RELION means them, or ``None`` if the set has no CTF columns.

        ParticleFileError (one line) for partial CTF columns (e.g. rlnDefocusV without
        rlnDefocusU, or no rlnVoltage/rlnSphericalAberration/rlnAmplitudeContrast in the
        particles or their optics group) and for a defocus that is not a positive number
        (0 or NaN: RELION would silently correct for a defocus-0 CTF).
        """
        p = self.particles
        partial = [c for c in _PARTICLE_CTF if c in p.columns]
        if "rlnDefocusU" not in p.columns:
            if partial:
                raise ParticleFileError(f"{self.star_path}: CTF column(s) {', '.join(partial)} given without "
                                        "rlnDefocusU")
            return None
        for name in ("rlnDefocusU", "rlnDefocusV"):
            if name in p.columns:
                values = pd.to_numeric(p[name], errors="coerce").to_numpy(np.float64)
                bad = np.nonzero(~(np.isfinite(values) & (values > 0)))[0]
                if len(bad):
                    raise ParticleFileError(f"{self.star_path}: {name} must be a positive defocus in Å, "
                                            f"got {p[name].iloc[bad[0]]!r} at particle {bad[0] + 1} "
                                            f"({len(bad)} such particles)")

        ranges = {"rlnVoltage": (lambda v: v > 0, "a positive voltage in kV"),
                  "rlnAmplitudeContrast": (lambda v: (v >= 0) & (v < 1), "an amplitude contrast in [0, 1)")}
        for name, (fine, what) in ranges.items():
            if name in p.columns:
                values = pd.to_numeric(p[name], errors="coerce").to_numpy(np.float64)
                bad = np.nonzero(~(np.isfinite(values) & fine(values)))[0]
                if len(bad):
                    raise ParticleFileError(f"{self.star_path}: {name} must be {what}, got {p[name].iloc[bad[0]]!r} "
                                            f"at particle {bad[0] + 1}")

        def col(name: str, default: float | None = None) -> np.ndarray:
            if name in p.columns:
                return p[name].to_numpy(np.float64)
            if default is None:
                raise ParticleFileError(f"{self.star_path}: rlnDefocusU given but column {name} is missing")
            return np.full(len(p), default)

        return CtfParams.from_arrays(
            defocus_u_angstrom=col("rlnDefocusU"),
            defocus_v_angstrom=col("rlnDefocusV" if "rlnDefocusV" in p.columns else "rlnDefocusU"),
            defocus_angle_degrees=col("rlnDefocusAngle", 0.0),
            voltage_kv=col("rlnVoltage"),
            spherical_aberration_mm=col("rlnSphericalAberration"),
            amplitude_contrast=col("rlnAmplitudeContrast"),
            phase_shift_degrees=col("rlnPhaseShift", 0.0),
            b_factor_angstrom2=col("rlnCtfBfactor") if "rlnCtfBfactor" in p.columns else None,
            scale=col("rlnCtfScalefactor") if "rlnCtfScalefactor" in p.columns else None,
        )

    def half_sets(self) -> torch.Tensor:
        """`(n,)` int64 half set (1/2): rlnRandomSubset if present, else the stable hash."""
        if "rlnRandomSubset" in self.particles.columns:
            values = pd.to_numeric(self.particles["rlnRandomSubset"], errors="coerce").to_numpy(np.float64)
            if bool(((values == 1) | (values == 2)).all()):
                return torch.from_numpy(values.astype(np.int64))
            raise ParticleFileError(f"{self.star_path}: rlnRandomSubset must be 1 or 2")
        return half_sets_for_particles(self.stack_paths, self.image_indices)

    def select(self, rows: np.ndarray) -> ParticleTable:
        """The table restricted to `(m,)` int64 ``rows`` (0-based, in that order; particles renumbered)."""
        rows = np.asarray(rows, dtype=np.int64)
        return ParticleTable(self.star_path, self.particles.iloc[rows].reset_index(drop=True), self.optics,
                             self.stack_paths[rows], self.image_indices[rows], self.apix, self.box)


def _fail(path: Path, message: str) -> ParticleFileError:
    return ParticleFileError(f"{path}: {message}")


def _checked_block(path: Path, block: pd.DataFrame, name: str) -> pd.DataFrame:
    """``block`` with its :data:`_NUMBERS` columns as numbers; ParticleFileError (naming the column, the value
    and the row) for a column given twice, a text value in a number column, or a NaN or Inf where a number
    must be finite (every number column but the defoci, which :meth:`ParticleTable.ctf` checks)."""
    repeated = block.columns[block.columns.duplicated()]
    if len(repeated):
        raise _fail(path, f"column {repeated[0]} appears twice in {name}")
    block = block.copy()
    for column in [c for c in _NUMBERS if c in block.columns]:
        given = block[column]
        values = pd.to_numeric(given, errors="coerce") if not pd.api.types.is_numeric_dtype(given) else given
        values = values.astype(np.float64) if pd.api.types.is_bool_dtype(values) else values
        text = values.isna() & given.notna()
        unusable = text | (~np.isfinite(values.to_numpy(np.float64)) & (column not in _MAY_BE_NAN))
        if bool(unusable.any()):
            row = int(np.nonzero(unusable.to_numpy())[0][0])
            shown = repr(given.iloc[row]) if isinstance(given.iloc[row], str) else f"{given.iloc[row]}"
            what = "numbers" if bool(text.any()) else "finite numbers"
            if column in _ANGLES:
                raise _fail(path, f"rlnAngleRot/Tilt/Psi must be finite numbers, got {column} {shown} at row "
                            f"{row + 1} of {name}")
            raise _fail(path, f"column {column} of {name} must hold {what}, got {shown} at row {row + 1}")
        if column in _POSITIVE and not bool((values > 0).all()):
            row = int(np.nonzero((values <= 0).to_numpy())[0][0])
            raise _fail(path, f"column {column} of {name} must be positive, got {given.iloc[row]} at row {row + 1}")
        if column == "rlnOpticsGroup":  # merged on: integers on both sides (an int/float merge casts and warns)
            whole = (values == np.round(values)) & (values >= 1) & (values < 2**31)
            if not bool(whole.all()):
                row = int(np.nonzero(~whole.to_numpy())[0][0])
                raise _fail(path, f"column rlnOpticsGroup of {name} must hold optics group numbers 1, 2, ..., got "
                            f"{given.iloc[row]} at row {row + 1}")
            values = values.astype(np.int64)
        block[column] = values
    return block


def _particles_block(path: Path, blocks: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "particles" in tables:
        return tables["particles"], tables.get("optics")
    with_images = [t for t in tables.values() if "rlnImageName" in t.columns]
    if len(with_images) == 1:
        return with_images[0], tables.get("optics")
    raise _fail(path, "no data_particles block (nor a single block with rlnImageName)")


def _merge_optics(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> pd.DataFrame:
    if optics is None:
        return particles
    if "rlnOpticsGroup" not in optics.columns:
        raise _fail(path, "data_optics has no rlnOpticsGroup column")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise _fail(path, "particles lack rlnOpticsGroup but there are several optics groups")
        particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    repeated = optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()]
    if len(repeated):
        raise _fail(path, f"data_optics defines optics group {repeated.iloc[0]} more than once")
    undefined = ~particles["rlnOpticsGroup"].isin(optics["rlnOpticsGroup"])
    if bool(undefined.any()):
        group = particles["rlnOpticsGroup"][undefined].iloc[0]
        raise _fail(path, f"particles refer to optics group {group}, which data_optics does not define")
    extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
    return particles.merge(optics[extra], on="rlnOpticsGroup", how="left", validate="many_to_one")


def _pixel_size(path: Path, particles: pd.DataFrame, apix: float | None) -> float:
    for column in ("rlnImagePixelSize", "rlnPixelSize"):
        if column in particles.columns:
            values = particles[column].to_numpy(np.float64)
            if not np.allclose(values, values[0], rtol=1e-4):
                raise _fail(path, f"{column} differs between optics groups; one pixel size is required")
            return float(values[0])
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(particles.columns):
        return float(particles["rlnDetectorPixelSize"].iloc[0] * 1e4 / particles["rlnMagnification"].iloc[0])
    if apix is not None:
        if not (math.isfinite(apix) and apix > 0):
            raise _fail(path, f"pixel size {apix} Å given; it must be a positive number")
        return float(apix)
    raise _fail(path, "no pixel size (rlnImagePixelSize in data_optics); pass --apix")


def path_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, every symlink followed, lies in ``root`` (also resolved); nothing is opened.

    A path that cannot be resolved (a symlink loop, a NUL character, a name too long) is not inside.
    """
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):  # RuntimeError: pathlib's symlink loop before Python 3.13
        return False
    return True


def _shown(path: Path) -> str:
    """``path`` with its symlinks followed where that is possible (a NUL byte: as written), on one line."""
    try:
        return printable(os.path.realpath(path))
    except ValueError:
        return printable(str(path))


def _resolve_stack(star_path: Path, name: str, root: Path | None = None) -> Path | None:
    """The stack ``name`` resolved (symlinks followed), or ``None`` if missing; ParticleFileError, before anything
    is opened, if ``root`` is given and the stack (or the place a symlink leads to) lies outside it."""
    candidate = Path(name)
    star_dir = star_path.parent
    # an absolute name as it is; a relative one in the STAR file's folder, then up to 3 of its
    # parents (RELION job folders sit 2 levels below the project directory the names are
    # relative to), then cwd
    places = [candidate] if candidate.is_absolute() else \
        [base / candidate for base in (star_dir, *list(star_dir.resolve().parents)[:3], Path.cwd())]
    for place in places:
        if root is not None and not path_inside(place, root):
            if place.is_absolute() and candidate.is_absolute() or os.path.lexists(place):
                raise _fail(star_path, f"names stack {_shown(place)} outside the watched directory {root}")
            continue  # nothing there: look further, never open it
        if _is_file(place):
            return place.resolve()
    return None


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file (symlinks followed); ``False`` for a name the OS refuses (too long,
    a NUL byte: ``Path.is_file`` raises for ENAMETOOLONG)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_particles(path: str | os.PathLike[str], apix: float | None = None,
                   root: str | os.PathLike[str] | None = None) -> ParticleTable:
    """Read and validate a RELION particle STAR file.

    Every stack named is opened once to check that it exists, is MRC, holds the
    indices asked for and has the same square box as the others (and as
    rlnImageSize). Any problem raises :class:`ParticleFileError` with one line.

    Parameters
    ----------
    path: str | os.PathLike[str]
        STAR file.
    apix: float | None
        Pixel size (Å) to use when the file gives none.
    root: str | os.PathLike[str] | None
        A directory every stack must lie in, symlinks followed (the daemon's watched
        directory): a stack named outside it, by an absolute path, ``..`` or a symlink
        leading out, is a ParticleFileError raised before that stack is opened.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - starfile raises many types on bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _fail(path, f"not a readable STAR file ({type(exc).__name__}: {first})") from None
    if not isinstance(blocks, dict) or not blocks:
        raise _fail(path, "not a STAR file with data blocks")
    particles, optics = _particles_block(path, blocks)
    particles = _checked_block(path, particles, "the particles")
    optics = None if optics is None else _checked_block(path, optics, "data_optics")
    missing = [c for c in ["rlnImageName"] if c not in particles.columns]
    if missing:
        raise _fail(path, f"missing required column(s): {', '.join(missing)}")
    given = [c for c in _ANGLES if c in particles.columns]
    if given and len(given) < len(_ANGLES):  # poses are optional, but all three angles or none
        raise _fail(path, f"missing required column(s): {', '.join(c for c in _ANGLES if c not in given)} "
                    f"(rlnAngleRot/Tilt/Psi go together)")
    if len(particles) == 0:
        raise _fail(path, "the particle block is empty")
    particles = _merge_optics(path, particles.reset_index(drop=True), optics)
    numeric = [c for c in given if not pd.api.types.is_numeric_dtype(particles[c])]
    if numeric or (given and not np.isfinite(particles[_ANGLES].to_numpy(np.float64)).all()):
        raise _fail(path, "rlnAngleRot/Tilt/Psi must be finite numbers")
    pixel_size = _pixel_size(path, particles, apix)

    names = particles["rlnImageName"].astype(str)
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any() or not parts[0].str.fullmatch(r"[0-9]{1,18}").all():
        bad = names[~names.str.fullmatch(r"[0-9]{1,18}@.+")].iloc[0]
        raise _fail(path, f"rlnImageName {bad!r} is not of the form N@stack.mrcs (N a 1-based image number)")
    indices = parts[0].astype(np.int64).to_numpy()
    stack_names = parts[1].to_numpy(dtype=str)

    stack_paths = np.empty(len(particles), dtype=object)
    box = None
    for name in map(str, np.unique(stack_names)):
        resolved = _resolve_stack(path, name, None if root is None else Path(root))
        if resolved is None:
            raise _fail(path, f"image name points at missing stack {name!r}")
        n_images, side, _ = stack_shape(resolved)
        rows = stack_names == name
        wanted = indices[rows]
        bad = wanted[(wanted < 1) | (wanted > n_images)]
        if bad.size:
            raise _fail(path, f"stack {name!r} holds images 1..{n_images} but image {int(bad[0])} is requested")
        if box is None:
            box = side
        elif side != box:
            raise _fail(path, f"stack {name!r} has box {side} px but other stacks have {box} px")
        stack_paths[rows] = str(resolved)
    assert box is not None
    if "rlnImageSize" in particles.columns and not (particles["rlnImageSize"] == box).all():
        other = particles["rlnImageSize"][particles["rlnImageSize"] != box].iloc[0]
        raise _fail(path, f"rlnImageSize {other:g} does not match the stacks' box {box}")
    return ParticleTable(
        star_path=path, particles=particles, optics=optics, stack_paths=stack_paths.astype(str),
        image_indices=indices, apix=pixel_size, box=int(box),
    )


def write_particles(path: str | os.PathLike[str], particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    """Write a RELION 3.1 particle STAR file (data_optics + data_particles), atomically.

    Text values (rlnImageName) are written by the file-name rule of
    :mod:`~cryofastar.recon.io.names`: double-quoted if they hold whitespace or ``#``, so
    that RELION and starfile (and :func:`read_particles`) read them back unchanged.

    Raises
    ------
    ParticleFileError
        A text value no STAR reader gets back (a control character such as a tab or a
        newline, a byte that is not UTF-8, a quote); nothing is written then.
    """
    blocks = {}
    for name, block in (("optics", optics), ("particles", particles)):
        block = block.copy()
        for column in block.columns:
            try:
                block[column] = star_column(block[column])
            except ValueError as exc:
                raise ParticleFileError(f"{path}: cannot write {column} {exc}") from None
        blocks[name] = block
    with atomic_path(path) as tmp:  # quote_character "": the values above are quoted already
        starfile.write(blocks, tmp, overwrite=True, quote_character="")
