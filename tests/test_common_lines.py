"""model.common_lines: true lines, pair covariances, synchronisation and placement (exact geometry)."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.model.common_lines import (
    dihedral_rotations,
    pair_covariance,
    place_views,
    ray_fpm,
    synchronise,
    trace_agreement,
    true_common_lines,
)
from cryofastar.model.geometric_evaluation import hand_errors
from cryofastar.model.kabsch import rotation_from_covariance
from cryofastar.model.ray_pairs import common_line_targets
from cryofastar.recon.fourier_rays import ray_directions
from cryofastar.recon.rotations import geodesic_degrees, random_rotations

L = 96


def _relative(n: int, seed: int) -> torch.Tensor:
    a = random_rotations(n, torch.Generator().manual_seed(seed))
    return a[0] @ a.transpose(-1, -2)  # R_i = A_ref A_iᵀ, [0] = I


def _true_probabilities(rel_a: torch.Tensor, rel_b: torch.Tensor) -> torch.Tensor:
    lines = true_common_lines(rel_a, rel_b, L)
    return common_line_targets(lines, L, min_angle_degrees=0.0)[..., :-1].reshape(*lines.ray_a.shape, L, L).double()


def test_true_lines_are_shared_by_both_views():
    rel = _relative(20, 0)
    lines = true_common_lines(rel[:, None], rel[None], L)
    u = lambda ray: torch.stack([torch.cos(2 * math.pi * ray / L), torch.sin(2 * math.pi * ray / L),  # noqa: E731
                                 torch.zeros_like(ray)], -1)
    in_a = (rel[:, None] @ u(lines.ray_a)[..., None])[..., 0]
    in_b = (rel[None] @ u(lines.ray_b)[..., None])[..., 0]
    off = ~torch.eye(20, dtype=torch.bool)
    assert torch.allclose(in_a[off], in_b[off], atol=1e-9)
    assert torch.all(lines.angle_degrees[off] > 0) and torch.all(lines.angle_degrees <= 90)
    flipped = rel[3] @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # antiparallel view
    assert float(true_common_lines(rel[3], flipped, L).angle_degrees) < 1e-6


def test_dihedral_rotations_map_the_line_onto_the_reference_line():
    alpha, beta, phi = torch.tensor(0.3), torch.tensor(2.0), torch.linspace(0, 6, 7)
    rotation = dihedral_rotations(alpha, beta, phi)
    u_alpha = torch.tensor([math.cos(0.3), math.sin(0.3), 0.0])
    assert torch.allclose(rotation @ u_alpha, torch.tensor([math.cos(2.0), math.sin(2.0), 0.0]).expand(7, 3),
                          atol=1e-6)
    assert torch.allclose(torch.linalg.det(rotation), torch.ones(7), atol=1e-6)


def test_pair_covariance_is_the_weighted_sum_of_ray_outer_products():
    u = ray_directions(8, dtype=torch.float64)
    p = torch.zeros(8, 8, dtype=torch.float64)
    p[1, 5], p[2, 2] = 0.25, 0.5
    expected = 0.25 * torch.outer(u[1], u[5]) + 0.5 * torch.outer(u[2], u[2])
    assert torch.allclose(pair_covariance(p, u), expected)


@pytest.mark.parametrize("seed", range(4))
def test_synchronise_recovers_the_reference_and_anchors_from_true_lines(seed):
    rel = _relative(9, seed)
    covariance = pair_covariance(_true_probabilities(rel[:, None], rel[None]), ray_directions(L, dtype=torch.float64))
    pred = synchronise(covariance)
    assert torch.allclose(pred[0], torch.eye(3, dtype=torch.float64))
    assert hand_errors(pred[1:], rel[1:]).max() < 1.0  # degrees


def test_synchronise_increases_agreement_and_passes_gradients():
    rel = _relative(6, 11)
    probabilities = _true_probabilities(rel[:, None], rel[None]).requires_grad_()
    covariance = pair_covariance(probabilities, ray_directions(L, dtype=torch.float64))
    pred = synchronise(covariance)
    agreement = trace_agreement(pred[:, None], covariance, pred[None]).sum()
    start = synchronise(covariance.detach(), sweeps=0)
    before = trace_agreement(start[:, None], covariance.detach(), start[None]).sum()
    assert float(agreement.detach()) >= float(before) - 1e-9
    agreement.backward()
    assert probabilities.grad is not None and torch.isfinite(probabilities.grad).all()
    assert probabilities.grad.abs().sum() > 0


def test_place_views_equals_the_kabsch_of_the_ray_fpm():
    rel = _relative(30, 3)
    partners = rel[:5]
    probabilities = _true_probabilities(rel[5:, None], partners[None])  # (25, 5, L, L)
    u = ray_directions(L, dtype=torch.float64)
    placed = place_views(pair_covariance(probabilities, u), partners)
    assert geodesic_degrees(placed, rel[5:]).max() < 1.0  # true partners: no mirror ambiguity
    fpm, confidence = ray_fpm(probabilities, partners, u)
    covariance = torch.einsum("vl,li,vlj->vij", confidence, u, fpm)  # sum_l w u_l X_lᵀ, no offset
    assert torch.allclose(rotation_from_covariance(covariance), placed, atol=1e-9)
    assert torch.allclose(confidence.sum(-1), torch.full((25,), 5.0, dtype=torch.float64))


def test_synchronise_rejects_bad_shapes():
    with pytest.raises(ValueError, match="covariance must be"):
        synchronise(torch.zeros(3, 2, 3, 3))
