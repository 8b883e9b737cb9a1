"""Tests of recon/pose_alignment.py: the global rotation and hand between two pose sets, with Cn symmetry."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.pose_alignment import (
    apply_alignment_to_rotations,
    cyclic_symmetry,
    global_alignment,
    nearest_symmetry_mates,
    symmetry_group,
)
from cryofastar.recon.rotations import geodesic_degrees, mirror_rotations, random_rotations


def test_cyclic_symmetry_is_a_group_about_z() -> None:
    ops = cyclic_symmetry(4)
    assert ops.shape == (4, 3, 3)
    torch.testing.assert_close(ops[1] @ ops[3], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(ops[1] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64),
                               torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("mirrored", [False, True])
def test_poses_of_a_c3_map_that_took_different_equivalent_poses_align_modulo_the_symmetry(mirrored: bool) -> None:
    g = torch.Generator().manual_seed(0)
    true = random_rotations(600, g)
    ops = cyclic_symmetry(3)
    which = torch.randint(0, 3, (600,), generator=g)
    frame = random_rotations(1, g)[0]
    jitter = random_rotations(600, g)
    small = torch.linalg.matrix_exp(0.02 * (jitter - jitter.transpose(-1, -2)))  # a few degrees of noise
    pred = true @ ops[which] @ small @ frame.T  # each particle at one of its 3 equivalent poses, in another frame
    if mirrored:
        pred = mirror_rotations(pred)
    plain = global_alignment(pred, true)
    alignment = global_alignment(pred, true, symmetry=3)
    assert alignment.mirrored == mirrored
    aligned = apply_alignment_to_rotations(pred, alignment)
    errors = geodesic_degrees(aligned, nearest_symmetry_mates(aligned, true, ops))
    assert float(errors.median()) < 4.0
    assert min(plain.median_degrees) > 30.0  # without the symmetry the same poses look wrong


def test_explicit_operators_score_a_homodimer_whose_c2_axis_is_not_z() -> None:
    """A real homodimer's C2 lies wherever the deposited model puts it: poses are scored modulo given operators."""
    g = torch.Generator().manual_seed(5)
    axis_frame = random_rotations(1, g)[0]
    ops = axis_frame @ cyclic_symmetry(2) @ axis_frame.T  # C2 about a random axis, identity first
    assert symmetry_group(ops).shape == (2, 3, 3)
    true = random_rotations(400, g)
    which = torch.randint(0, 2, (400,), generator=g)
    frame = random_rotations(1, g)[0]
    pred = _noisy(true @ ops[which], g, 0.02) @ frame.T
    alignment = global_alignment(pred, true, symmetry=ops)
    aligned = apply_alignment_to_rotations(pred, alignment)
    assert float(geodesic_degrees(aligned, nearest_symmetry_mates(aligned, true, ops)).mean()) < 4.0
    wrong = apply_alignment_to_rotations(pred, global_alignment(pred, true, symmetry=2))  # C2 about z: wrong group
    assert float(geodesic_degrees(wrong, nearest_symmetry_mates(wrong, true, cyclic_symmetry(2))).mean()) > 20.0
    with pytest.raises(ValueError, match="identity"):
        symmetry_group(ops[1:])


def _noisy(rot: torch.Tensor, g: torch.Generator, scale: float = 0.03) -> torch.Tensor:
    jitter = torch.randn(rot.shape[0], 3, 3, generator=g, dtype=torch.float64) * scale
    return rot @ torch.linalg.matrix_exp(jitter - jitter.transpose(-1, -2))


def test_pose_agreement_of_two_starts_that_found_the_same_map_in_other_frames_and_hands() -> None:
    from cryofastar.recon.pose_alignment import pose_agreement

    g = torch.Generator().manual_seed(1)
    first = random_rotations(800, g)
    second = mirror_rotations(_noisy(first, g) @ random_rotations(1, g)[0])
    result = pose_agreement(first, second)
    assert result.agree and result.order == 1 and result.median_degrees < 6.0


def test_pose_agreement_finds_a_c3_map_whose_particles_took_other_equivalent_poses() -> None:
    from cryofastar.recon.pose_alignment import pose_agreement

    g = torch.Generator().manual_seed(2)
    first = random_rotations(900, g)
    axis_frame = random_rotations(1, g)[0]  # the symmetry axis of the first start's map, anywhere
    ops = axis_frame @ cyclic_symmetry(3) @ axis_frame.T
    which = torch.randint(0, 3, (900,), generator=g)
    second = _noisy(first @ ops[which], g) @ random_rotations(1, g)[0]
    result = pose_agreement(first, second)
    assert result.agree and result.order == 3


@pytest.mark.parametrize("kind", ["random", "free spin"])
def test_pose_agreement_refuses_unrelated_sets_and_a_free_spin_about_one_axis(kind: str) -> None:
    from cryofastar.recon.pose_alignment import _rotation_about, pose_agreement

    g = torch.Generator().manual_seed(3)
    first = random_rotations(900, g)
    if kind == "random":
        second = random_rotations(900, g)
    else:  # right axis, any roll about it: what a wrong start of an elongated particle can look like
        axis = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
        spins = _rotation_about(axis, torch.rand(900, generator=g, dtype=torch.float64) * 2 * torch.pi)
        second = first @ spins
    assert not pose_agreement(first, second).agree
