"""Which particles a session holds: the ingestion journal.

A particle is identified by its resolved stack path and its 1-based index in that
stack (RELION's ``N@stack``), whichever file (a bare stack or a STAR naming it)
brought it. The journal records those identities as one boolean mask per stack, so
"is this particle new?" is a vectorised lookup, not a loop over particles.

The daemon keeps two journals (see :mod:`cryofastar.daemon.pipeline`): *taken*
(read from disk and in flight) and *accumulated* (inserted into the map). Only the
accumulated journal is checkpointed, atomically with the accumulator: after a crash
the daemon re-reads what it had taken but not yet accumulated, and never inserts a
particle twice.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["IngestJournal"]


class IngestJournal:
    """Set of ``(stack, index)`` particle identities, stored per stack as a mask.

    Safe to share between threads (the daemon's reader adds, later stages may remove).
    """

    def __init__(self) -> None:
        self._masks: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return int(sum(int(mask.sum()) for mask in self._masks.values()))

    def __repr__(self) -> str:
        return f"IngestJournal(stacks={len(self._masks)}, particles={len(self)})"

    @property
    def stacks(self) -> list[str]:
        """Stacks with at least one particle recorded."""
        with self._lock:
            return [s for s, m in self._masks.items() if m.any()]

    def count(self, stack: str) -> int:
        """Particles of ``stack`` recorded."""
        with self._lock:
            mask = self._masks.get(stack)
            return 0 if mask is None else int(mask.sum())

    def contains(self, stacks: str | np.ndarray, indices: np.ndarray) -> np.ndarray:
        """`(n,)` bool: which particles are recorded.

        ``stacks`` is one stack for all ``indices`` or `(n,)` stacks, one per index
        (grouped per stack, vectorised within).
        """
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            return get_per_stack(self._masks, stacks, indices, bool)

    def add(self, stacks: str | np.ndarray, indices: np.ndarray) -> None:
        """Record particles (recording twice is harmless); ``stacks`` as in :meth:`contains`."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            set_per_stack(self._masks, stacks, indices, True, bool)

    def remove(self, stacks: str | np.ndarray, indices: np.ndarray) -> None:
        """Forget particles (e.g. ones that failed downstream); ``stacks`` as in :meth:`contains`."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            for stack, rows in _groups(stacks, indices):
                mask = self._masks.get(stack)
                if mask is None:
                    continue
                wanted = indices[rows]
                wanted = wanted[(wanted >= 1) & (wanted <= mask.size)]
                mask[wanted - 1] = False

    def copy(self) -> IngestJournal:
        """An independent copy."""
        other = IngestJournal()
        with self._lock:
            other._masks = {s: m.copy() for s, m in self._masks.items()}
        return other

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{stack: 1-based indices}`` (compact, picklable)."""
        with self._lock:
            return {s: np.nonzero(m)[0].astype(np.int64) + 1 for s, m in self._masks.items() if m.any()}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> IngestJournal:
        """Inverse of :meth:`state_dict`."""
        journal = cls()
        for stack, indices in state.items():
            journal.add(stack, indices)
        return journal


def _groups(stacks: str | np.ndarray, indices: np.ndarray):  # noqa: ANN202 - a generator of (str, rows)
    """``(stack, rows)`` for one stack name, or for each distinct name of a `(n,)` array."""
    if isinstance(stacks, str):
        yield stacks, slice(None)
        return
    stacks = np.asarray(stacks)
    if stacks.shape != indices.shape:
        raise ValueError(f"{stacks.shape[0]} stacks for {indices.shape[0]} indices")
    for stack in np.unique(stacks):  # one group per stack, not per particle
        yield str(stack), stacks == stack


def set_per_stack(store: dict[str, np.ndarray], stacks: str | np.ndarray, indices: np.ndarray, values: object,
                  dtype: type) -> None:
    """``store[stack][index - 1] = value`` for each particle, growing each stack's array as needed.

    ``indices`` `(n,)` int64, 1-based; ``stacks`` one name or `(n,)`; ``values`` one value or `(n,)`. The
    caller holds its lock. Raises ValueError for an index below 1.
    """
    if indices.size == 0:
        return
    if int(indices.min()) < 1:
        raise ValueError("particle indices are 1-based")
    for stack, rows in _groups(stacks, indices):
        wanted = indices[rows]
        array = store.get(stack, np.zeros(0, dtype=dtype))
        top = int(wanted.max())
        if top > array.size:
            array = np.concatenate([array, np.zeros(top - array.size, dtype=dtype)])
        array[wanted - 1] = values if np.ndim(values) == 0 else np.asarray(values)[rows]
        store[stack] = array


def get_per_stack(store: dict[str, np.ndarray], stacks: str | np.ndarray, indices: np.ndarray,
                  dtype: type) -> np.ndarray:
    """`(n,)` ``store[stack][index - 1]`` for each particle; zero (False) where nothing was set. The caller holds
    its lock."""
    out = np.zeros(indices.shape, dtype=dtype)
    for stack, rows in _groups(stacks, indices):
        array = store.get(stack)
        if array is None:
            continue
        wanted = indices[rows]
        inside = (wanted >= 1) & (wanted <= array.size)
        found = np.zeros(wanted.shape, dtype=dtype)
        found[inside] = array[wanted[inside] - 1]
        out[rows] = found
    return out
