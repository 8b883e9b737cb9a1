"""What a session sends over ZeroMQ: its maps, the poses of each pass, its status, its 2D classes.

:class:`SessionBroadcast` turns the pipeline's tensors into the messages of
:mod:`cryofastar.protocol` (docs/protocol.md) and hands them to a
:class:`~cryofastar.daemon.publisher.Publisher`, which owns the socket.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from cryofastar.protocol import POSE_COLUMNS, ClassesMessage, PosesMessage, StatusMessage, VolumeMessage
from cryofastar.recon.classify2d import ClassSet
from cryofastar.recon.euler import matrix_to_euler
from cryofastar.recon.fsc import shell_resolutions_angstrom

from .publisher import Publisher

__all__ = ["HISTORY_ROWS", "SessionBroadcast", "particle_id"]

HISTORY_ROWS = 1000  # published maps (time, particles, resolution) re-sent with every map, for late subscribers


def particle_id(watch: Path, stack: str, index: int) -> str:
    """``NNNNNN@path`` of a particle: its 1-based index and its stack relative to ``watch`` (absolute if outside)."""
    try:
        name = Path(stack).relative_to(watch.resolve()).as_posix()
    except ValueError:
        name = stack
    return f"{int(index):06d}@{name}"


class SessionBroadcast:
    """The session's messages on one publisher.

    Parameters
    ----------
    publisher: Publisher
        Where messages go (closed by :meth:`close`).
    watch: Path
        The watched directory: particle ids name stacks relative to it.
    """

    def __init__(self, publisher: Publisher, watch: Path) -> None:
        self.publisher = publisher
        self.watch = watch

    @property
    def address(self) -> str:
        """The bound ZeroMQ address (the chosen port if 0 was asked)."""
        return self.publisher.address

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.publisher.closed

    def poses(self, stacks: np.ndarray, indices: np.ndarray, half_sets: torch.Tensor, rotations: torch.Tensor,
              origins: torch.Tensor, confidence: torch.Tensor, batch: int) -> None:
        """Publish the poses of ``n`` particles just inserted into the map.

        Parameters
        ----------
        stacks, indices: np.ndarray
            `(n,)` resolved stack path and 1-based index of each particle.
        half_sets: torch.Tensor
            `(n,)` their half sets (1/2).
        rotations: torch.Tensor
            `(n, 3, 3)` RELION matrices, sent as rlnAngleRot/Tilt/Psi (degrees).
        origins: torch.Tensor
            `(n, 2)` rlnOriginX/YAngst.
        confidence: torch.Tensor
            `(n,)` the network's confidence.
        batch: int
            Number of the forward pass that posed them.
        """
        rot, tilt, psi = matrix_to_euler(rotations.double())
        table = torch.stack([rot, tilt, psi, origins[:, 0], origins[:, 1], confidence.double()], -1)
        assert len(POSE_COLUMNS) == table.shape[1]
        names = [particle_id(self.watch, stack, index) for stack, index in zip(stacks, indices, strict=True)]
        self.publisher.publish(PosesMessage(table.float().numpy(), names, batch, half_sets.tolist()))

    def volume(self, volume: torch.Tensor, apix: float, particles: int, resolution: float, fsc: torch.Tensor,
               history: list) -> None:
        """Publish a map.

        Parameters
        ----------
        volume: torch.Tensor
            `(B, B, B)` the map, [z, y, x].
        apix: float
            Its pixel size (Å).
        particles: int
            Particles in it.
        resolution: float
            Half-map FSC 0.143 resolution (Å); NaN or inf is sent as "unknown".
        fsc: torch.Tensor
            `(B // 2 + 1,)` the half-map FSC per shell.
        history: list
            Rows ``(unix time, particles, resolution Å)`` of the maps published so far;
            the last :data:`HISTORY_ROWS` go with the map.
        """
        shells = shell_resolutions_angstrom(volume.shape[-1], apix)
        self.publisher.publish(VolumeMessage(volume.float().cpu().numpy(), apix, particles,
                                             resolution if math.isfinite(resolution) else None,
                                             shells.float().numpy(), fsc.float().cpu().numpy(),
                                             history=np.asarray(history[-HISTORY_ROWS:], dtype=np.float64)))

    def classes(self, classes: ClassSet, version: int) -> None:
        """Publish a 2D class set (nothing once closed: the 2D lane may finish its last step after).

        Parameters
        ----------
        classes: ClassSet
            The classes (:func:`~cryofastar.recon.classify2d.class_set`): `(K, B, B)` averages
            [class, y, x], per-class counts, resolution (Å; inf where undefined, sent as unknown),
            in-plane accuracy (degrees), junk flags and scores.
        version: int
            Number of the class set in the session (1 for the first).
        """
        resolution = classes.resolution_angstrom.numpy().copy()
        resolution[~np.isfinite(resolution)] = np.nan
        message = ClassesMessage.from_arrays(
            classes.averages.float().numpy(), classes.counts.numpy(), classes.apix, classes.particles, version,
            resolution_angstrom=resolution, accuracy_degrees=classes.accuracy_degrees.numpy(),
            junk=classes.junk.numpy(), junk_score=classes.junk_score.numpy())
        if not self.publisher.closed:
            self.publisher.publish(message)

    def status(self, status: dict[str, object]) -> None:
        """Publish a status message (nothing once closed: the last one at stop may come after)."""
        if not self.publisher.closed:
            self.publisher.publish(StatusMessage(status))

    def close(self) -> None:
        """Close the publisher (what is queued is sent first, as :meth:`Publisher.close` does)."""
        self.publisher.close()
