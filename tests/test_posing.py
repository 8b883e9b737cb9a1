"""Posing a particle set (engine.posing): the network's recipe with the shipped weights, and the random start."""

from __future__ import annotations

import pytest
import torch
from cryofastar.engine.posing import NetworkPoser, RandomPoser
from cryofastar.recon.simulate import atoms_to_volume, procedural_molecule, simulate_particles

BOX, APIX = 48, 3.0


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    truth = atoms_to_volume(procedural_molecule(1000000002), BOX, APIX)
    return simulate_particles(truth, 40, APIX, 1.0, torch.Generator().manual_seed(5)).images


@pytest.fixture(scope="module")
def poser() -> NetworkPoser:
    return NetworkPoser.load(None, torch.device("cpu"), views=16, anchors=4)


def _orthonormal(rotations: torch.Tensor) -> bool:
    eye = torch.eye(3, dtype=rotations.dtype).expand_as(rotations)
    return bool(torch.allclose(rotations @ rotations.transpose(-1, -2), eye, atol=1e-6)
                and torch.allclose(torch.linalg.det(rotations), torch.ones(len(rotations), dtype=rotations.dtype)))


def test_network_recipe_poses_input_box_images_in_one_frame(poser: NetworkPoser, images: torch.Tensor) -> None:
    assert not poser.has_reference and poser.state_dict() == {}
    with pytest.raises(RuntimeError, match="choose_reference"):
        poser.pose(images, APIX)  # the reference is chosen among candidates, never by accident from a whole pass
    best = poser.choose_reference(images[:8])
    assert 0 <= best < 8 and poser.has_reference
    poses = poser.pose(images, APIX)
    assert len(poses) == 40 and poses.rotations.dtype == torch.float64 and _orthonormal(poses.rotations)
    assert poses.origins_angstrom.shape == (40, 2) and bool((poses.confidence > 1).all())
    # a bootstrap pass of 15 (no anchors yet), then 11 new ones per pass beside 4 anchors: 11 + 11 + 3
    assert len(poses.anchor_disagreement_degrees) == len(poses.mirrored) == 4


def test_shifts_come_back_in_angstrom_whatever_the_input_box(poser: NetworkPoser, images: torch.Tensor) -> None:
    """The same images said to have twice the pixel size get twice the shift in Å (same frame, same hand)."""
    state = poser.state_dict()
    once = NetworkPoser(poser.model, views=16, anchors=4, frame_state=state).pose(images, APIX)
    twice = NetworkPoser(poser.model, views=16, anchors=4, frame_state=state).pose(images, 2 * APIX)
    torch.testing.assert_close(twice.origins_angstrom, 2 * once.origins_angstrom)
    torch.testing.assert_close(twice.rotations, once.rotations)


def test_a_resumed_poser_keeps_the_session_frame(poser: NetworkPoser, images: torch.Tensor) -> None:
    state = poser.state_dict()
    resumed = NetworkPoser(poser.model, views=16, anchors=4, frame_state=state)
    assert resumed.has_reference
    torch.testing.assert_close(resumed.state_dict()["reference"], state["reference"])
    torch.testing.assert_close(resumed.pose(images[:10], APIX).rotations,
                               NetworkPoser(poser.model, 16, 4, state).pose(images[:10], APIX).rotations)


def test_random_start_is_uniform_reproducible_and_unshifted(images: torch.Tensor) -> None:
    first, again = RandomPoser(seed=7).pose(images, APIX), RandomPoser(seed=7).pose(images, APIX)
    torch.testing.assert_close(first.rotations, again.rotations)
    assert _orthonormal(first.rotations) and bool((first.origins_angstrom == 0).all())
    assert bool((first.confidence == 0).all()) and len(first.anchor_disagreement_degrees) == 0
    many = RandomPoser(seed=1).pose(torch.zeros(4000, 2, 2), APIX).rotations
    assert float(many[:, 2, 2].mean().abs()) < 0.05  # cos(tilt) of uniform rotations averages 0


def test_another_poser_adopts_the_frame_and_poses_alike(poser: NetworkPoser, images: torch.Tensor) -> None:
    """A poser of another rank takes rank 0's frame (adopt_frame): the same poses for the same images."""
    first = NetworkPoser(poser.model, views=16, anchors=4)
    assert not first.frame_complete
    first.choose_reference(images[:8])
    assert first.has_reference and not first.frame_complete  # no anchors before the first pass
    early = NetworkPoser(poser.model, views=16, anchors=4)
    early.adopt_frame(first.state_dict())
    assert early.has_reference and not early.frame_complete
    first.pose(images[:2], APIX)
    assert not first.frame_complete and len(first.state_dict()["anchor_rotations"]) == 2  # 2 of its 4 anchors
    first.pose(images[2:20], APIX)
    assert first.frame_complete
    other = NetworkPoser(poser.model, views=16, anchors=4)
    other.adopt_frame(first.state_dict())
    assert other.frame_complete
    mine, theirs = first.pose(images[20:], APIX), other.pose(images[20:], APIX)
    torch.testing.assert_close(theirs.rotations, mine.rotations)
    torch.testing.assert_close(theirs.origins_angstrom, mine.origins_angstrom)
    torch.testing.assert_close(theirs.confidence, mine.confidence)
    torch.testing.assert_close(other.state_dict()["anchor_rotations"], first.state_dict()["anchor_rotations"])
