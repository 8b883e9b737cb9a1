"""Ray-pair scores between two views: which ray of one is the common line with which ray of the other.

For views ``a, b`` with ray features ``e_a, e_b`` (:mod:`cryofastar.model.ray_encoder`) the
score of ray ``l`` of ``a`` against ray ``m`` of ``b`` is ``t * e_a(l) . e_b(m)`` (``t`` a
temperature). One more outcome, **no common line**, has its own logit: views nearly parallel
(or antiparallel) share their whole plane and have no single line. A softmax over the
``L * L + 1`` outcomes gives the pair's probabilities; the "no line" mass is what the pair
covariance (:func:`cryofastar.model.common_lines.pair_covariance`) leaves out.

Targets (:func:`common_line_targets`): the true line lies at fractional rays
``(l*, m*)`` and at the opposite rays ``(l* + L/2, m* + L/2)``; each gets half the mass,
spread bilinearly over its four nearest cells. Pairs whose view directions are within
``min_angle_degrees`` of parallel or antiparallel get all mass on "no line".
"""

from __future__ import annotations

import torch

from .common_lines import TrueCommonLines

__all__ = ["common_line_loss", "common_line_targets", "found_within", "pair_logits", "pair_probabilities",
           "sparse_targets"]


def pair_logits(features_a: torch.Tensor, features_b: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """`(..., L, D)`, `(..., L, D)` -> `(..., L, L)` scores ``t * e_a(l) . e_b(m)``."""
    return temperature * (features_a @ features_b.transpose(-1, -2))


def pair_probabilities(logits: torch.Tensor, none_logit: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the ``L * L`` ray pairs and "no line".

    Parameters
    ----------
    logits: torch.Tensor
        `(..., L, L)` ray-pair logits.
    none_logit: torch.Tensor | float
        `(...)` or scalar logit of "no common line".

    Returns
    -------
    probabilities: torch.Tensor
        `(..., L, L)` ray-pair probabilities.
    none: torch.Tensor
        `(...)` probability of "no common line" (the two sum to 1).
    """
    flat = _with_none(logits, none_logit).softmax(dim=-1)
    return flat[..., :-1].reshape(logits.shape), flat[..., -1]


def _with_none(logits: torch.Tensor, none_logit: torch.Tensor | float) -> torch.Tensor:
    none = torch.as_tensor(none_logit, dtype=logits.dtype, device=logits.device).expand(logits.shape[:-2])
    return torch.cat([logits.flatten(-2), none[..., None]], dim=-1)


def sparse_targets(lines: TrueCommonLines, n_rays: int,
                   min_angle_degrees: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of the module docstring as the few outcomes that carry mass.

    Parameters
    ----------
    lines: TrueCommonLines
        `(...)` true lines of the pairs (:func:`~cryofastar.model.common_lines.true_common_lines`).
    n_rays: int
        ``L``.
    min_angle_degrees: float
        View directions closer than this to parallel or antiparallel: "no line".

    Returns
    -------
    cells: torch.Tensor
        `(..., 9)` int64 outcome indices: 8 ray-pair cells ``l * L + m`` (4 per orientation)
        and "no line" (``L * L``).
    weights: torch.Tensor
        `(..., 9)` float32 masses, summing to 1.
    """
    n = n_rays
    cells, weights = [], []
    for offset in (0.0, n / 2):
        a, b = (lines.ray_a + offset) % n, (lines.ray_b + offset) % n
        a0, b0 = a.floor(), b.floor()
        fa, fb = (a - a0).float(), (b - b0).float()
        for da, wa in ((0, 1 - fa), (1, fa)):
            for db, wb in ((0, 1 - fb), (1, fb)):
                cells.append((((a0 + da) % n) * n + (b0 + db) % n).long())
                weights.append(0.5 * wa * wb)
    none = lines.angle_degrees < min_angle_degrees
    cells.append(torch.full_like(cells[0], n * n))
    weights.append(none.float())
    cells_t, weights_t = torch.stack(cells, -1), torch.stack(weights, -1)
    weights_t[..., :-1] = torch.where(none[..., None], 0.0, weights_t[..., :-1])
    return cells_t, weights_t


def common_line_targets(lines: TrueCommonLines, n_rays: int, min_angle_degrees: float = 5.0) -> torch.Tensor:
    """Dense target distributions over the ``L * L + 1`` outcomes (module docstring).

    Returns
    -------
    torch.Tensor
        `(..., L * L + 1)` float32, summing to 1; the last entry is "no line".
    """
    cells, weights = sparse_targets(lines, n_rays, min_angle_degrees)
    target = torch.zeros(*cells.shape[:-1], n_rays * n_rays + 1, dtype=torch.float32, device=cells.device)
    return target.scatter_add_(-1, cells, weights)


def common_line_loss(logits: torch.Tensor, none_logit: torch.Tensor | float, cells: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `(..., L, L)` logits (+ "no line") against sparse targets (:func:`sparse_targets`)."""
    flat = _with_none(logits, none_logit)
    return (flat.logsumexp(-1) - (weights * flat.gather(-1, cells)).sum(-1)).mean()


def found_within(scores: torch.Tensor, lines: TrueCommonLines, tolerance_rays: float) -> torch.Tensor:
    """`(...)` bool: the best-scoring ray pair is within ``tolerance_rays`` of a true pair, on both rays.

    Either orientation of the line counts (``(l*, m*)`` or ``(l* + L/2, m* + L/2)``); the
    mismatched ``(l*, m* + L/2)`` does not.
    """
    n = scores.shape[-1]
    best = scores.flatten(-2).argmax(-1)
    la, lb = (best // n).to(lines.ray_a.dtype), (best % n).to(lines.ray_a.dtype)

    def circular(x: torch.Tensor) -> torch.Tensor:
        return ((x + n / 2) % n - n / 2).abs()

    errors = [torch.maximum(circular(la - lines.ray_a - o), circular(lb - lines.ray_b - o)) for o in (0.0, n / 2)]
    return torch.minimum(*errors) <= tolerance_rays
