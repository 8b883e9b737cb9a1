"""What the live dashboard knows: built only from the published stream (docs/protocol.md).

:class:`DashboardState` takes decoded ``volume``, ``status`` and ``classes`` messages and
keeps what the page shows, as JSON-ready sections:

- ``map``: slices, projections, isosurface grid, FSC curve, particles, resolution;
- ``classes``: the latest 2D class set, largest class first, each with a small PNG of its
  average (:mod:`.class_tiles`), its number, particle count, resolution and junk flag;
- ``resolution_history``: rows ``[unix time, particles, resolution Å or None]``;
- ``throughput``: rows ``[unix time, particles in map, particles/s, particles ingested]``
  from each status message (at most :data:`MAX_POINTS`, oldest dropped);
- ``status``: the latest status body (queues, rejected files, view histogram, session
  parameters);
- ``connection``: the daemon's endpoint, session id, restarts seen and whether the
  stream is ``waiting`` (nothing yet), ``live`` or ``stale`` (silent for longer than
  ``stale_seconds``; the daemon re-sends its map every 5 s and status every second).

:meth:`DashboardState.apply` returns the sections a message changed, which the server
sends to every open page; :meth:`DashboardState.snapshot` is everything, for a page that
just connected.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

from cryofastar.protocol import ClassesMessage, StatusMessage, VolumeMessage

from .class_tiles import png_base64, tile_images
from .map_views import isosurface_grid, map_views

__all__ = ["MAX_POINTS", "MAX_TILES", "DashboardState"]

MAX_POINTS = 7200  # throughput points kept (2 h at one status message per second)
MAX_TILES = 200  # class tiles sent to the page (the largest classes): at most ~1 MB of PNGs


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


class DashboardState:
    """Latest map, curves and counters of one daemon's stream.

    Parameters
    ----------
    endpoint: str
        The ZeroMQ address subscribed to (shown on the page).
    stale_seconds: float
        Silence after which the stream is called ``stale``.
    clock: callable
        Monotonic clock (tests pass their own).
    """

    def __init__(self, endpoint: str, stale_seconds: float = 12.0, clock=time.monotonic) -> None:  # noqa: ANN001
        self.endpoint = endpoint
        self.stale_seconds = float(stale_seconds)
        self._clock = clock
        self.session: str | None = None
        self.restarts = 0
        self.messages = 0
        self.malformed = 0
        self.last_error: str | None = None
        self._last_message: float | None = None
        self._map_key: tuple[str, int] | None = None
        self.map: dict[str, Any] | None = None
        self.resolution_history: list[list[float | None]] = []
        self.throughput: collections.deque[list[float | None]] = collections.deque(maxlen=MAX_POINTS)
        self.status: dict[str, Any] | None = None
        self._classes_key: tuple[str, int] | None = None
        self.classes: dict[str, Any] | None = None

    # ------------------------------------------------------------------ input
    def apply(self, message: VolumeMessage | StatusMessage | ClassesMessage) -> dict[str, Any]:
        """Take one decoded message; return the changed sections (empty if nothing changed)."""
        self.messages += 1
        self._last_message = self._clock()
        changed: dict[str, Any] = {}
        if message.session != self.session:
            if self.session is not None:
                self.restarts += 1
            self.session = message.session
        if isinstance(message, VolumeMessage):
            key = (message.session, message.seq)
            if key != self._map_key:  # re-sent maps are byte-identical: drawn once
                self._map_key = key
                self.map = self._map_section(message)
                self._record_history(message)
                changed.update(map=self.map, resolution_history=self.resolution_history)
        elif isinstance(message, StatusMessage):
            self.status = dict(message.status)
            row = [message.time, message.status.get("particles_in_map"), message.status.get("particles_per_second"),
                   message.status.get("particles_ingested")]
            self.throughput.append(row)
            changed.update(status=self.status, throughput_point=row)
        elif isinstance(message, ClassesMessage):
            key = (message.session, message.seq)
            if key != self._classes_key:  # a re-sent class set is drawn once
                self._classes_key = key
                self.classes = self._classes_section(message)
                changed.update(classes=self.classes)
        changed["connection"] = self.connection()
        return changed

    def note_malformed(self, error: str) -> dict[str, Any]:
        """Count a message that could not be decoded (shown on the page, never fatal)."""
        self.malformed += 1
        self.last_error = error
        return {"connection": self.connection()}

    def _map_section(self, message: VolumeMessage) -> dict[str, Any]:
        frequency = 1.0 / message.fsc_resolution_angstrom  # the DC shell's inf Å -> 0 per Å
        return {
            "time": message.time,
            "session": message.session,
            "seq": message.seq,
            "box": message.box,
            "apix": message.apix,
            "particles": message.particles,
            "resolution_angstrom": _finite(message.resolution_angstrom),
            "fsc_threshold": message.fsc_threshold,
            "fsc": {"frequency_per_angstrom": [round(float(f), 5) for f in frequency],
                    "fsc": [_finite(v) for v in message.fsc]},
            "views": map_views(message.volume),
            "isosurface": isosurface_grid(message.volume, message.apix),
        }

    @staticmethod
    def _classes_section(message: ClassesMessage) -> dict[str, Any]:
        """The class set for the gallery: classes by decreasing count (then number), at most :data:`MAX_TILES`."""
        order = sorted(range(len(message.classes)), key=lambda i: (-message.classes[i].count,
                                                                   message.classes[i].number))[:MAX_TILES]
        tiles = tile_images(message.averages[order])
        classes = [{**message.classes[i].to_json(), "png": png_base64(tile)} for i, tile in zip(order, tiles,
                                                                                               strict=True)]
        return {"time": message.time, "session": message.session, "seq": message.seq, "version": message.version,
                "particles": message.particles, "box": message.box, "apix": message.apix,
                "tile_size": int(tiles.shape[-1]), "count": len(message.classes),
                "junk": sum(c.junk for c in message.classes), "classes": classes}

    def _record_history(self, message: VolumeMessage) -> None:
        if message.history is not None and len(message.history):
            self.resolution_history = [[float(t), int(n), _finite(r)] for t, n, r in message.history]
        else:  # a daemon without history in its maps: build it from the maps seen here
            self.resolution_history.append([message.time, message.particles, _finite(message.resolution_angstrom)])

    # ------------------------------------------------------------------ output
    def connection(self) -> dict[str, Any]:
        """Whether the daemon is heard (``waiting`` / ``live`` / ``stale``) and since when."""
        silent = None if self._last_message is None else self._clock() - self._last_message
        state = "waiting" if silent is None else ("stale" if silent > self.stale_seconds else "live")
        return {"endpoint": self.endpoint, "state": state, "seconds_since_message": silent,
                "stale_seconds": self.stale_seconds, "session": self.session, "restarts": self.restarts,
                "messages": self.messages, "malformed": self.malformed, "last_error": self.last_error}

    def snapshot(self) -> dict[str, Any]:
        """Every section, for a page that has just connected."""
        return {"map": self.map, "resolution_history": self.resolution_history, "throughput": list(self.throughput),
                "status": self.status, "classes": self.classes, "connection": self.connection()}
