"""Which classes are junk: a score per class from features anyone can measure on its average.

Junk in a session (noise boxes, carbon edges, aggregates, particles picked off-centre)
gathers in classes of its own, and those classes differ from the good ones in ways
that need no knowledge of the molecule:

* **spread**: the radius holding 90 % of the average's energy (its variance about the
  solvent level, measured in the box corners). A carbon edge crosses the whole box, an
  aggregate's second particle and an off-centre particle's cut body lie far from the
  centre: their energy spreads out, a good class's stays on the particle.
* **contrast**: the average's RMS within the typical class's spread radius. Noise
  boxes average to almost nothing (the likelihood sends them to the flattest class).
* **resolution**: the class's FRC resolution. Classes of mixed or featureless content
  stay blurry.

Each feature is compared with its particle-weighted median over the classes (the
typical class: a session is mostly particles, and all its views share one molecule),
turned into a 0..1 score by a logistic, and the class's score is the largest of the
three; a class is junk when its score exceeds :data:`JUNK_THRESHOLD`. The constants are
fixed, set on held-out molecules (bench/bench_classify.py), never per molecule. The
particle-diameter mask plays no part: it is measured from images that hold the junk too.

Images are `(K, B, B)` [class, y, x] with the centre at pixel ``B // 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .references import weighted_median

__all__ = ["JUNK_THRESHOLD", "JunkFeatures", "junk_features", "junk_scores"]

JUNK_THRESHOLD = 0.5
"""A class whose score exceeds this is junk."""

_SPREAD_AT = 1.35  # spread / typical at which the spread score is 0.5
_CONTRAST_AT = 0.45  # contrast / typical at which the contrast score is 0.5
_RESOLUTION_AT = 1.6  # resolution / typical (Å / Å) at which the resolution score is 0.5
_CORNER = 0.48  # solvent: farther than this fraction of the box from the centre


@dataclass
class JunkFeatures:
    """`(K,)` float64 features of each class (module docstring): spread (pixels), contrast, resolution (Å)."""

    spread: torch.Tensor
    contrast: torch.Tensor
    resolution_angstrom: torch.Tensor


def _radius(box: int) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    return (c[:, None].square() + c[None, :].square()).sqrt()


def _typical(values: torch.Tensor, counts: torch.Tensor) -> float:
    """The particle-weighted median class's value (the plain median when no class holds a particle)."""
    median = weighted_median(values, counts)
    return float(values.median()) if median is None else median


def junk_features(averages: torch.Tensor, counts: torch.Tensor, resolution_angstrom: torch.Tensor,
                  max_resolution_angstrom: float) -> JunkFeatures:
    """Features of `(K, B, B)` class averages holding `(K,)` ``counts`` particles.

    ``max_resolution_angstrom`` stands for an undefined (infinite) resolution (e.g. ``B * apix / 2``).
    """
    k, box, _ = averages.shape
    r = _radius(box)
    x = averages.to(torch.float64)
    x = x - x[:, r > _CORNER * box].mean(-1)[:, None, None]  # solvent level to 0
    ring = r.round().long()
    profile = torch.zeros(k, int(ring.max()) + 1, dtype=torch.float64).index_add_(
        1, ring.flatten(), x.square().reshape(k, -1))
    cumulative = profile.cumsum(1)
    spread = (cumulative < 0.9 * cumulative[:, -1:]).sum(1).to(torch.float64) + 0.5
    typical_spread = _typical(spread, counts)
    inside = r <= typical_spread
    contrast = x[:, inside].square().mean(-1).sqrt()
    res = torch.where(torch.isfinite(resolution_angstrom), resolution_angstrom,
                      torch.full_like(resolution_angstrom, max_resolution_angstrom)).to(torch.float64)
    return JunkFeatures(spread, contrast, res)


def junk_scores(features: JunkFeatures, counts: torch.Tensor) -> torch.Tensor:
    """`(K,)` float64 junk score of each class in [0, 1] (module docstring); empty classes score 1."""
    def logistic(z: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-z))

    typical_spread = max(_typical(features.spread, counts), 1e-30)
    typical_contrast = max(_typical(features.contrast, counts), 1e-30)
    typical_res = _typical(features.resolution_angstrom, counts)
    s_spread = logistic((features.spread / typical_spread - _SPREAD_AT) / 0.07)
    s_contrast = logistic((_CONTRAST_AT - features.contrast / typical_contrast) / 0.08)
    s_res = logistic((features.resolution_angstrom / typical_res - _RESOLUTION_AT) / 0.1)
    score = torch.stack([s_spread, s_contrast, s_res]).amax(0)
    return torch.where(counts > 0, score, torch.ones_like(score))
