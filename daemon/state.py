"""What a session has accumulated, and how it is checkpointed and written out.

:class:`SessionState` holds the running half-set Fourier volumes
(:class:`cryofastar.recon.HalfSetAccumulator`), the journal of accumulated particles,
the pose of every accumulated particle, the session frame (reference and anchors,
:class:`cryofastar.model.session_frame.SessionFrame`) and the FSC history. It is saved
as ONE file, ``checkpoint.pt``, written to a temporary name and renamed into place:
a crash at any moment leaves either the previous checkpoint or the new one, and the
journal inside always describes exactly the particles inside the grids.

Files written in ``--out`` (all atomically, pixel size set on maps):

- ``volume.mrc``, ``volume_half1.mrc``, ``volume_half2.mrc``: the maps, [z, y, x];
- ``volume_fsc.tsv``: the current half-map FSC curve (:func:`~cryofastar.recon.map_set.write_map_set`);
- ``fsc_history.tsv``: one row per published map (unix time, particles, resolution Å);
- ``particles.star``: RELION 3.1 particle set with every accumulated particle's pose
  (rlnAngleRot/Tilt/Psi in degrees, rlnOriginX/YAngst in Å, rlnRandomSubset,
  rlnCryofastarConfidence), image names relative to ``--out``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cryofastar.recon import HalfSetAccumulator
from cryofastar.recon.ctf import CtfParams
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.io.atomic import atomic_path
from cryofastar.recon.io.columns import CONFIDENCE_COLUMN, SCORE_COLUMN, SPREAD_COLUMN
from cryofastar.recon.io.star import write_particles
from cryofastar.recon.map_set import map_set, write_map_set

from .ingest import SessionGeometry
from .journal import IngestJournal

__all__ = ["CHECKPOINT_NAME", "PoseTable", "SessionState"]

CHECKPOINT_NAME = "checkpoint.pt"
_STATE_VERSION = 1
_CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift")


class PoseTable:
    """Pose and identity of every accumulated particle, in insertion order.

    Columns are kept as lists of per-batch arrays and joined on demand, so appending a
    batch costs nothing per particle.
    """

    def __init__(self) -> None:
        self.stack_names: list[str] = []
        self._stack_ids: dict[str, int] = {}
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self._COLUMNS}

    _COLUMNS = ("stack_id", "index", "angles", "origins", "confidence", "half_set", "ctf", "ctf_optics", "score",
                "spread", "refined")
    # columns added after the first checkpoints: their value for particles of an older checkpoint
    _DEFAULTS = {"ctf_optics": (3, np.nan, np.float64), "score": (0, np.nan, np.float64),
                 "spread": (0, np.nan, np.float64), "refined": (0, 0, np.int32)}

    def __len__(self) -> int:
        return int(sum(len(a) for a in self._parts["index"]))

    def append(self, stacks: np.ndarray, indices: np.ndarray, rotations: torch.Tensor, origins_angstrom: torch.Tensor,
               confidence: torch.Tensor, half_sets: torch.Tensor, ctf: CtfParams | None,
               score: torch.Tensor | None = None, spread: torch.Tensor | None = None, refined: int = 0) -> None:
        """Add a batch of `n` particles.

        Parameters
        ----------
        stacks, indices: np.ndarray
            `(n,)` resolved stack path and 1-based index of each particle.
        rotations: torch.Tensor
            `(n, 3, 3)` RELION matrices ``A`` (map frame -> particle frame).
        origins_angstrom: torch.Tensor
            `(n, 2)` rlnOriginXAngst/YAngst.
        confidence, half_sets: torch.Tensor
            `(n,)` network confidence and half set (1/2).
        ctf: CtfParams | None
            Their CTF, if known (defocus columns are written only if every particle has one).
        score, spread: torch.Tensor | None
            `(n,)` projection-matching score and angular spread (degrees), if refined.
        refined: int
            Version of the map they were matched against (0: not refined).
        """
        ids = np.empty(len(indices), dtype=np.int32)
        for stack in np.unique(stacks):  # one dictionary lookup per stack
            if stack not in self._stack_ids:
                self._stack_ids[str(stack)] = len(self.stack_names)
                self.stack_names.append(str(stack))
            ids[stacks == stack] = self._stack_ids[str(stack)]
        rot, tilt, psi = matrix_to_euler(rotations.double())
        self._parts["stack_id"].append(ids)
        self._parts["index"].append(np.asarray(indices, dtype=np.int64))
        self._parts["angles"].append(torch.stack([rot, tilt, psi], -1).numpy())
        self._parts["origins"].append(origins_angstrom.double().numpy())
        self._parts["confidence"].append(confidence.double().numpy())
        self._parts["half_set"].append(half_sets.numpy().astype(np.int8))
        if ctf is None:
            values = np.full((len(indices), 4), np.nan)
        else:
            values = torch.stack([ctf.defocus_u_angstrom, ctf.defocus_v_angstrom, ctf.defocus_angle_degrees,
                                  ctf.phase_shift_degrees], -1).double().numpy()
        self._parts["ctf"].append(values)
        self._parts["ctf_optics"].append(np.full((len(indices), 3), np.nan) if ctf is None else torch.stack(
            [ctf.voltage_kv, ctf.spherical_aberration_mm, ctf.amplitude_contrast], -1).double().numpy())
        n = len(indices)
        self._parts["score"].append(np.full(n, np.nan) if score is None else score.double().numpy())
        self._parts["spread"].append(np.full(n, np.nan) if spread is None else spread.double().numpy())
        self._parts["refined"].append(np.full(n, refined, dtype=np.int32))

    def update(self, rows: np.ndarray, rotations: torch.Tensor, origins_angstrom: torch.Tensor, score: torch.Tensor,
               spread: torch.Tensor, refined: int | np.ndarray) -> None:
        """Replace the pose of particles ``rows`` (re-posed; shapes as in :meth:`append`)."""
        rot, tilt, psi = matrix_to_euler(rotations.double())
        self.column("angles")[rows] = torch.stack([rot, tilt, psi], -1).numpy()
        self.column("origins")[rows] = origins_angstrom.double().numpy()
        self.column("score")[rows] = score.double().numpy()
        self.column("spread")[rows] = spread.double().numpy()
        self.column("refined")[rows] = refined

    def stack_paths(self, rows: np.ndarray) -> np.ndarray:
        """`(k,)` resolved stack path (str) of particles ``rows``."""
        return np.asarray(self.stack_names, dtype=object)[self.column("stack_id")[rows]]

    def rotations(self, rows: np.ndarray) -> torch.Tensor:
        """`(k, 3, 3)` float64 RELION matrices of particles ``rows``."""
        angles = torch.from_numpy(self.column("angles")[rows])
        return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])

    def ctf(self, rows: np.ndarray) -> CtfParams | None:
        """CTF of particles ``rows`` as inserted (``None`` if they had none).

        Raises ValueError if some have one and others not, or its optics were not kept
        (particles of a checkpoint written before they were).
        """
        defocus, optics = self.column("ctf")[rows], self.column("ctf_optics")[rows]
        known = np.isfinite(defocus[:, 0])
        if not known.any():
            return None
        if not known.all() or not np.isfinite(optics).all():
            raise ValueError("the CTF these particles were inserted with is not fully known")
        return CtfParams.from_arrays(defocus_u_angstrom=defocus[:, 0], defocus_v_angstrom=defocus[:, 1],
                                     defocus_angle_degrees=defocus[:, 2], phase_shift_degrees=defocus[:, 3],
                                     voltage_kv=optics[:, 0], spherical_aberration_mm=optics[:, 1],
                                     amplitude_contrast=optics[:, 2])

    def column(self, name: str) -> np.ndarray:
        """One column over all particles (``stack_id``, ``index``, ``angles`` (n, 3), ...)."""
        parts = self._parts[name]
        if not parts:
            widths = {"angles": (0, 3), "origins": (0, 2), "ctf": (0, 4), "ctf_optics": (0, 3)}
            return np.zeros(widths.get(name, (0,)))
        joined = np.concatenate(parts)
        self._parts[name] = [joined]
        return joined

    def state_dict(self) -> dict[str, object]:
        """Tensors and a list of stack names (loadable with ``weights_only=True``)."""
        return {"stack_names": list(self.stack_names),
                **{k: torch.from_numpy(np.ascontiguousarray(self.column(k))) for k in self._COLUMNS}}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> PoseTable:
        """Inverse of :meth:`state_dict`."""
        table = cls()
        table.stack_names = list(state["stack_names"])  # type: ignore[arg-type]
        table._stack_ids = {s: i for i, s in enumerate(table.stack_names)}
        n = len(state["index"])  # type: ignore[arg-type]
        for k in cls._COLUMNS:
            if k in state:
                table._parts[k] = [state[k].numpy()]  # type: ignore[union-attr]
            else:  # a checkpoint written before this column existed
                width, fill, dtype = cls._DEFAULTS[k]
                table._parts[k] = [np.full((n, width) if width else n, fill, dtype=dtype)]
        return table

    def to_star(self, out: Path, geometry: SessionGeometry, optics: dict[str, float]) -> tuple[pd.DataFrame,
                                                                                               pd.DataFrame]:
        """`(particles, optics)` blocks of a RELION 3.1 STAR file written in ``out``."""
        relative = [os.path.relpath(s, out.resolve()) for s in self.stack_names]
        names = np.array(relative, dtype=object)[self.column("stack_id")]
        indices = self.column("index")
        angles, origins = self.column("angles"), self.column("origins")
        rows = {
            "rlnImageName": [f"{int(i):06d}@{n}" for i, n in zip(indices, names, strict=True)],
            "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
            "rlnOpticsGroup": np.ones(len(indices), dtype=np.int64),
            "rlnRandomSubset": self.column("half_set").astype(np.int64),
            CONFIDENCE_COLUMN: self.column("confidence"),
            SCORE_COLUMN: self.column("score"),
            SPREAD_COLUMN: self.column("spread"),
        }
        ctf = self.column("ctf")
        if len(ctf) and np.isfinite(ctf).all():
            rows.update({name: ctf[:, k] for k, name in enumerate(_CTF_COLUMNS)})
        optics_block = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                        "rlnImagePixelSize": [geometry.apix], "rlnImageSize": [geometry.box],
                        "rlnImageDimensionality": [2], **{k: [v] for k, v in optics.items()}}
        return pd.DataFrame(rows), pd.DataFrame(optics_block)


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
        `(unix time, particles, resolution Å)` per published map.
    counters: dict[str, int]
        Running totals that must survive a restart (files seen, rejected, ...).
    """

    geometry: SessionGeometry | None = None
    accumulator: HalfSetAccumulator | None = None
    journal: IngestJournal = field(default_factory=IngestJournal)
    poses: PoseTable = field(default_factory=PoseTable)
    frame: dict | None = None
    optics: dict[str, float] = field(default_factory=dict)
    fsc_history: list[tuple[float, int, float]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        """Particles accumulated."""
        return 0 if self.accumulator is None else self.accumulator.n_particles

    # ------------------------------------------------------------------ checkpoint
    def save(self, path: Path) -> None:
        """Write the whole state to ``path`` atomically (see module docstring)."""
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
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

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
                   dict(state["optics"]), [tuple(row) for row in state["fsc_history"]], dict(state["counters"]))

    # ------------------------------------------------------------------ outputs
    def write_maps(self, out: Path) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """Write the maps, the FSC curve and a history row; return `(map, fsc, resolution Å, half maps)`.

        ``map`` is `(B, B, B)` [z, y, x]; ``fsc`` `(B // 2 + 1,)` per shell; the
        resolution is the half-map FSC = 0.143 crossing (``inf`` while undefined); the
        half maps are `(2, B, B, B)`.
        """
        assert self.accumulator is not None and self.geometry is not None
        maps = map_set(self.accumulator)
        write_map_set(out / "volume.mrc", maps)
        self.fsc_history.append((time.time(), self.accumulator.n_particles, maps.resolution_angstrom))
        with atomic_path(out / "fsc_history.tsv") as tmp:
            lines = ["unix_time\tparticles\tresolution_angstrom"]
            lines += [f"{t:.3f}\t{n}\t{r:.4f}" for t, n, r in self.fsc_history]
            tmp.write_text("\n".join(lines) + "\n")
        return maps.volume, maps.fsc, maps.resolution_angstrom, maps.half_volumes

    def write_particles(self, out: Path) -> None:
        """Write ``particles.star`` (RELION 3.1) with every accumulated particle's pose."""
        if self.geometry is None or len(self.poses) == 0:
            return
        particles, optics = self.poses.to_star(out, self.geometry, self.optics)
        write_particles(out / "particles.star", particles, optics)
