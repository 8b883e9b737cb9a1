"""How the poser gathers particles into forward passes.

Particles arrive in chunks (a file's images, ``read_chunk`` at a time). The poser runs
the network on full calls only (``unit`` new particles each: ``sets_per_pass`` passes of
``batch - 1 - anchors``); the remainder waits for more particles, or for
``flush_seconds`` after the first waiting particle arrived, or for the session to stop.
Before the session reference is chosen, the first call takes everything waiting once
at least ``wanted`` particles (the reference candidates) are there.
"""

from __future__ import annotations

import time

from cryofastar.recon.io import ParticleChunk

__all__ = ["PassGatherer", "take_particles"]


def take_particles(chunks: list[ParticleChunk], k: int) -> tuple[list[ParticleChunk], list[ParticleChunk]]:
    """The first ``k`` particles of ``chunks`` and the rest (a chunk is split where needed)."""
    head: list[ParticleChunk] = []
    for i, chunk in enumerate(chunks):
        if k <= 0:
            return head, chunks[i:]
        if len(chunk) <= k:
            head.append(chunk)
            k -= len(chunk)
        else:
            first, rest = chunk.split(k)
            return [*head, first], [rest, *chunks[i + 1 :]]
    return head, []


class PassGatherer:
    """Particles waiting for the next forward call (one thread: the poser).

    Parameters
    ----------
    flush_seconds: float
        A partial call runs this long after its first particle arrived.
    """

    def __init__(self, flush_seconds: float) -> None:
        self.flush_seconds = flush_seconds
        self._waiting: list[ParticleChunk] = []
        self._count = 0
        self._first_at: float | None = None  # monotonic arrival of the oldest waiting particle

    @property
    def waiting(self) -> int:
        """Particles waiting."""
        return self._count

    def add(self, chunk: ParticleChunk, now: float | None = None) -> None:
        """A chunk arrived (at monotonic time ``now``, default now)."""
        self._waiting.append(chunk)
        self._count += len(chunk)
        if self._first_at is None:
            self._first_at = time.monotonic() if now is None else now

    def due(self, now: float | None = None) -> bool:
        """Whether the oldest waiting particle has waited ``flush_seconds``."""
        now = time.monotonic() if now is None else now
        return self._first_at is not None and now - self._first_at >= self.flush_seconds

    def timeout(self, now: float | None = None) -> float | None:
        """How long to wait for the next chunk before a partial call is due (``None``: nothing waits)."""
        if self._first_at is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.01, self.flush_seconds - (now - self._first_at))

    def next_call(self, unit: int, wanted: int, whole_calls: bool, flush: bool = False,
                  now: float | None = None) -> list[ParticleChunk]:
        """The particles of the next forward call, or ``[]`` while it should wait.

        Call :meth:`restart_clock` once that call has run.

        Parameters
        ----------
        unit: int
            New particles one full call holds.
        wanted: int
            Particles that make a call worth running now.
        whole_calls: bool
            Take only whole multiples of ``unit`` (the rest waits); otherwise take all.
        flush: bool
            Take everything waiting now (stopping).
        now: float | None
            Monotonic time (default: now).
        """
        now = time.monotonic() if now is None else now
        due = self.due(now)
        if not self._waiting or not (self._count >= wanted or due or flush):
            return []
        take = self._count if (due or flush or not whole_calls) else (self._count // unit) * unit
        batch, self._waiting = take_particles(self._waiting, take)
        self._count = sum(len(c) for c in self._waiting)
        return batch

    def restart_clock(self, now: float | None = None) -> None:
        """A call finished: what still waits gets a fresh ``flush_seconds`` from ``now`` (default now)."""
        self._first_at = (time.monotonic() if now is None else now) if self._waiting else None
