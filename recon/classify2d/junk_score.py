"""Which classes are junk: a score per class from features anyone can measure on its average.

Junk in a session (noise boxes, carbon edges, aggregates, particles picked off-centre)
gathers in classes of its own, and those classes differ from the good ones in ways
that need no knowledge of the molecule:

* **contrast**: the average's standard deviation inside the particle's disc. Noise
  boxes average to almost nothing (the likelihood sends them to the flattest class).
* **outside**: the fraction of the average's variance outside the disc. A carbon edge
  crosses the whole box, an aggregate's second particle and an off-centre particle lie
  beyond the disc; a good class's density is inside it.
* **resolution**: the class's FRC resolution. Classes of mixed or featureless content
  stay blurry.

Each feature is compared with the particle-weighted median over classes (the typical
class; a session is mostly particles), turned into a 0..1 score by a logistic, and the
class's score is the largest of the three. A class is junk when its score exceeds 0.5.
The thresholds are fixed constants set once on a panel of held-out molecules
(bench/bench_classify.py), never per molecule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["JUNK_THRESHOLD", "JunkFeatures", "junk_features", "junk_scores"]

JUNK_THRESHOLD = 0.5
"""A class whose score exceeds this is junk."""

_CONTRAST_AT = 0.45  # contrast / typical at which the contrast score is 0.5
_OUTSIDE_AT = 0.30  # outside fraction above the typical at which the outside score is 0.5
_RESOLUTION_AT = 1.6  # resolution / typical (Å / Å) at which the resolution score is 0.5


@dataclass
class JunkFeatures:
    """`(K,)` float64 features of each class (module docstring)."""

    contrast: torch.Tensor
    outside: torch.Tensor
    resolution_angstrom: torch.Tensor


def junk_features(averages: torch.Tensor, mask: torch.Tensor, resolution_angstrom: torch.Tensor,
                  max_resolution_angstrom: float) -> JunkFeatures:
    """Features of `(K, B, B)` class averages given the particle's `(B, B)` soft disc ``mask``.

    ``max_resolution_angstrom`` stands for an undefined (infinite) resolution (e.g. ``B * apix / 2``).
    """
    x = averages.to(torch.float64)
    m = mask.to(torch.float64)
    x = x - (x * (1 - m)).sum(dim=(-2, -1), keepdim=True) / (1 - m).sum().clamp(min=1)  # solvent level to 0
    inside = (x.square() * m).sum(dim=(-2, -1))
    outside = (x.square() * (1 - m)).sum(dim=(-2, -1))
    contrast = (inside / m.sum()).sqrt()
    fraction_out = outside / (inside + outside).clamp(min=1e-30)
    res = torch.where(torch.isfinite(resolution_angstrom), resolution_angstrom,
                      torch.full_like(resolution_angstrom, max_resolution_angstrom)).to(torch.float64)
    return JunkFeatures(contrast, fraction_out, res)


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> float:
    order = torch.argsort(values)
    cum = torch.cumsum(weights[order].to(torch.float64), 0)
    if float(cum[-1]) <= 0:
        return float(values.median())
    return float(values[order][int(torch.searchsorted(cum, 0.5 * cum[-1]))])


def junk_scores(features: JunkFeatures, counts: torch.Tensor) -> torch.Tensor:
    """`(K,)` float64 junk score of each class in [0, 1] (module docstring); empty classes score 1."""
    def logistic(z: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-z))

    typical_contrast = max(_weighted_median(features.contrast, counts), 1e-30)
    typical_outside = _weighted_median(features.outside, counts)
    typical_res = _weighted_median(features.resolution_angstrom, counts)
    s_contrast = logistic((_CONTRAST_AT - features.contrast / typical_contrast) / 0.08)
    s_outside = logistic((features.outside - typical_outside - _OUTSIDE_AT) / 0.05)
    s_res = logistic((features.resolution_angstrom / typical_res - _RESOLUTION_AT) / 0.1)
    score = torch.stack([s_contrast, s_outside, s_res]).amax(0)
    return torch.where(counts > 0, score, torch.ones_like(score))


