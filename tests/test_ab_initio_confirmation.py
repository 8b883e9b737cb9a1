"""recon/ab_initio/confirmation.py: outside poses confirmed (or not) by one random start of ab initio."""

from __future__ import annotations

import pytest
import torch
from cryofastar.recon.ab_initio import AbInitioSettings, confirm_poses
from cryofastar.recon.rotations import random_rotations
from cryofastar.recon.simulate import simulate_particles

APIX = 3.0
SETTINGS = AbInitioSettings(initial_resolution_angstrom=30.0, final_resolution_angstrom=12.0, schedule_particles=1600,
                            seed_particles=200, seed_passes=5, max_seed_passes=6, batch_size=100,
                            initial_particles=100,
                            global_step_degrees=20.0)


@pytest.fixture(scope="module")
def session(phantom32: torch.Tensor):
    """200 particles at SNR 5, box 32, their true poses and half sets."""
    sim = simulate_particles(phantom32, 200, apix=APIX, snr=5.0, generator=torch.Generator().manual_seed(5),
                             max_shift_px=2.0)
    return sim, 1 + (torch.arange(200) % 2)


def test_true_poses_in_another_frame_are_confirmed(session) -> None:
    """The true poses, seen from another global frame (as any map's poses are), agree with a random start.

    (A random start can itself settle wrong: seed 3 converges here, as 2 of 3 seeds do on two noise draws.)"""
    sim, halves = session
    frame = random_rotations(1, torch.Generator().manual_seed(2))[0]  # A_i G: the same map, rotated by G
    out = confirm_poses(sim.images, halves, APIX, sim.rotations @ frame, settings=SETTINGS, seed=3)
    assert out.agree and out.median_degrees < SETTINGS.agreement_degrees
    assert out.particles == 200 and out.symmetry_order == 1 and out.seconds > 0
    assert "agrees" in out.summary() and out.as_dict()["agree"] is True


def test_self_consistent_but_wrong_poses_are_not_confirmed(session) -> None:
    """Poses wrong in a structured way (each particle's pose rotated by its own large random angle) disagree."""
    sim, halves = session
    wrong = random_rotations(200, torch.Generator().manual_seed(9)) @ sim.rotations
    out = confirm_poses(sim.images, halves, APIX, wrong, settings=SETTINGS, seed=3)
    assert not out.agree and out.median_degrees > SETTINGS.agreement_degrees
    assert "DISAGREES" in out.summary()


def test_bad_shapes_are_refused(session) -> None:
    sim, halves = session
    with pytest.raises(ValueError, match="rotations must be"):
        confirm_poses(sim.images, halves, APIX, sim.rotations[:10], settings=SETTINGS)
    with pytest.raises(ValueError, match="images must be"):
        confirm_poses(sim.images[:0], halves[:0], APIX, sim.rotations[:0], settings=SETTINGS)
