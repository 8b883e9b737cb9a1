"""MRC stacks and volumes (mrcfile), with clear errors and atomic writes.

Arrays are [n, y, x] for stacks and [z, y, x] for volumes (mrcfile's order);
pixel size in Å is the header's voxel size.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import torch

from .atomic import atomic_path
from .errors import ParticleFileError

__all__ = ["read_images", "read_volume", "stack_shape", "write_stack", "write_volume"]


def _open(path: Path) -> mrcfile.mrcmmap.MrcMemmap:
    if not path.is_file():
        raise ParticleFileError(f"{path}: file not found")
    try:
        return mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ParticleFileError(f"{path}: not a readable MRC file ({exc})") from exc


def _stack_data(mrc: mrcfile.mrcmmap.MrcMemmap, path: Path) -> np.ndarray:
    """The open file's data as `(n_images, B, B)` (a single 2D image counts as 1)."""
    data = mrc.data if mrc.data.ndim != 2 else mrc.data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise ParticleFileError(f"{path}: expected a stack of square images, got shape {mrc.data.shape}")
    return data


def stack_shape(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """`(n_images, B, B)` of a particle stack (a single 2D image counts as 1)."""
    path = Path(path)
    with _open(path) as mrc:
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
    with _open(path) as mrc:
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
            out = np.array(data[idx - 1], dtype=np.float32)
    return torch.from_numpy(out)


def read_volume(path: str | os.PathLike[str]) -> tuple[torch.Tensor, float]:
    """Read a cubic map: `(B, B, B)` float32 [z, y, x] and its pixel size in Å."""
    path = Path(path)
    with _open(path) as mrc:
        data = np.array(mrc.data, dtype=np.float32)
        apix = float(mrc.voxel_size.x)
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
