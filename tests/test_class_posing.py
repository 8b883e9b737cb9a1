"""engine.class_posing: which classes are posed, their common-line poses, and particles through their class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryofastar.engine.class_posing import (
    MAX_CLASS_VIEWS,
    ClassPoser,
    ClassViews,
    class_order,
    particle_poses,
    second_start,
)
from cryofastar.model.evaluation import pose_errors
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, simulate_particles

BOX = 64


@pytest.fixture(scope="module")
def volume() -> tuple[torch.Tensor, float]:
    atoms = procedural_molecule(1_000_000_004)
    apix = 2 * atoms.radius_angstrom() / (0.6 * BOX)
    return atoms_to_volume(atoms, BOX, apix), apix


def _projections(volume: torch.Tensor, apix: float, rotations: torch.Tensor) -> torch.Tensor:
    return simulate_particles(volume, len(rotations), apix, None, torch.Generator().manual_seed(0), max_shift_px=0,
                              rotations=rotations).images


def test_class_order_puts_good_classes_first_by_size_and_leaves_out_empty_ones():
    counts = torch.tensor([5.0, 0.0, 9.0, 7.0, 9.0, 3.0])
    junk = torch.tensor([False, False, True, False, False, False])
    assert class_order(counts, junk).tolist() == [4, 3, 0, 5, 2]


def test_a_particle_is_its_class_average_turned_by_psi(volume):
    """Rz(psi) @ A_c is the class average (the projection at A_c) turned in plane as RELION's 2D psi says:
    on rays, psi = 90 degrees moves every ray a quarter turn on."""
    vol, apix = volume
    class_pose = random_rotations(1, torch.Generator().manual_seed(3))
    particle = particle_poses(class_pose, np.array([0]), np.array([90.0]))
    rays = image_rays(_projections(vol, apix, torch.cat([class_pose, particle])), 96, 16, 0.75)
    assert (rays[1] - torch.roll(rays[0], -24, dims=0)).abs().max() < 1e-3 * rays.abs().max()


def test_classical_poser_poses_clean_projections_up_to_one_frame(volume):
    vol, apix = volume
    truth = random_rotations(40, torch.Generator().manual_seed(5))
    order = np.arange(40)
    matrices = ClassPoser.load("classical").pose_classes(_projections(vol, apix, truth), order)
    assert torch.allclose(matrices[0], torch.eye(3, dtype=torch.float64))  # the reference class's frame
    assert pose_errors(matrices, truth).geodesic_median_degrees < 5.0


def test_shipped_decoder_poses_clean_projections(volume):
    vol, apix = volume
    truth = random_rotations(40, torch.Generator().manual_seed(7))
    poser = ClassPoser.load()  # the shipped weights
    assert poser.config.anchors == 24
    matrices = poser.pose_classes(_projections(vol, apix, truth), np.arange(40))
    assert pose_errors(matrices, truth).geodesic_median_degrees < 10.0


def test_more_classes_than_one_pass_share_one_frame(volume):
    vol, apix = volume
    n = MAX_CLASS_VIEWS + 20
    truth = random_rotations(n, torch.Generator().manual_seed(6))
    averages = _projections(vol, apix, truth)
    order = np.arange(n - 1)  # the last class is not posed
    matrices = ClassPoser.load("classical").pose_classes(averages, order)
    assert torch.isnan(matrices[-1]).all()
    errors = pose_errors(matrices[:-1], truth[:-1])
    later = errors.geodesic_degrees[MAX_CLASS_VIEWS:]
    assert errors.geodesic_median_degrees < 5.0 and float(later.median()) < 5.0


def test_too_few_classes():
    with pytest.raises(ValueError, match="at least 2"):
        ClassPoser.load("classical").pose_classes(torch.zeros(3, BOX, BOX), np.array([0]))


def _views(averages: torch.Tensor) -> ClassViews:
    k = len(averages)
    return ClassViews(averages, torch.arange(k, 0, -1).double(), torch.zeros(k, dtype=torch.bool), np.arange(k),
                      np.zeros(k), np.zeros((k, 2)))


def test_second_start_has_another_reference_and_every_class():
    order = np.array([7, 3, 9, 1, 4])
    assert second_start(order).tolist() == [3, 1, 7, 9, 4]


def test_class_poses_are_trusted_when_two_decoder_starts_agree_and_not_on_noise(volume):
    vol, apix = volume
    truth = random_rotations(30, torch.Generator().manual_seed(8))
    poser = ClassPoser.load("classical")
    good = poser.pose_particles(_views(_projections(vol, apix, truth)))
    assert good.trusted and good.agreement.median_degrees < 5.0 and good.classes_posed == 30
    assert pose_errors(good.rotations, truth).geodesic_median_degrees < 5.0
    assert "trusted: two decoder starts agree" in good.summary()
    noise = poser.pose_particles(_views(torch.randn(30, BOX, BOX, generator=torch.Generator().manual_seed(2))))
    assert not noise.trusted and noise.as_dict()["agree"] is False and "NOT trusted" in noise.summary()
    few = poser.pose_particles(_views(_projections(vol, apix, truth[:3])))
    assert few.agreement is None and not few.trusted and "too few" in few.summary()
