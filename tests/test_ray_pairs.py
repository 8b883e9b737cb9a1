"""model.ray_pairs: targets, probabilities, loss and the 'found within' measure of common lines."""

from __future__ import annotations

import torch
from cryofastar.model.common_lines import TrueCommonLines
from cryofastar.model.ray_pairs import (
    common_line_loss,
    common_line_targets,
    found_within,
    pair_probabilities,
    sparse_targets,
)

L = 8


def _lines(a: float, b: float, angle: float = 45.0) -> TrueCommonLines:
    return TrueCommonLines(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64),
                           torch.tensor([angle], dtype=torch.float64))


def test_targets_put_half_the_mass_on_each_orientation_spread_bilinearly():
    target = common_line_targets(_lines(1.25, 6.5), L)[0]
    grid = target[:-1].reshape(L, L)
    assert abs(float(target.sum()) - 1.0) < 1e-6 and target[-1] == 0
    assert torch.isclose(grid[1, 6], torch.tensor(0.5 * 0.75 * 0.5))
    assert torch.isclose(grid[2, 7], torch.tensor(0.5 * 0.25 * 0.5))
    assert torch.isclose(grid[5, 2], torch.tensor(0.5 * 0.75 * 0.5))  # (1.25 + 4, 6.5 + 4 wrapped to 2.5)
    assert torch.isclose(grid[6, 3], torch.tensor(0.5 * 0.25 * 0.5))
    assert torch.isclose(grid[:, 0].sum() + grid[0].sum(), torch.tensor(0.0))


def test_near_parallel_views_target_no_line():
    target = common_line_targets(_lines(1.0, 2.0, angle=3.0), L, min_angle_degrees=5.0)[0]
    assert target[-1] == 1 and target[:-1].sum() == 0


def test_probabilities_and_loss():
    logits = torch.randn(3, L, L)
    p, none = pair_probabilities(logits, 0.5)
    assert torch.allclose(p.sum((-2, -1)) + none, torch.ones(3))
    cells, weights = sparse_targets(_lines(2.0, 3.0), L)
    cells, weights = cells.expand(3, -1), weights.expand(3, -1)
    sharp = torch.full((3, L, L), -20.0)
    sharp[:, 2, 3] = sharp[:, 6, 7] = 20.0
    assert common_line_loss(sharp, -20.0, cells, weights) < common_line_loss(logits, 0.5, cells, weights)
    assert float(common_line_loss(sharp, -20.0, cells, weights)) < 0.7  # log 2: the best a split target allows
    dense = common_line_targets(_lines(2.0, 3.0), L).expand(3, -1)  # the same loss as a dense cross-entropy
    log_p = torch.cat([logits.flatten(-2), torch.full((3, 1), 0.5)], -1).log_softmax(-1)
    assert torch.isclose(common_line_loss(logits, 0.5, cells, weights), -(dense * log_p).sum(-1).mean())


def test_found_within_accepts_either_orientation_but_not_a_mismatch():
    lines = _lines(2.0, 3.0)
    for (a, b), found in {(2, 3): True, (6, 7): True, (3, 4): True, (2, 7): False, (4, 3): False}.items():
        scores = torch.zeros(1, L, L)
        scores[0, a, b] = 1.0
        assert bool(found_within(scores, lines, 1.0)[0]) is found, (a, b)
