"""Tests of recon/pose_alignment.py: the global rotation and hand between two pose sets, with Cn symmetry."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.pose_alignment import (
    apply_alignment_to_rotations,
    cyclic_symmetry,
    global_alignment,
    nearest_symmetry_mates,
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
