"""The pose of every particle being reconstructed, and how far refinement has taken it.

The one pose table of the engine: the daemon keeps one for its live map, the offline job
records its final poses in one, and both write their ``particles.star`` pose columns
from it (:meth:`PoseTable.pose_columns`). One row per particle, in insertion order: its stack and index, RELION pose
(angles in degrees, rlnOriginX/YAngst), network confidence, half set, CTF, the
refinement's bookkeeping (score, angular spread, version of the map it was last matched
against) and whether it is out of the map as 2D junk (``excluded``,
:mod:`~cryofastar.engine.junk_exclusion`). The streaming refinement reads and updates it
(:class:`~cryofastar.engine.live_refinement.LiveRefinement`); the daemon checkpoints it
and writes it as ``particles.star``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cryofastar.recon.ctf import CtfParams, ctf_array, ctf_from_array
from cryofastar.recon.euler import euler_to_matrix, matrix_to_euler
from cryofastar.recon.io.columns import CONFIDENCE_COLUMN, SCORE_COLUMN, SPREAD_COLUMN
from cryofastar.recon.io.names import relative_image_names

__all__ = ["PoseTable", "positions_of"]

_CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift")


def positions_of(stack_names: list[str], stack_id: np.ndarray, index: np.ndarray, stacks: np.ndarray,
                 indices: np.ndarray) -> np.ndarray:
    """Where each pose-table row appears in a list of particles named by stack and index.

    Parameters
    ----------
    stack_names, stack_id, index:
        The pose table's stack names and its `(n,)` ``stack_id`` and 1-based ``index`` columns.
    stacks, indices: np.ndarray
        `(m,)` the list: stack paths (str, as the table names them) and 1-based indices; a particle
        named twice counts at its first place.

    Returns
    -------
    np.ndarray
        `(n,)` int64: the row's position in the list, or -1 when the list does not name it.
    """
    ids = {name: i for i, name in enumerate(stack_names)}
    names, inverse = np.unique(np.asarray(stacks).astype(str), return_inverse=True)
    list_ids = np.array([ids.get(str(name), -1) for name in names], np.int64)[inverse.reshape(-1)]
    known = np.flatnonzero(list_ids >= 0)  # stacks the table holds nothing of yet are never matched
    width = np.int64(max(int(np.max(index, initial=0)), int(np.max(indices, initial=0))) + 1)
    table_keys = stack_id.astype(np.int64) * width + index.astype(np.int64)
    list_keys = list_ids[known] * width + np.asarray(indices, np.int64)[known]
    order = np.argsort(list_keys, kind="stable")
    list_keys, places = list_keys[order], known[order]
    if len(list_keys) == 0:
        return np.full(len(table_keys), -1, np.int64)
    at = np.clip(np.searchsorted(list_keys, table_keys), 0, len(list_keys) - 1)
    return np.where(list_keys[at] == table_keys, places[at], -1).astype(np.int64)


class PoseTable:
    """Pose and identity of every accumulated particle, in insertion order.

    Columns are kept as lists of per-batch arrays and joined on demand, so appending a
    batch costs nothing per particle. One thread owns the table (the daemon's accumulator
    thread); every method holds a lock, so another thread may read it safely with
    :meth:`snapshot` (a consistent copy) while the owner goes on.
    """

    def __init__(self) -> None:
        self.stack_names: list[str] = []
        self._stack_ids: dict[str, int] = {}
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self._COLUMNS}
        self._lock = threading.RLock()

    _COLUMNS = ("stack_id", "index", "angles", "origins", "confidence", "half_set", "ctf", "ctf_optics",
                "ctf_envelope", "score", "spread", "refined", "excluded")
    # columns added after the first checkpoints: their value for particles of an older checkpoint
    _DEFAULTS = {"ctf_optics": (3, np.nan, np.float64), "ctf_envelope": (2, np.nan, np.float64),
                 "score": (0, np.nan, np.float64),
                 "spread": (0, np.nan, np.float64), "refined": (0, 0, np.int32), "excluded": (0, False, np.bool_)}

    def __len__(self) -> int:
        with self._lock:
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
        with self._lock:
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
            n = len(indices)
            params = ctf_array(ctf, n)  # fields in CtfParams order: U, V, angle, kV, Cs, Q0, phase, B, scale
            self._parts["ctf"].append(params[:, [0, 1, 2, 6]])
            self._parts["ctf_optics"].append(params[:, [3, 4, 5]])
            self._parts["ctf_envelope"].append(params[:, [7, 8]])  # NaN: not given (RELION's 0 and 1)
            self._parts["score"].append(np.full(n, np.nan) if score is None else score.double().numpy())
            self._parts["spread"].append(np.full(n, np.nan) if spread is None else spread.double().numpy())
            self._parts["refined"].append(np.full(n, refined, dtype=np.int32))
            self._parts["excluded"].append(np.zeros(n, dtype=np.bool_))

    def update(self, rows: np.ndarray, rotations: torch.Tensor, origins_angstrom: torch.Tensor, score: torch.Tensor,
               spread: torch.Tensor, refined: int | np.ndarray) -> None:
        """Replace the pose of particles ``rows`` (re-posed; shapes as in :meth:`append`)."""
        rot, tilt, psi = matrix_to_euler(rotations.double())
        with self._lock:
            self.column("angles")[rows] = torch.stack([rot, tilt, psi], -1).numpy()
            self.column("origins")[rows] = origins_angstrom.double().numpy()
            self.column("score")[rows] = score.double().numpy()
            self.column("spread")[rows] = spread.double().numpy()
            self.column("refined")[rows] = refined

    def set_values(self, name: str, rows: np.ndarray, values: object) -> None:
        """Set column ``name`` at ``rows`` (under the lock: a reader's snapshot sees all of it or none)."""
        with self._lock:
            self.column(name)[rows] = values

    def stack_paths(self, rows: np.ndarray) -> np.ndarray:
        """`(k,)` resolved stack path (str) of particles ``rows``."""
        return np.asarray(self.stack_names, dtype=object)[self.column("stack_id")[rows]]

    def rotations(self, rows: np.ndarray) -> torch.Tensor:
        """`(k, 3, 3)` float64 RELION matrices of particles ``rows``."""
        angles = torch.from_numpy(self.column("angles")[rows])
        return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])

    def has_ctf(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """`(len(rows),)` bool: whether each particle was inserted with a CTF (a stack taken bare was not)."""
        return np.isfinite(self.column("ctf")[rows, 0])

    def ctf(self, rows: np.ndarray) -> CtfParams | None:
        """CTF of particles ``rows`` as inserted (``None`` if they had none).

        Raises ValueError if some have one and others not, or its optics were not kept
        (particles of a checkpoint written before they were).
        """
        defocus, optics = self.column("ctf")[rows], self.column("ctf_optics")[rows]
        known = self.has_ctf(rows)
        if not known.any():
            return None
        if not known.all() or not np.isfinite(optics).all():
            raise ValueError("the CTF these particles were inserted with is not fully known")
        envelope = self.column("ctf_envelope")[rows]
        return ctf_from_array(np.column_stack([defocus[:, :3], optics, defocus[:, 3], envelope]))

    def column(self, name: str) -> np.ndarray:
        """One column over all particles (``stack_id``, ``index``, ``angles`` (n, 3), ...).

        The array is the table's own (writing to it changes the table): for the owning thread.
        """
        with self._lock:
            parts = self._parts[name]
            if not parts:
                widths = {"angles": (0, 3), "origins": (0, 2), "ctf": (0, 4), "ctf_optics": (0, 3),
                          "ctf_envelope": (0, 2)}
                return np.zeros(widths.get(name, (0,)))
            if len(parts) > 1:  # joined once; never copied again while nothing is appended, so that the owner's
                # array stays the table's while another thread reads the column (status, snapshot)
                self._parts[name] = [np.concatenate(parts)]
            return self._parts[name][0]

    def snapshot(self, names: tuple[str, ...]) -> tuple[list[str], dict[str, np.ndarray]]:
        """A consistent copy, from any thread: the stack names and columns ``names``, all of the same length.

        Taken under the table's lock, so no batch or re-posing is half in it.
        """
        with self._lock:
            return list(self.stack_names), {k: self.column(k).copy() for k in names}

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

    def image_names(self, out: Path) -> list[str]:
        """`(n,)` rlnImageName of every particle: ``NNNNNN@stack``, the stack relative to ``out`` (resolves there).

        Raises
        ------
        ParticleFileError
            A stack name no STAR file can hold (:func:`~cryofastar.recon.io.names.star_value_problem`).
        """
        return relative_image_names(self.stack_names, self.column("stack_id"), self.column("index"), out)

    def pose_columns(self, refinement: bool = True) -> dict[str, np.ndarray]:
        """The pose columns of a particle STAR file, `(n,)` each: rlnAngleRot/Tilt/Psi (degrees),
        rlnOriginX/YAngst (Å), the network's confidence and (``refinement``) the refinement's score and
        angular spread (NaN where not refined). The one form of poses both the daemon and the offline job write."""
        angles, origins = self.column("angles"), self.column("origins")
        columns = {"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
                   "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
                   CONFIDENCE_COLUMN: self.column("confidence")}
        if refinement:
            columns.update({SCORE_COLUMN: self.column("score"), SPREAD_COLUMN: self.column("spread")})
        return columns

    def positions_of(self, stacks: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """`(n,)` each row's position among the particles ``stacks``, ``indices`` names, or -1
        (:func:`positions_of`)."""
        with self._lock:
            return positions_of(self.stack_names, self.column("stack_id"), self.column("index"), stacks, indices)

    def in_map(self) -> np.ndarray:
        """`(n,)` bool: the particle is in the map (not taken out as 2D junk, ``excluded``)."""
        return ~self.column("excluded").astype(bool)

    def to_star(self, out: Path, box: int, apix: float, optics: dict[str, float]) -> tuple[pd.DataFrame,
                                                                                        pd.DataFrame]:
        """`(particles, optics)` blocks of a RELION 3.1 STAR file written in ``out``: the particles in the map
        (:meth:`in_map`; those excluded as junk are in the 2D lane's ``classes/particles.star``)."""
        indices = self.column("index")
        rows = {
            "rlnImageName": self.image_names(out),
            **self.pose_columns(),
            "rlnOpticsGroup": np.ones(len(indices), dtype=np.int64),
            "rlnRandomSubset": self.column("half_set").astype(np.int64),
        }
        ctf = self.column("ctf")
        if len(ctf) and np.isfinite(ctf).all():
            rows.update({name: ctf[:, k] for k, name in enumerate(_CTF_COLUMNS)})
        keep = self.in_map()
        optics_block = {"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                        "rlnImagePixelSize": [apix], "rlnImageSize": [box],
                        "rlnImageDimensionality": [2], **{k: [v] for k, v in optics.items()}}
        particles = pd.DataFrame(rows)
        return (particles if keep.all() else particles[keep].reset_index(drop=True)), pd.DataFrame(optics_block)
