"""The shared refinement policy (engine.policy): the network-informative rule, on real rotations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryofastar.engine.policy import (
    CONFIRM_PARTICLES,
    INFORMATIVE_FRACTION,
    NEIGHBOURHOOD_RANGES,
    confirmation_rows,
    is_informative,
    network_won_fraction,
)
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.rotations import random_rotations


def _turned(rotations: torch.Tensor, degrees: float) -> torch.Tensor:
    """``rotations`` each turned by ``degrees`` about z (the geodesic distance is exactly ``degrees``)."""
    turn = euler_to_matrix(torch.tensor([degrees], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                           torch.zeros(1, dtype=torch.float64))
    return turn @ rotations


def test_won_fraction_counts_poses_within_the_neighbourhood() -> None:
    network = random_rotations(100, torch.Generator().manual_seed(0))
    local_range = 6.0
    inside = _turned(network[:30], 0.9 * NEIGHBOURHOOD_RANGES * local_range)
    outside = _turned(network[30:], 1.1 * NEIGHBOURHOOD_RANGES * local_range)
    matched = torch.cat([inside, outside])
    assert network_won_fraction(matched, network, local_range) == pytest.approx(0.3)
    assert network_won_fraction(network, network, local_range) == 1.0


def test_informative_at_the_threshold_and_from_the_mean_of_probes() -> None:
    assert is_informative(INFORMATIVE_FRACTION)
    assert not is_informative(INFORMATIVE_FRACTION - 0.01)
    assert is_informative([0.2, 0.9])  # the mean of several probes decides (the daemon keeps the last four)
    assert not is_informative([0.2, 0.6])
    assert not is_informative([])  # no probe: not (yet) informative


def test_ab_initio_attempts_double_the_seed_set_while_particles_allow() -> None:
    from cryofastar.engine.policy import AB_INITIO_ATTEMPTS, ab_initio_attempts
    from cryofastar.recon.ab_initio import AbInitioSettings

    seeds = [s.seed_particles for s in ab_initio_attempts(AbInitioSettings(seed_particles=1000), 5000)]
    assert seeds == [1000, 2000][:AB_INITIO_ATTEMPTS]
    assert [s.seed_particles for s in ab_initio_attempts(AbInitioSettings(seed_particles=1000), 800)] == [1000]
    assert [s.seed_particles for s in ab_initio_attempts(AbInitioSettings(seed_particles=1000), 1500)] == [1000, 1500]


def test_confirmation_rows_are_a_reproducible_random_subset_of_at_most_the_seed_set() -> None:
    rows = confirmation_rows(5000, seed=1)
    assert len(rows) == CONFIRM_PARTICLES and len(np.unique(rows)) == len(rows) and (np.diff(rows) > 0).all()
    assert rows.min() >= 0 and rows.max() < 5000 and rows.max() > 4000  # spread over the session, not its start
    assert np.array_equal(rows, confirmation_rows(5000, seed=1))
    assert not np.array_equal(rows, confirmation_rows(5000, seed=2))
    assert np.array_equal(confirmation_rows(300, seed=1), np.arange(300))  # fewer particles: all of them
