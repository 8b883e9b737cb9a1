"""What a session has accumulated, and how it is checkpointed and written out.

:class:`SessionState` holds the running half-set Fourier volumes
(:class:`cryofastar.recon.HalfSetAccumulator`), the journal of accumulated particles,
the pose of every accumulated particle, the session frame (reference and anchors,
:class:`cryofastar.model.session_frame.SessionFrame`) and the FSC history. It is saved
as ONE file, ``checkpoint.pt``, written to a temporary name and renamed into place:
a crash at any moment leaves either the previous checkpoint or the new one, and the
journal inside always describes exactly the particles inside the grids. A checkpoint
that cannot be written (the disk is full, the folder became read-only) raises an
:class:`OSError` naming the file, and the previous checkpoint stays as it was.

Files written in ``--out`` (all atomically, pixel size set on maps):

- ``volume.mrc``, ``volume_half1.mrc``, ``volume_half2.mrc``: the maps, [z, y, x];
- ``volume_fsc.tsv``: the current half-map FSC curve (:func:`~cryofastar.recon.map_set.write_map_set`);
- ``fsc_history.tsv``: one row per published map (unix time, particles, resolution Å), at most
  :data:`~cryofastar.daemon.history.FSC_HISTORY_ROWS` rows (older rows thinned, :mod:`.history`);
- ``particles.star``: RELION 3.1 particle set with every accumulated particle's pose
  (rlnAngleRot/Tilt/Psi in degrees, rlnOriginX/YAngst in Å, rlnRandomSubset,
  rlnCryofastarConfidence), image names relative to ``--out``.

Map files that cannot be written are logged and left as they were; the map itself is
kept in memory (and published) and written again with the next map.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryofastar.engine.pose_table import PoseTable
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.io.atomic import atomic_path
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.map_set import map_set, write_map_set

from .fingerprints import ImageFingerprints
from .history import compact_history
from .ingest import SessionGeometry
from .journal import IngestJournal

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "SessionState"]

CHECKPOINT_NAME = "checkpoint.pt"
_STATE_VERSION = 1
@dataclass
class SessionState:
    """Everything a session has accumulated (see module docstring).

    Attributes
    ----------
    geometry: SessionGeometry | None
        Box (px) and pixel size (Å) of the session's particles; ``None`` until the first file.
    accumulator: HalfSetAccumulator | None
        Half-set Fourier volumes at the input box; created with the geometry.
    journal: IngestJournal
        Exactly the particles inside the accumulator.
    poses: PoseTable
        Their poses.
    frame: dict | None
        :meth:`SessionFrame.state_dict` once the session reference is chosen.
    optics: dict[str, float]
        rlnVoltage etc. from the first STAR file that gave them (for particles.star).
    fsc_history: list[tuple[float, int, float]]
        `(unix time, particles, resolution Å)` per published map, compacted to at most
        :data:`~cryofastar.daemon.history.FSC_HISTORY_ROWS` rows (:func:`~cryofastar.daemon.history.compact_history`).
    counters: dict[str, int]
        Running totals that must survive a restart (files seen, rejected, ...).
    fingerprints: ImageFingerprints
        What each particle's image was when it was inserted (re-posing checks images read again against it).
    """

    geometry: SessionGeometry | None = None
    accumulator: HalfSetAccumulator | None = None
    journal: IngestJournal = field(default_factory=IngestJournal)
    poses: PoseTable = field(default_factory=PoseTable)
    frame: dict | None = None
    optics: dict[str, float] = field(default_factory=dict)
    fsc_history: list[tuple[float, int, float]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    fingerprints: ImageFingerprints = field(default_factory=ImageFingerprints)
    _map_write_error: str | None = field(default=None, repr=False)

    @property
    def n_particles(self) -> int:
        """Particles accumulated."""
        return 0 if self.accumulator is None else self.accumulator.n_particles

    # ------------------------------------------------------------------ checkpoint
    def save(self, path: Path) -> None:
        """Write the whole state to ``path`` atomically (see module docstring).

        Raises
        ------
        OSError
            The file could not be written (e.g. ``[Errno 28] no space left on device while
            writing /out/checkpoint.pt``); ``path`` is left as it was.
        """
        state = {
            "version": _STATE_VERSION,
            "geometry": None if self.geometry is None else {"box": self.geometry.box, "apix": self.geometry.apix},
            "accumulator": None if self.accumulator is None else {
                k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.accumulator.state_dict().items()},
            "journal": {s: torch.from_numpy(i) for s, i in self.journal.state_dict().items()},
            "poses": self.poses.state_dict(),
            "frame": self.frame,
            "optics": dict(self.optics),
            "fsc_history": [list(row) for row in self.fsc_history],
            "counters": dict(self.counters),
            "fingerprints": {s: torch.from_numpy(v) for s, v in self.fingerprints.state_dict().items()},
        }
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)  # a file object: a full disk raises OSError(ENOSPC), not "unexpected pos"

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> SessionState:
        """Read a checkpoint written by :meth:`save` (ValueError with one line if unusable)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error
            raise ValueError(f"{path}: not a readable session checkpoint ({str(exc).splitlines()[0]})") from None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: not a cryofastar session checkpoint of version {_STATE_VERSION}")
        geometry = None if state["geometry"] is None else SessionGeometry(int(state["geometry"]["box"]),
                                                                          float(state["geometry"]["apix"]))
        accumulator = None
        if state["accumulator"] is not None:
            accumulator = HalfSetAccumulator.from_state_dict(state["accumulator"], device)
        journal = IngestJournal.from_state_dict({s: i.numpy() for s, i in state["journal"].items()})
        return cls(geometry, accumulator, journal, PoseTable.from_state_dict(state["poses"]), state["frame"],
                   dict(state["optics"]), compact_history([tuple(row) for row in state["fsc_history"]]),
                   dict(state["counters"]),
                   ImageFingerprints.from_state_dict({s: v.numpy() for s, v in state.get("fingerprints", {}).items()}))

    # ------------------------------------------------------------------ outputs
    def write_maps(self, out: Path) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """Write the maps, the FSC curve and a history row; return `(map, fsc, resolution Å, half maps)`.

        ``map`` is `(B, B, B)` [z, y, x]; ``fsc`` `(B // 2 + 1,)` per shell; the
        resolution is the half-map FSC = 0.143 crossing (``inf`` while undefined); the
        half maps are `(2, B, B, B)`. Files that cannot be written (a full disk, a
        read-only folder) are logged (once per distinct error) and left as they were; the
        map is returned all the same.
        """
        assert self.accumulator is not None and self.geometry is not None
        maps = map_set(self.accumulator)
        self.fsc_history = compact_history(
            [*self.fsc_history, (time.time(), self.accumulator.n_particles, maps.resolution_angstrom)])
        try:
            write_map_set(out / "volume.mrc", maps)
            with atomic_path(out / "fsc_history.tsv") as tmp:
                lines = ["unix_time\tparticles\tresolution_angstrom"]
                lines += [f"{t:.3f}\t{n}\t{r:.4f}" for t, n, r in self.fsc_history]
                tmp.write_text("\n".join(lines) + "\n")
        except OSError as exc:
            if str(exc) != self._map_write_error:
                logger.error("map files not written (%s); the map is kept in memory and published, and written "
                             "again with the next map", exc)
            self._map_write_error = str(exc)
        else:
            if self._map_write_error is not None:
                logger.info("map files written again in %s", out)
            self._map_write_error = None
        return maps.volume, maps.fsc, maps.resolution_angstrom, maps.half_volumes

    def write_particles(self, out: Path) -> None:
        """Write ``particles.star`` (RELION 3.1) with every accumulated particle's pose."""
        if self.geometry is None or len(self.poses) == 0:
            return
        particles, optics = self.poses.to_star(out, self.geometry.box, self.geometry.apix, self.optics)
        write_particles(out / "particles.star", particles, optics)
