"""What a classification shows: the class averages with their figures, and each particle's class and pose.

:func:`class_set` reads a :class:`~.classifier.StreamingClassifier` into a
:class:`ClassSet` (what the files, the published message and the dashboard show);
:func:`particle_columns` gives each particle's RELION Class2D columns and
:func:`particle_junk` its junk flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fourier_rescale import fourier_rescale_2d

from ..fourier import irfft2_centered
from .classifier import StreamingClassifier
from .junk_score import JUNK_THRESHOLD, junk_features, junk_scores
from .references import class_averages

__all__ = ["PARTICLE_CLASS_COLUMNS", "ClassSet", "class_set", "particle_columns", "particle_junk"]

PARTICLE_CLASS_COLUMNS = ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                          "rlnMaxValueProbDistribution", "rlnCryofastarJunk")
"""Columns :func:`particle_columns` gives (RELION's Class2D meaning, plus our junk flag)."""


@dataclass
class ClassSet:
    """The classes at one moment.

    Attributes
    ----------
    version: int
        The classifier's reference version (increases with every update).
    particles: int
        Particles classified.
    averages: torch.Tensor
        `(K, B, B)` float32 CTF-corrected (Wiener) averages [class, y, x], centre ``B // 2``, at the
        particles' box (beyond the classifier's working Nyquist they are 0).
    apix: float
        The particles' pixel size, Å.
    counts: torch.Tensor
        `(K,)` float64 sum of membership weights.
    resolution_angstrom: torch.Tensor
        `(K,)` float64 FRC 0.143 resolution (inf where undefined).
    accuracy_degrees: torch.Tensor
        `(K,)` float64 median in-plane uncertainty of the members (NaN for an empty class).
    junk_score: torch.Tensor
        `(K,)` float64 in [0, 1].
    junk: torch.Tensor
        `(K,)` bool, ``junk_score > JUNK_THRESHOLD``.
    """

    version: int
    particles: int
    averages: torch.Tensor
    apix: float
    counts: torch.Tensor
    resolution_angstrom: torch.Tensor
    accuracy_degrees: torch.Tensor
    junk_score: torch.Tensor
    junk: torch.Tensor

    @property
    def fractions(self) -> torch.Tensor:
        """`(K,)` share of the particles in each class."""
        total = float(self.counts.sum())
        return self.counts / total if total > 0 else torch.zeros_like(self.counts)


def _accuracy(classifier: StreamingClassifier) -> torch.Tensor:
    t = classifier.table
    n = t.n
    best = t.classes[:n, 0]
    sigma = t.psi_sigma[:n]
    out = np.full(classifier.settings.n_classes, np.nan)
    ok = (best >= 0) & np.isfinite(sigma)
    if ok.any():
        order = np.lexsort((sigma[ok], best[ok]))
        cls, sig = best[ok][order], sigma[ok][order]
        starts = np.searchsorted(cls, np.arange(classifier.settings.n_classes))
        ends = np.searchsorted(cls, np.arange(classifier.settings.n_classes), side="right")
        has = ends > starts
        mid = (starts + ends - 1) // 2
        out[has] = sig[mid[has]]
    return torch.from_numpy(out)


def class_set(classifier: StreamingClassifier) -> ClassSet:
    """The classifier's classes now (module docstring)."""
    c = classifier
    spectra = class_averages(c.sums, c.frc)
    averages = irfft2_centered(spectra, c.box).to(torch.float32)  # the working box
    counts = c.sums.counts()
    features = junk_features(averages, counts, c.resolution, max_resolution_angstrom=c.box * c.apix / 2)
    score = junk_scores(features, counts)
    if c.box != c.particle_box:  # zero-padded in Fourier space back to the particles' box and pixel size
        averages = fourier_rescale_2d(averages, target_shape=(c.particle_box, c.particle_box))[0].to(torch.float32)
    return ClassSet(version=c.version, particles=c.n_particles, averages=averages, apix=c.particle_apix,
                    counts=counts, resolution_angstrom=c.resolution.clone(), accuracy_degrees=_accuracy(c),
                    junk_score=score, junk=score > JUNK_THRESHOLD)


def particle_columns(classifier: StreamingClassifier, classes: ClassSet, rows: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
    """Each particle's class and 2D pose in RELION's Class2D columns (:data:`PARTICLE_CLASS_COLUMNS`).

    The pose is that of the particle's most probable class: ``rlnAnglePsi`` (degrees) and
    ``rlnOriginX/YAngst = -d * apix`` (docs/conventions.md, "2D alignment"; ``d`` in working pixels of
    ``apix`` Å each, so the origin in Å holds at the particles' box).

    Parameters
    ----------
    classifier: StreamingClassifier
        The classifier.
    classes: ClassSet
        Its class set (for the junk flag).
    rows: np.ndarray | None
        `(n,)` particle indices (default: all, in order).
    """
    t = classifier.table
    rows = np.arange(t.n) if rows is None else np.asarray(rows, dtype=np.int64)
    best = t.classes[rows, 0]
    return {
        "rlnClassNumber": best + 1,
        "rlnAnglePsi": t.psi[rows, 0] % 360.0,
        "rlnOriginXAngst": -t.shifts[rows, 0, 0] * classifier.apix,
        "rlnOriginYAngst": -t.shifts[rows, 0, 1] * classifier.apix,
        "rlnMaxValueProbDistribution": t.max_prob[rows],
        "rlnCryofastarJunk": particle_junk(classifier, classes, rows).astype(np.int64),
    }


def particle_junk(classifier: StreamingClassifier, classes: ClassSet, rows: np.ndarray | None = None) -> np.ndarray:
    """`(n,)` bool: particles none of whose posterior lies on a good class.

    A particle is junk when every class it keeps a weight in (at least the classifier's
    ``min_weight``; up to ``keep`` classes) is a junk class. Junk images almost never keep
    a weight in a good class, while a real particle that a junk class drew at low SNR
    often keeps one in the class of its view: on seven molecules at SNR 0.1 with 20 % junk
    (docs/classification.md) flagging by the most probable class alone flagged 1.2-5 % of
    the real particles (8.6 % for an elongated tetramer whose side views look like
    aggregates), this rule 0.3-1.7 % (5.8 %), at a cost of 0.1-2 points of recall. A
    particle never aligned (no class) is not junk.
    """
    t = classifier.table
    rows = np.arange(t.n) if rows is None else np.asarray(rows, dtype=np.int64)
    kept = t.classes[rows]  # (n, keep), -1 = no class in that slot
    in_junk = classes.junk.numpy()[np.maximum(kept, 0)] | (kept < 0)
    return in_junk.all(1) & (kept[:, 0] >= 0)


