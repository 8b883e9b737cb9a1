"""MRC stacks and volumes (mrcfile), with clear errors and atomic writes.

Arrays are [n, y, x] for stacks and [z, y, x] for volumes (mrcfile's order);
pixel size in Å is the header's voxel size.

Every reader checks the 1024-byte header against the file's size before mrcfile maps
the file or anything is allocated (:func:`check_header`): the dimensions must be
positive, the mode known, the space group not a stack of volumes (401-630), the data
the header claims must fit in the file, and an
image side (nx, ny) may be at most :data:`MAX_IMAGE_SIDE` px (a volume at most
:data:`MAX_VOLUME_SIDE` px on each axis) and a stack may claim at most
:data:`MAX_STACK_IMAGES` images; and the file must hold no bytes after the data the
header claims. A file that fails raises :class:`ParticleFileError` (one line), never an
``OverflowError``, a warning or a huge allocation: a sparse file can have the size an
absurd header asks for.

Modes (:data:`READ_MODES`, docs/conventions.md "Files"; checked on RELION 3.1.3's
``relion_image_handler``): 0 (int8, signed as RELION reads it), 1 (int16), 2 (float32), 6
(uint16) and 12 (float16: RELION 3.1 refuses it, RELION 4 and later read it) are read
and converted to float32, exactly. Complex modes 3 and 4 are refused (RELION: "only
real-space images may be read"), as is every other mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import mrcfile
import numpy as np
import torch
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import byte_order_from_machine_stamp, dtype_from_mode

from .atomic import atomic_path
from .errors import ParticleFileError

__all__ = ["MAX_IMAGE_SIDE", "MAX_STACK_IMAGES", "MAX_VOLUME_SIDE", "READ_MODES", "check_header", "open_mrc",
           "read_images", "read_volume", "stack_shape", "typical_image_rms", "voxel_size", "write_stack",
           "write_volume"]

MAX_IMAGE_SIDE = 4096
"""Largest image side (header nx and ny, px) the readers accept: 64 MiB per float32 image.
Particle boxes are a few hundred px; a larger header is corrupt (docs/conventions.md, Files)."""
MAX_VOLUME_SIDE = 1024
"""Largest side (px) of a map :func:`read_volume` reads whole: 4 GiB as float32."""
MAX_STACK_IMAGES = 1_000_000
"""Most images (header nz) a stack may claim. A header's claim costs memory before any pixel is read (each
image's stack path and name are listed, ~8 bytes per character of the path), and a sparse file can have the
size any claim needs; particle stacks hold hundreds to a few 10^5 images."""
_HEADER_BYTES = 1024
def _quiet_nan_cast() -> np.errstate:
    """Converting a signalling NaN (e.g. in a float16 stack) to float32 raises the FPU's 'invalid' flag, which
    numpy reports as a RuntimeWarning; the NaN itself is what the pixel policy (recon/io/source.py) reports, so
    the cast is quiet."""
    return np.errstate(invalid="ignore")


READ_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
"""MRC modes the readers take (converted to float32; module docstring)."""
_REFUSED_MODES = {3: "complex int16", 4: "complex float32"}


def _unreadable(path: Path, why: object) -> ParticleFileError:
    text = str(why).splitlines()[0] if str(why) else type(why).__name__
    return ParticleFileError(f"{path}: not a readable MRC file ({text})")


def check_header(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """`(nx, ny, nz)` of an MRC file whose header is consistent with its size (nothing else is read).

    Raises
    ------
    ParticleFileError
        Missing file; shorter than a header; unknown machine stamp or mode; a dimension
        that is not positive; a stack of volumes (space group 401-630); nx or ny above
        :data:`MAX_IMAGE_SIDE`; nz above :data:`MAX_STACK_IMAGES`; a negative extended
        header; or a file size other than the header's (more data claimed than the file
        holds: truncated; bytes after the data).
    """
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):  # Path.is_file raises for some (a name too long)
        regular = False
    if not regular:
        raise ParticleFileError(f"{path}: file not found")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_HEADER_BYTES)
        size = path.stat().st_size
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if len(raw) < _HEADER_BYTES:
        raise _unreadable(path, f"{len(raw)} bytes, shorter than an MRC header")
    header = np.frombuffer(raw, dtype=HEADER_DTYPE)[0]
    try:
        order = byte_order_from_machine_stamp(header["machst"])
    except ValueError as exc:
        raise _unreadable(path, exc) from None
    header = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(order))[0]
    nx, ny, nz, mode, extended = (int(header[k]) for k in ("nx", "ny", "nz", "mode", "nsymbt"))
    if min(nx, ny, nz) < 1:
        raise _unreadable(path, f"header dimensions {nx} x {ny} x {nz} are not all positive")
    if max(nx, ny) > MAX_IMAGE_SIDE:
        raise _unreadable(path, f"header claims {nx} x {ny} px images; at most {MAX_IMAGE_SIDE} px are accepted")
    ispg = int(header["ispg"])
    if 401 <= ispg <= 630:  # mrcfile reads a stack of volumes, (nz // mz, mz, ny, nx): mz 0 divides by zero
        raise _unreadable(path, f"space group {ispg} marks a stack of volumes (nz {nz}, mz {int(header['mz'])}), "
                          "neither particle images nor one map")
    if nz > MAX_STACK_IMAGES:
        raise _unreadable(path, f"header claims {nz} images; at most {MAX_STACK_IMAGES} per stack are read")
    if extended < 0:
        raise _unreadable(path, f"negative extended header size {extended}")
    if mode in _REFUSED_MODES:
        raise _unreadable(path, f"mode {mode} ({_REFUSED_MODES[mode]}) holds Fourier-space data; particle images "
                          "are real (modes 0, 1, 2, 6, 12)")
    try:
        itemsize = dtype_from_mode(mode).itemsize
    except ValueError as exc:
        raise _unreadable(path, exc) from None
    if mode not in READ_MODES:
        raise _unreadable(path, f"mode {mode} is not read (modes 0, 1, 2, 6, 12)")
    needed = _HEADER_BYTES + extended + nx * ny * nz * itemsize  # Python ints: no overflow
    if needed > size:
        raise _unreadable(path, f"truncated: the header claims {needed} bytes, the file has {size}")
    if needed < size:  # more images than nz (a stack still growing?) or junk: the header does not describe it
        raise _unreadable(path, f"{size - needed} bytes after the data the header claims ({needed} bytes); the "
                          "header does not describe the file")
    return nx, ny, nz


def open_mrc(path: str | os.PathLike[str]) -> mrcfile.mrcmmap.MrcMemmap:
    """The file memory-mapped read-only, after :func:`check_header` (ParticleFileError, one line, if unusable)."""
    path = Path(path)
    check_header(path)
    try:
        return mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError, OverflowError) as exc:
        raise _unreadable(path, exc) from None



def voxel_size(mrc: mrcfile.mrcmmap.MrcMemmap) -> float:
    """The header's pixel size along x in Å (cella.x / mx); NaN or Inf, without a warning, if mx is 0."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return float(mrc.voxel_size.x)


