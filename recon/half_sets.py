"""Stable assignment of particles to the two gold-standard half sets.

Rule (docs/conventions.md, "Half sets"): a particle that carries
``rlnRandomSubset`` (1 or 2) keeps it. Otherwise its half is a hash of its stack
file's *name* (not its directory) and its 1-based index in that stack, so the
assignment never depends on arrival order, batching or the machine: the same
particle always lands in the same half, and halves are balanced in expectation.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["half_sets_for_particles", "half_sets_for_stack"]

_MASK32 = 0xFFFFFFFF


def half_sets_for_stack(stack_name: str, indices: torch.Tensor) -> torch.Tensor:
    """Half set (1 or 2) of particles ``indices`` of the stack named ``stack_name``.

    Parameters
    ----------
    stack_name: str
        File name of the stack (``"job/mic_0001.mrcs"`` and ``"mic_0001.mrcs"``
        are the same stack: only the final component is hashed).
    indices: torch.Tensor
        `(n,)` 1-based particle indices within the stack (RELION ``N@stack``).

    Returns
    -------
    halves: torch.Tensor
        `(n,)` int64, each 1 or 2.
    """
    name = stack_name.replace("\\", "/").rsplit("/", 1)[-1]
    # the name's bytes as on disk: UTF-8, and an undecodable byte (os.fsdecode's lone surrogate) as itself
    seed = zlib.crc32(name.encode("utf-8", "surrogateescape"))
    x = (torch.as_tensor(indices, dtype=torch.int64) * 2654435761) & _MASK32
    x = x ^ seed
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    return 1 + (x & 1)


def half_sets_for_particles(stacks: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Half set (1 or 2) of particles given by stack path and 1-based index, in that order.

    :func:`half_sets_for_stack` once per stack (vectorised within it), not once per particle.

    Parameters
    ----------
    stacks: np.ndarray
        `(n,)` stack paths (str).
    indices: np.ndarray
        `(n,)` 1-based indices within them.

    Returns
    -------
    halves: torch.Tensor
        `(n,)` int64, each 1 or 2.
    """
    stacks, indices = np.asarray(stacks), np.asarray(indices, dtype=np.int64)
    halves = torch.empty(len(indices), dtype=torch.int64)
    for stack in np.unique(stacks):  # a loop over files, not particles
        where = np.nonzero(stacks == stack)[0]
        halves[where] = half_sets_for_stack(str(stack), torch.as_tensor(indices[where]))
    return halves
