"""FPM geometry, the polar input and the Kabsch pose solver (no network)."""

from __future__ import annotations

import math

import pytest
import torch
from cryofastar.model.curriculum import Stage
from cryofastar.model.fpm import fourier_planar_map, mirror_fpm, origins_to_tau, relative_rotations
from cryofastar.model.kabsch import fpm_to_poses, weighted_kabsch
from cryofastar.model.loss import fpm_loss
from cryofastar.model.polar import planar_coordinates, polar_lines
from cryofastar.model.training_data import MoleculeBank, sample_rotations, simulate_sets
from cryofastar.recon.rotations import geodesic_degrees, random_rotations


@pytest.fixture(scope="module")
def bank() -> MoleculeBank:
    return MoleculeBank(64, 2, [], 0.0, seed_start=7, generator=torch.Generator().manual_seed(0))


def test_kabsch_recovers_rotations_and_shifts_from_exact_fpm():
    g = torch.Generator().manual_seed(0)
    rotations = random_rotations(12, g).view(2, 6, 3, 3)
    origins = (torch.rand(2, 6, 2, generator=g, dtype=torch.float64) - 0.5) * 8
    x0 = planar_coordinates(16, 8, 0.75).double()
    fpm = fourier_planar_map(relative_rotations(rotations), origins_to_tau(origins, 64), x0)
    weights = torch.rand(fpm.shape[:-1], generator=g) + 0.1
    rel, got = fpm_to_poses(fpm, weights, x0, 64)
    assert torch.allclose(rel, relative_rotations(rotations), atol=1e-10)
    assert torch.allclose(got, origins, atol=1e-9)
    assert torch.allclose(torch.linalg.det(rel), torch.ones(2, 6, dtype=torch.float64))
    # the reference view comes out as the identity
    assert torch.allclose(rel[:, 0], torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-10)


def test_kabsch_weights_ignore_outliers():
    g = torch.Generator().manual_seed(1)
    rotation = random_rotations(1, g)[0]
    x0 = planar_coordinates(12, 6, 0.75).double().reshape(-1, 3)
    x = x0 @ rotation.T
    bad = torch.zeros(len(x0), dtype=torch.bool)
    bad[::5] = True
    x[bad] = torch.randn(int(bad.sum()), 3, generator=g, dtype=torch.float64)
    weights = torch.where(bad, 1e-9, 1.0)
    fitted, _ = weighted_kabsch(x0, x, weights)
    assert float(geodesic_degrees(fitted, rotation)) < 1e-4
    unweighted, _ = weighted_kabsch(x0, x, torch.ones(len(x0)))
    assert float(geodesic_degrees(unweighted, rotation)) > 1.0


def test_mirrored_fpm_is_the_fpm_of_mirrored_poses():
    g = torch.Generator().manual_seed(2)
    rotations = random_rotations(5, g)
    j = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    x0 = planar_coordinates(8, 4, 0.75).double()
    tau = origins_to_tau(torch.randn(5, 2, generator=g, dtype=torch.float64), 64)
    direct = fourier_planar_map(relative_rotations(rotations), tau, x0)
    mirrored = fourier_planar_map(relative_rotations(j @ rotations @ j), tau, x0)
    assert torch.allclose(mirror_fpm(direct), mirrored, atol=1e-12)


def test_loss_is_hand_invariant_per_set():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(3, 4, 8, 6, 3, generator=g)
    confidence = 1 + torch.rand(3, 4, 8, 6, generator=g)
    pred = torch.stack([target[0], mirror_fpm(target[1]), target[2] + 0.3])
    loss, mirrored = fpm_loss(pred, confidence, target)
    loss_true, _ = fpm_loss(torch.stack([target[0], target[1], target[2] + 0.3]), confidence, target)
    assert torch.allclose(loss, loss_true)
    assert mirrored.tolist()[:2] == [False, True]
    # mirroring single views is not forgiven
    mixed = target.clone()
    mixed[:, 1] = mirror_fpm(target[:, 1])
    assert float(fpm_loss(mixed, confidence, target)[0]) > float(fpm_loss(target, confidence, target)[0]) + 0.01


def test_common_line_of_two_simulated_views_is_where_the_fpm_says(bank):
    """The FPM convention against simulated images: the ray of view 1 whose FPM lies in
    the reference plane (z = 0) is the reference's ray at the same (x, y) direction."""
    g = torch.Generator().manual_seed(4)
    sets = simulate_sets(bank, Stage("t", "full", views=3), 1, g)
    n_rays, n_radii = 360, 24
    rays = polar_lines(sets.images[0], n_rays, n_radii, 0.75)  # (3, 2, L, R)
    rel = relative_rotations(sets.rotations)[0]
    theta = torch.arange(n_rays, dtype=torch.float64) * 2 * math.pi / n_rays
    directions = torch.stack([torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)], -1) @ rel[1].T
    ray = int(directions[:, 2].abs().argmin())
    angle = math.atan2(float(directions[ray, 1]), float(directions[ray, 0])) % (2 * math.pi)
    match = round(angle / (2 * math.pi / n_rays)) % n_rays
    same = torch.nn.functional.cosine_similarity(rays[1, :, ray].flatten(), rays[0, :, match].flatten(), 0)
    for other in (match + n_rays // 3, match + n_rays // 2):  # elsewhere, and the opposite (conjugate) ray
        different = torch.nn.functional.cosine_similarity(rays[1, :, ray].flatten(),
                                                          rays[0, :, other % n_rays].flatten(), 0)
        assert float(different) < 0.5
    assert float(same) > 0.9


def test_polar_rays_turn_a_quarter_rotation_into_a_cyclic_shift():
    g = torch.Generator().manual_seed(5)
    box, n_rays = 63, 24  # odd box: rot90 turns about index B // 2
    image = torch.randn(box, box, generator=g)
    image = torch.nn.functional.avg_pool2d(image[None, None], 5, 1, 2)[0, 0]
    rays = polar_lines(torch.stack([image, torch.rot90(image, 1, (0, 1))]), n_rays, 10, 0.7)
    q = n_rays // 4  # 90 degrees: ray l of the rotated image is ray l + q of the original
    expected = torch.roll(rays[0], -q, dims=1)
    assert float((rays[1] - expected).abs().mean()) < 1e-4 * float(rays[0].abs().mean())
    wrong_way = torch.roll(rays[0], q, dims=1)
    assert float((rays[1] - wrong_way).abs().mean()) > 0.1 * float(rays[0].abs().mean())


@pytest.mark.parametrize("poses", ["inplane", "cone"])
def test_curriculum_pose_distributions(poses):
    g = torch.Generator().manual_seed(6)
    stage = Stage("t", poses, views=200, cone_degrees=20.0)
    rotations = sample_rotations(stage, 200, g)
    rel = relative_rotations(rotations)
    # the viewing direction (third row of A) moves by at most 2 x the cone (0 for in-plane)
    directions = rotations[:, 2]
    spread = torch.rad2deg(torch.acos((directions @ directions[0]).clamp(-1, 1))).max()
    limit = 1e-6 if poses == "inplane" else 40.0 + 1e-6
    assert float(spread) <= limit
    assert float(geodesic_degrees(rel[1:], torch.eye(3, dtype=torch.float64)).max()) > 90  # in-plane angles free
