"""Give the heap memory freed by a long session back to the operating system.

A session allocates and frees large temporary tensors all day (score tables of the pose
search, re-posing batches, maps of every publication). On Linux, glibc's allocator keeps
freed memory in its arenas (one per thread that allocated) and returns it to the system
only from the top of each heap, so the daemon's resident memory (RSS) creeps up with
fragmentation although nothing is leaked: +16 % (median) over an hour's soak before this
module (docs/reliability.md). :func:`release_free_memory` calls ``malloc_trim(0)``,
which gives back every free page of every arena; the daemon calls it after each published
map. Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

__all__ = ["release_free_memory"]

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():  # noqa: ANN202 - a ctypes function or None
    """glibc's ``int malloc_trim(size_t pad)``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        logger.debug("no malloc_trim in the C library %r: freed memory stays with the allocator", name)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the system (``malloc_trim(0)``).

    Returns
    -------
    bool
        True if memory was given back, False if none was or the C library cannot.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
