"""What each particle's image was when it went into the map: a 64-bit fingerprint per particle.

Re-posing (:mod:`cryofastar.engine.live_refinement`) reads particles of the map again,
subtracts their old contribution and inserts them at new poses. If a stack was replaced
in place after it was read (same name, other content), the images read again are not
the ones inside the map, and subtracting them would corrupt it. The daemon records a
fingerprint of every image when it inserts it and checks the images read again against
it (:meth:`ImageFingerprints.verify`): a changed image is refused with a
:class:`~cryofastar.recon.io.ParticleFileError` naming its stack, and re-posing
(:meth:`LiveRefinement.repose`, its rule for any batch it cannot read) leaves that batch's
particles where they are: in the map as first read, at their last poses, never re-posed
again; the daemon marks every particle of a changed stack so (not only the batch's). Each
changed stack gets one ``rejected.tsv`` row. (A changed stack met by the
ab initio's first read makes it give up, as an unreadable one does: the session goes on
with global search.)

The fingerprint is a weighted sum of the image's float32 bit patterns with fixed
pseudo-random odd 64-bit weights, modulo 2⁶⁴ (vectorised: one multiply-add per pixel).
Reading the same bytes again gives the same bits, so an unchanged image always
matches; any change of one pixel changes it (its weight is odd), and unrelated content
matches with probability 2⁻⁶⁴. ``0`` means "not recorded" (particles of a checkpoint
written before fingerprints existed); those are not checked.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch
from cryofastar.recon.io import ParticleFileError

from .journal import get_per_stack, set_per_stack  # one per-stack table for both

__all__ = ["ChangedImages", "ImageFingerprints", "image_fingerprints"]


class ChangedImages(ParticleFileError):
    """Images read again differ from those inserted; ``changed`` maps each such stack to how many differ."""

    def __init__(self, changed: dict[str, int]) -> None:
        self.changed = changed
        listed = ", ".join(f"{stack} ({count} image(s))" for stack, count in changed.items())
        super().__init__(f"changed since its particles went into the map: {listed}; the map keeps them as first "
                         "read and they are no longer re-posed")

    def reason(self, stack: str) -> str:
        """One stack's rejected.tsv reason."""
        return (f"{stack}: changed since its particles went into the map (images read again differ from those "
                "inserted); the map keeps its particles as first read and they are no longer re-posed")


@functools.lru_cache(maxsize=8)
def _weights(pixels: int) -> np.ndarray:
    """`(pixels,)` uint64 odd weights, the same in every process (fixed seed)."""
    weights = np.random.default_rng(0x5EED).integers(0, 2**63, size=pixels, dtype=np.uint64)
    return weights * np.uint64(2) + np.uint64(1)


def image_fingerprints(images: torch.Tensor) -> np.ndarray:
    """`(n,)` int64 fingerprints of `(n, B, B)` float32 images (see module docstring; never 0)."""
    bits = images.detach().to(torch.float32).cpu().contiguous().reshape(len(images), -1).numpy().view(np.uint32)
    with np.errstate(over="ignore"):
        sums = (bits.astype(np.uint64) * _weights(bits.shape[1])[None, :]).sum(axis=1, dtype=np.uint64)
    sums[sums == 0] = 1  # 0 is "not recorded"
    return sums.view(np.int64)


class ImageFingerprints:
    """Fingerprint per ``(stack, 1-based index)`` of the particles in the map (thread-safe)."""

    def __init__(self) -> None:
        self._values: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return int(sum(int((v != 0).sum()) for v in self._values.values()))

    def add(self, stacks: str | np.ndarray, indices: np.ndarray, fingerprints: np.ndarray) -> None:
        """Record `(n,)` ``fingerprints`` of particles ``indices`` (1-based) of ``stacks`` (one or `(n,)`)."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            set_per_stack(self._values, stacks, indices, np.asarray(fingerprints, dtype=np.int64), np.int64)

    def lookup(self, stacks: str | np.ndarray, indices: np.ndarray) -> np.ndarray:
        """`(n,)` int64 recorded fingerprints (0 where none was recorded)."""
        indices = np.asarray(indices, dtype=np.int64)
        with self._lock:
            return get_per_stack(self._values, stacks, indices, np.int64)

    def verify(self, stacks: str | np.ndarray, indices: np.ndarray, images: torch.Tensor) -> None:
        """Check `(n, B, B)` images read again against what was recorded for them.

        Raises
        ------
        ChangedImages
            Some images differ from what was inserted (their stack was replaced or
            rewritten since): names each such stack and how many of its images differ.
        """
        recorded = self.lookup(stacks, indices)
        changed = (recorded != 0) & (recorded != image_fingerprints(images))
        if not changed.any():
            return
        names = np.broadcast_to(np.asarray(stacks), recorded.shape)[changed]
        distinct, counts = np.unique(names.astype(str), return_counts=True)
        raise ChangedImages({str(s): int(c) for s, c in zip(distinct, counts, strict=True)})

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{stack: (n,) int64}`` fingerprints by index - 1 (0: none); picklable."""
        with self._lock:
            return {s: v.copy() for s, v in self._values.items() if (v != 0).any()}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray]) -> ImageFingerprints:
        """Inverse of :meth:`state_dict`."""
        fingerprints = cls()
        fingerprints._values = {s: np.asarray(v, dtype=np.int64).copy() for s, v in state.items()}
        return fingerprints

