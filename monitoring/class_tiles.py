"""What the dashboard draws of a 2D class set: one small greyscale PNG per class average.

Inputs are class averages as published (``docs/protocol.md``, ``classes``): `(K, B, B)`
float32, [class, y, x], centre at pixel ``B // 2``. Each average is block-averaged to at
most :data:`TILE_SIZE` pixels a side, scaled to its own min–max (display only, nothing
here is used for science) and encoded as an 8-bit greyscale PNG with row 0 at the
**bottom** (y up, as the page draws the map's slices and as an MRC viewer shows them).
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np

from .map_views import block_mean

__all__ = ["TILE_SIZE", "png_base64", "png_greyscale", "tile_images"]

TILE_SIZE = 64  # tiles are block-averaged to at most this many pixels a side (~5 kB of base64 each)


def tile_images(averages: np.ndarray, size: int = TILE_SIZE) -> np.ndarray:
    """The averages as display tiles: block-averaged, each scaled to its own min–max.

    Parameters
    ----------
    averages: np.ndarray
        `(K, B, B)` class averages [class, y, x].
    size: int
        Largest tile side; a bigger box is block-averaged by ``ceil(B / size)`` (edges
        cropped to a multiple of it).

    Returns
    -------
    np.ndarray
        `(K, b, b)` uint8, 0 at each tile's minimum and 255 at its maximum (a flat tile is 0).
    """
    averages = np.asarray(averages, dtype=np.float32)
    factor = max(1, math.ceil(averages.shape[-1] / size))
    if factor > 1:  # per class: block_mean averages blocks along every axis, the class axis must stay whole
        averages = np.stack([block_mean(image, factor) for image in averages]) if len(averages) else averages
    low = averages.min(axis=(1, 2), keepdims=True)
    span = averages.max(axis=(1, 2), keepdims=True) - low
    scaled = np.divide(averages - low, span, out=np.zeros_like(averages), where=span > 0)
    return np.round(scaled * 255).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_greyscale(image: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``image``, drawn with row 0 at the bottom.

    Parameters
    ----------
    image: np.ndarray
        `(h, w)` uint8, [y, x].

    Returns
    -------
    bytes
        The PNG file (no filter, zlib level 6).
    """
    image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[::-1])  # PNG rows go top to bottom
    height, width = image.shape
    rows = np.hstack([np.zeros((height, 1), np.uint8), image])  # filter type 0 before every row
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def png_base64(image: np.ndarray) -> str:
    """:func:`png_greyscale` as base64 text (what a ``data:image/png;base64,`` URL holds)."""
    return base64.b64encode(png_greyscale(image)).decode("ascii")