def _stack_data(mrc: mrcfile.mrcmmap.MrcMemmap, path: Path) -> np.ndarray:
    """The open file's data as `(n_images, B, B)` (a single 2D image counts as 1)."""
    data = mrc.data if mrc.data.ndim != 2 else mrc.data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ParticleFileError(f"{path}: expected a stack of square images, got shape {mrc.data.shape}")
    return data


def stack_shape(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """`(n_images, B, B)` of a particle stack (a single 2D image counts as 1)."""
    path = Path(path)
    with open_mrc(path) as mrc:
        n_images, box, _ = _stack_data(mrc, path).shape
    return (int(n_images), int(box), int(box))


def read_images(path: str | os.PathLike[str], indices: np.ndarray | None = None) -> torch.Tensor:
    """Read images from a stack.

    Parameters
    ----------
    path: str | os.PathLike[str]
        ``.mrcs`` / ``.mrc`` stack.
    indices: np.ndarray | None
        `(n,)` 1-based image numbers (RELION ``N@stack``); ``None`` reads all.

    Returns
    -------
    images: torch.Tensor
        `(n, B, B)` float32 [n, y, x].
    """
    path = Path(path)
    with open_mrc(path) as mrc, _quiet_nan_cast():
        data = _stack_data(mrc, path)
        if indices is None:
            out = np.array(data, dtype=np.float32)
        else:
            n_images = data.shape[0]
            idx = np.asarray(indices, dtype=np.int64)
            bad = idx[(idx < 1) | (idx > n_images)]
            if bad.size:
                raise ParticleFileError(
                    f"{path}: image {int(bad[0])} requested but the stack holds {n_images}"
                )
            out = data[idx - 1].astype(np.float32, copy=False)  # the indexing copied: no second copy
    return torch.from_numpy(out)


def typical_image_rms(path: str | os.PathLike[str], sample: int = 15) -> float:
    """Median RMS (about each image's mean) of up to ``sample`` images spread evenly through a stack.

    The scale the pixel policy (:mod:`~cryofastar.recon.io.source`) compares images with;
    it depends on the stack alone, not on which images a read asks for. Images with a
    non-finite pixel are not counted (0.0 if none is left). One image in memory at a time.
    """
    path = Path(path)
    with open_mrc(path) as mrc, _quiet_nan_cast():
        data = _stack_data(mrc, path)
        picks = np.unique(np.linspace(0, data.shape[0] - 1, min(sample, data.shape[0])).round().astype(np.int64))
        rms = []
        for k in picks:
            image = np.asarray(data[int(k)], dtype=np.float32).astype(np.float64)
            if np.isfinite(image).all():
                rms.append(float(np.sqrt(np.mean((image - image.mean()) ** 2))))
    return float(np.median(rms)) if rms else 0.0


def read_volume(path: str | os.PathLike[str]) -> tuple[torch.Tensor, float]:
    """Read a cubic map: `(B, B, B)` float32 [z, y, x] and its pixel size in Å."""
    path = Path(path)
    nx, ny, nz = check_header(path)
    if max(nx, ny, nz) > MAX_VOLUME_SIDE:
        raise _unreadable(path, f"header claims a {nx} x {ny} x {nz} map; at most {MAX_VOLUME_SIDE} px a side "
                          "are read")
    with open_mrc(path) as mrc:
        data = np.array(mrc.data, dtype=np.float32)
        apix = voxel_size(mrc)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise ParticleFileError(f"{path}: expected a cubic volume, got shape {data.shape}")
    return torch.from_numpy(data), apix


def _write(path: str | os.PathLike[str], array: np.ndarray, apix: float, volume: bool) -> None:
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(array, dtype=np.float32))
            if volume:
                mrc.set_volume()
            else:
                mrc.set_image_stack()
            mrc.voxel_size = float(apix)


def write_volume(path: str | os.PathLike[str], volume: torch.Tensor, apix: float) -> None:
    """Write a `(B, B, B)` map [z, y, x] as float32 MRC with pixel size ``apix`` Å (atomic)."""
    _write(path, volume.detach().cpu().numpy(), apix, volume=True)


def write_stack(path: str | os.PathLike[str], images: torch.Tensor, apix: float) -> None:
    """Write `(n, B, B)` images [n, y, x] as a float32 ``.mrcs`` stack (atomic)."""
    _write(path, images.detach().cpu().numpy(), apix, volume=False)
