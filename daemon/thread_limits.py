"""Limit the CPU threads of torch's operations for the calling thread only.

``torch.set_num_threads`` is not a per-thread setting on an MKL build: it sets OpenMP's
thread count of the calling thread (per thread) **and** MKL's, which is global, so a lane
that calls it slows every other lane's FFTs and matrix products (measured: the 3D lane
took 17 % longer to hold a session when the 2D lane called it). Both libraries have a
per-thread form, ``omp_set_num_threads`` (OpenMP's ``nthreads-var`` is per thread) and
``MKL_Set_Num_Threads_Local``; torch's CPU library exports both on x86-64 Linux wheels.
:func:`limit_this_thread` calls them when they are there and does nothing otherwise
(another platform or build): the limit is an optimisation, never a requirement.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["limit_this_thread"]


@cache
def _library() -> ctypes.CDLL | None:
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def limit_this_thread(threads: int) -> bool:
    """Let torch's CPU operations started from this thread use at most ``threads`` threads.

    Returns whether both OpenMP's and MKL's per-thread limits were set (``False``: the
    library or one of the functions is missing and nothing was changed).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    lib = _library()
    if lib is None or not all(hasattr(lib, f) for f in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local")):
        logger.debug("no per-thread limit of torch's threads on this build")
        return False
    torch.get_num_threads()  # torch's lazy per-thread start-up first: it would re-apply a global count after us
    lib.omp_set_num_threads(ctypes.c_int(threads))
    lib.MKL_Set_Num_Threads_Local(ctypes.c_int(threads))
    return True
