"""Classes shared across processes: what a lead classifier sends and what a follower hands back.

One :class:`~.classifier.StreamingClassifier` leads (it holds every particle, re-aligns,
re-centres and re-seeds the classes); others follow. A follower aligns new particles
against the lead's :class:`ClassReferences` and keeps what they add, and nothing else, in
sums and a table of its own, which it hands back as a :class:`ClassDelta`:

    lead:      refs = lead.references()                    (sent to the followers)
    follower:  follower.adopt(refs); follower.add(images, ctf, halves)
               delta = follower.hand_over()                (its sums and table start again empty)
    lead:      lead.take(delta)

Class sums are additive, so the deltas of several followers can be summed (an all-reduce)
before the lead takes them, as long as they are in the same **frame**: the lead's
cumulative centring moves ``offsets_px`` `(K, 2)` (working pixels) of the references they
were aligned against. A follower that adopts newer references moves what it holds to their
frame, and the lead moves a delta from its frame to its own current one, the exact move
:meth:`~.classifier.StreamingClassifier` makes when it centres a class (sums by a phase
ramp, members' displacements by the turned move). A follower's additions are then the
same, to rounding, as the lead's own :meth:`~.classifier.StreamingClassifier.add` of the same
particles against the same references (tests/test_class_delta.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ClassDelta", "ClassReferences", "NoiseResidual"]


@dataclass(frozen=True)
class ClassReferences:
    """The lead's classes at one version: what followers align new particles against.

    Attributes
    ----------
    settings: ClassifierSettings
        The lead's settings (a follower is built with the same ones).
    box, apix:
        The particles' box (px) and pixel size (Å).
    version: int
        The lead's reference version.
    images: torch.Tensor
        `(K, W, W)` float32 masked reference images (working box ``W``; re-seeded classes included).
    noise: torch.Tensor
        `(W // 2 + 1,)` float64 noise power per ring; ``noise_mass`` its weight in particles.
    r_max: int
        The search's outermost ring (working Fourier pixels).
    offsets_px: torch.Tensor
        `(K, 2)` float64 the frame: the lead's cumulative centring moves (working pixels, x, y).
    """

    settings: object  # ClassifierSettings (not imported: the classifier imports this module)
    box: int
    apix: float
    version: int
    images: torch.Tensor
    noise: torch.Tensor
    noise_mass: float
    r_max: int
    offsets_px: torch.Tensor


@dataclass(frozen=True)
class NoiseResidual:
    """One search's residual power, folded into the noise model (:meth:`~.classifier.StreamingClassifier`).

    ``first``, ``last``: its first and last ring; ``power`` `(last - first + 1,)` float64 residual power per ring
    summed over ``particles`` particles.
    """

    first: int
    last: int
    power: torch.Tensor
    particles: int


@dataclass
class ClassDelta:
    """What a follower added since its last hand-over (module docstring).

    Attributes
    ----------
    table: dict[str, np.ndarray]
        The rows' table entries in the order they were added (the classifier's table columns: ``classes``,
        ``weights``, ``psi``, ``shifts``, ``halves``, ``max_prob``, ``psi_sigma``, ``aligned_at``).
    sums: dict[str, torch.Tensor] | None
        ``num``, ``den``, ``mass`` of what they added (:class:`~.class_sums.ClassSums`); ``None`` while they
        travel separately (summed over followers by an all-reduce).
    noise: list[NoiseResidual]
        The residuals of their searches, in order.
    offsets_px: torch.Tensor
        `(K, 2)` float64 the frame the sums and displacements are in.
    """

    table: dict[str, np.ndarray]
    sums: dict[str, torch.Tensor] | None
    noise: list[NoiseResidual] = field(default_factory=list)
    offsets_px: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))

    def __len__(self) -> int:
        return int(self.table["classes"].shape[0])

    @staticmethod
    def merged(parts: list[ClassDelta], sums: dict[str, torch.Tensor]) -> ClassDelta:
        """One delta of several followers' ``parts`` (their rows in order) with their summed ``sums``.

        Raises
        ------
        ValueError
            Parts in different frames (they cannot share one sum).
        """
        if not parts:
            raise ValueError("no part to merge")
        frame = parts[0].offsets_px
        if any(part.offsets_px.shape != frame.shape or not torch.equal(part.offsets_px, frame) for part in parts):
            raise ValueError("class deltas aligned in different frames cannot be summed")
        table = {name: np.concatenate([part.table[name] for part in parts]) for name in parts[0].table}
        return ClassDelta(table, sums, [r for part in parts for r in part.noise], frame.clone())
