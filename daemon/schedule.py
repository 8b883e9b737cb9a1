"""When the accumulator writes and publishes the map, and when it writes a checkpoint.

The map goes out when it changed since the last one (particles inserted or re-posed)
and either it is the session's first map (something to look at at once), or
``publish_seconds`` have passed, or ``publish_particles`` particles were added, or
refinement wants a fresher reference. The checkpoint (and ``particles.star``) is
written every ``checkpoint_seconds``. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import time

__all__ = ["OutputSchedule"]


class OutputSchedule:
    """The accumulator thread's clock for maps and checkpoints (not thread-safe: one thread uses it).

    Parameters
    ----------
    publish_seconds: float
        A changed map goes out once this long has passed since the last one.
    publish_particles: int
        ... or once this many particles were added since the last one.
    checkpoint_seconds: float
        Period of checkpoints.
    particles_in_map: int
        Particles in the map at the start (a resumed session).
    now: float | None
        Monotonic time of the start (default: now).
    """

    def __init__(self, publish_seconds: float, publish_particles: int, checkpoint_seconds: float,
                 particles_in_map: int = 0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.publish_seconds = publish_seconds
        self.publish_particles = publish_particles
        self.checkpoint_seconds = checkpoint_seconds
        self._last_map = (now, particles_in_map)  # (monotonic time, particles) of the last map
        self._edits_at_map = 0
        self._last_checkpoint = now

    def particles_arrived(self, has_map: bool, now: float | None = None) -> None:
        """Particles were inserted: the map clock starts with the session's first ones (not at start-up)."""
        if self._last_map[1] == 0 and not has_map:
            self._last_map = (time.monotonic() if now is None else now, 0)

    def changed(self, edits: int) -> bool:
        """Whether the map changed since the last one went out (``edits``: the running count of changes)."""
        return edits != self._edits_at_map

    def map_due(self, particles: int, edits: int, first: bool, wants_reference: bool,
                now: float | None = None) -> bool:
        """Whether to write and publish the map now.

        Parameters
        ----------
        particles: int
            Particles in the map.
        edits: int
            Running count of particles inserted or re-posed.
        first: bool
            No map was published yet in this session.
        wants_reference: bool
            Refinement asks for a (fresher) reference.
        now: float | None
            Monotonic time (default: now).
        """
        now = time.monotonic() if now is None else now
        last_t, last_n = self._last_map
        return bool(particles and self.changed(edits)
                    and (first or now - last_t >= self.publish_seconds
                         or particles - last_n >= self.publish_particles or wants_reference))

    def map_published(self, particles: int, edits: int, now: float | None = None) -> None:
        """A map of ``particles`` at ``edits`` changes went out."""
        self._last_map = (time.monotonic() if now is None else now, particles)
        self._edits_at_map = edits

    def checkpoint_due(self, now: float | None = None) -> bool:
        """Whether ``checkpoint_seconds`` have passed since the last checkpoint (or the start)."""
        return (time.monotonic() if now is None else now) - self._last_checkpoint >= self.checkpoint_seconds

    def checkpoint_written(self, now: float | None = None) -> None:
        """A checkpoint was written."""
        self._last_checkpoint = time.monotonic() if now is None else now
