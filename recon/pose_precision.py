"""How precisely the particles' poses are known, estimated from their posterior spreads.

Projection matching records per particle the posterior RMS angle of the candidates
around its best pose (``spread_degrees``, :mod:`~cryofastar.recon.projection_matching`;
RELION's ``rlnCryofastarAngularSpread`` column in our STAR files). If a particle's pose
error is an isotropic Gaussian rotation (a rotation vector with per-axis standard
deviation ``sigma``), its angle has a Maxwell distribution: RMS ``sqrt(3) sigma``, median
``1.5382 sigma``. The median pose error of the set is then estimated as
:data:`MEDIAN_PER_RMS` times the median spread. No truth is used; the estimate is the
second part of the verdict (the first, "did ab initio find the structure", is
:class:`~cryofastar.recon.ab_initio.AbInitioVerdict`): it tells whether the particles
carry enough signal for poses within :data:`PRECISE_DEGREES`.

How well it tracks the true error is measured on the panel (docs/ab-initio-panel.md,
"Pose precision"): close at SNR 0.05, about 1.3x too pessimistic at SNR 0.1, and too
optimistic where the posterior is sharper than the coarse grid it is computed on
(spreads under 5°). It is an estimate, reported with its evidence, not a guarantee.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["MEDIAN_PER_RMS", "PRECISE_DEGREES", "PosePrecision", "pose_precision"]

MEDIAN_PER_RMS = 1.5382 / math.sqrt(3.0)
"""Median over RMS of the angle of an isotropic Gaussian rotation error (Maxwell distribution), about 0.888."""
PRECISE_DEGREES = 5.0
"""Poses count as precise when their estimated median error is under this (the panel's success bar)."""


@dataclass(frozen=True)
class PosePrecision:
    """The estimate and its evidence (degrees).

    Attributes
    ----------
    particles: int
        Particles with a finite spread (those refined).
    median_spread_degrees: float
        Median posterior RMS angle of those particles.
    estimated_median_error_degrees: float
        ``MEDIAN_PER_RMS * median_spread_degrees``.
    precise: bool
        ``estimated_median_error_degrees < bar_degrees``.
    bar_degrees: float
        The bar it was judged against.
    """

    particles: int
    median_spread_degrees: float
    estimated_median_error_degrees: float
    precise: bool
    bar_degrees: float = PRECISE_DEGREES

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and status messages."""
        word = "precise" if self.precise else "NOT precise"
        return (f"poses {word}: estimated median error {self.estimated_median_error_degrees:.1f}° "
                f"(bar {self.bar_degrees:g}°; median posterior spread {self.median_spread_degrees:.1f}° "
                f"of {self.particles} particles)")


def pose_precision(spread_degrees: torch.Tensor | np.ndarray, bar_degrees: float = PRECISE_DEGREES
                   ) -> PosePrecision | None:
    """The precision estimate from `(n,)` posterior spreads (degrees; NaN: not refined, ignored).

    Returns ``None`` when no particle has a finite spread.
    """
    values = torch.as_tensor(spread_degrees).detach().cpu().double().reshape(-1).numpy()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    median = float(np.median(values))
    estimate = MEDIAN_PER_RMS * median
    return PosePrecision(int(values.size), median, estimate, bool(estimate < bar_degrees), float(bar_degrees))
